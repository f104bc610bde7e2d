"""Time a peer library's real SAE training step on the shapes bench/train_step.py uses.

    python bench/peers.py --library sparsify|sae_lens --d-in D --d-sae M --batch B --threads T
                          --target-s S [--k K] [--out FILE]

Why: saescope's step means little on its own; timed on the same synthetic activations,
EleutherAI's sparsify (TopK) and SAELens (JumpReLU) say what a step costs elsewhere. Each peer's
step is the one its own trainer runs, built from its own classes, with its defaults:

- sparsify: `SparseCoder` (k = K, num_latents = M) driven by the body of `sparsify.Trainer.fit`
  for loss_fn="fvu": b_dec set to the batch mean on the first step; every step the decoder rows
  renormalised, forward (fused TopK encoder, sparse embedding-bag decode) against the batch's
  total variance, FVU loss (auxk_alpha = 0 by default, so no AuxK pass; nothing is dead yet
  anyway), backward, the gradient parallel to the decoder rows removed, the optimizer step
  (their default: ScheduleFree-wrapped SignSGD; --sparsify-optimizer adam for their Adam with
  linear warm-up, torch's Adam as bitsandbytes is absent), and the did-fire / dead-latent counts.
- sae_lens: `JumpReLUTrainingSAE` (default bandwidth, step L0 loss, L0 coefficient 1e-4)
  stepped by `SAETrainer.step`: `training_forward_pass` (MSE + L0), firing statistics, backward,
  clip_grad_norm_(1.0), Adam, lr and coefficient schedulers. SAELens 6 applies no per-step
  decoder-norm handling. Thresholds start at each latent's (1 − K/M) quantile of pre-activations
  on the first batch, so that about K latents fire per token, as in train_step.py.

The activations are made before the timed region; a few warm-up steps run first, then steps
until S seconds have passed (at least 3). `l0` is the mean active latents per token over the
timed steps. No matmul rate is measured here. Prints one JSON line and appends it to FILE."""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version

import torch

from common import emit, step_arguments, step_line, time_steps


def sparsify_stepper(a, batch):
    """Return (step, l0_of_timed_steps, optimizer name, final): sparsify.Trainer.fit's step on
    `batch(i)`, loss_fn="fvu"; `final()` gives the SparseCoder as fit() saves it (the schedule-free
    average) and its tokens since each latent fired."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD
    from transformers import get_linear_schedule_with_warmup

    torch.set_float32_matmul_precision("high")  # as fit() does
    torch.manual_seed(0)
    sae = SparseCoder(a.d_in, SparseCoderConfig(num_latents=a.d_sae, k=a.k), "cpu", dtype=torch.float32)
    schedulers = []
    if a.sparsify_optimizer == "adam":  # Trainer: bitsandbytes Adam8bit if present, else torch's
        opt = torch.optim.Adam(sae.parameters(), lr=2e-4 / (sae.num_latents / 2**14) ** 0.5)
        schedulers = [get_linear_schedule_with_warmup(opt, 1000, 10**9)]
    else:
        opt = ScheduleFreeWrapper(SignSGD(sae.parameters(), lr=5e-3 / (sae.num_latents / 2**14) ** 0.5), momentum=0.95)
        opt.train()
    tokens_since_fired = torch.zeros(sae.num_latents, dtype=torch.long)
    did_fire = torch.zeros(sae.num_latents, dtype=torch.bool)
    stats = {"active": 0.0, "tokens": 0}

    def step(i: int, timed: bool) -> None:
        x = batch(i)
        if i == 0:  # fit(): centre the pre-activations at initialisation
            sae.b_dec.data = x.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (x - x.mean(0)).pow(2).sum()
        out = sae(x=x, y=x, dead_mask=None, total_variance=total_variance)  # dead_mask None: auxk_alpha == 0
        did_fire[out.latent_indices.flatten()] = True
        (out.fvu + 0.0 * out.auxk_loss + out.multi_topk_fvu / 8).backward()  # their loss, auxk_alpha = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        for s in schedulers:
            s.step()
        with torch.no_grad():
            tokens_since_fired.add_(len(x))
            tokens_since_fired[did_fire] = 0
            did_fire.zero_()
        if timed:
            stats["active"] += float((out.latent_acts > 0).sum())
            stats["tokens"] += len(x)

    def final():
        if hasattr(opt, "eval"):
            opt.eval()
        return sae, tokens_since_fired

    return step, lambda: stats["active"] / stats["tokens"], a.sparsify_optimizer, final


def sae_lens_stepper(a, batch):
    """Return (step, l0_of_timed_steps, optimizer name): SAETrainer.step on a JumpReLUTrainingSAE."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, l0_coefficient=1e-4))
    cfg = SAETrainerConfig(total_training_samples=a.batch * 10**6, train_batch_size_samples=a.batch, lr=7e-5,
                           lr_end=7e-6)  # constant lr; their runner config fills lr_end = lr / 10
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))
    with torch.no_grad():
        pre = sae.process_sae_in(batch(0)) @ sae.W_enc + sae.b_enc
        sae.threshold.copy_(pre.quantile(1 - a.k / a.d_sae, dim=0).clamp_min(1e-3))
        del pre
    state = {"reset": False}

    def step(i: int, timed: bool) -> None:
        if timed and not state["reset"]:  # count firing over the timed steps only
            trainer._reset_running_sparsity_stats()
            state["reset"] = True
        trainer.step(batch(i))
        trainer.n_training_steps += 1

    return step, lambda: float(trainer.act_freq_scores.sum()) / trainer.n_frac_active_samples, "adam"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", choices=["sparsify", "sae_lens"], required=True)
    step_arguments(p)
    p.add_argument("--sparsify-optimizer", choices=["signum", "adam"], default="signum",
                   help="sparsify's optimizer (its default: signum)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(a.batch, a.d_in, generator=gen) for _ in range(4)]
    make = sparsify_stepper if a.library == "sparsify" else sae_lens_stepper
    step, l0, optimizer = make(a, lambda i: batches[i % len(batches)])[:3]
    times = time_steps(step, a.warmup, a.target_s)
    emit(step_line(a, times, library=a.library, arch="topk" if a.library == "sparsify" else "jumprelu", l0=l0(),
                   optimizer=optimizer, version=version("eai-sparsify" if a.library == "sparsify" else "sae-lens")),
         a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
