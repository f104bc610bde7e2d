"""Train a peer's SAE by its own trainer on the batches saescope's trainer would see, and save it in
saescope's native format for bench/quality.py to evaluate beside ours.

    .venv-peers/bin/python bench/quality_peers.py --library sparsify|sae_lens --store S --site SITE
        --width M --tokens T --out FOLDER [--k 40] [--target-l0 40] [--batch 4096] [--seed 0]

Runs in the peers' venv (saescope installed there without dependencies, beside eai-sparsify and
sae-lens). The batches come from saescope's own stream over the store (same seed, buffer and
order), so every SAE of the comparison sees the same tokens in the same batches.

- sparsify: TopK k, its defaults through `peers.sparsify_stepper` (the body of `Trainer.fit`:
  signum under schedule-free averaging, lr 5e-3/√(M/2^14), FVU loss, b_dec from the first batch's
  mean, AuxK off), on raw activations as its trainer reads them; saved as fit() saves it, the
  schedule-free average.
- sae_lens: `JumpReLUTrainingSAE` with its Gemma Scope 2 mode (sparsity "quadratic" around
  target_l0) and every other default (θ 0.01, bandwidth 0.05, coefficient 1, Adam lr 3e-4,
  β (0.9, 0.999)), stepped by `SAETrainer.step`, on activations scaled to a mean norm of √d_in
  (its runner's `expected_average_only_in`, which its defaults assume); the folder SAELens writes
  is read by saescope's loader and given the scale as its norm scalar.

Either way the saved SAE's `final_metrics.dead_fraction` is the share of latents unfired over the
last 10% of training tokens, as saescope's trainer counts it."""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from argparse import Namespace
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm.auto import tqdm

from peers import sparsify_stepper
from saescope import SAEConfig, load_sae, save_sae
from saescope.config import SAESpec, TrainConfig
from saescope.sae import build_sae
from saescope.train import trainer_for


def stream(a):
    """saescope's batches of the store (raw rows of `a.site`) and the site's norm scalar C."""
    cfg = TrainConfig(store=a.store, saes=[SAESpec(sites=[a.site], arch="topk", widths=[a.width], ks=[a.k])],
                      tokens=a.tokens, batch_size=a.batch, seed=a.seed, checkpoint_every=0)
    trainer = trainer_for(cfg, tempfile.mkdtemp())
    return (b[a.site] for b in trainer._batches()), trainer.norm_scalars[a.site], trainer.steps


def sparsify(a, batches, steps: int):
    args = Namespace(d_in=a.d_in, d_sae=a.width, k=a.k, sparsify_optimizer="signum")
    current = {}

    def batch(i):
        if i not in current:
            current.clear()
            current[i] = next(batches)
        return current[i]

    step, l0, _, final = sparsify_stepper(args, batch)
    for i in tqdm(range(steps), desc=f"sparsify topk {a.width}", unit="step"):
        step(i, True)
    coder, since_fired = final()
    sae = build_sae(SAEConfig(arch="topk", d_in=a.d_in, d_sae=a.width, k=a.k, site=a.site, model=a.model))
    with torch.no_grad():
        sae.W_enc.copy_(coder.encoder.weight.t())
        sae.b_enc.copy_(coder.encoder.bias)
        sae.W_dec.copy_(coder.W_dec)
        sae.b_dec.copy_(coder.b_dec)
    sae.norm_scalar.fill_(1.0)
    sae.pre_encoder_bias.fill_(True)
    return sae, since_fired, f"eai-sparsify {version('eai-sparsify')}", l0()


def sae_lens(a, batches, steps: int, c: float):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(a.seed)
    scale = math.sqrt(a.d_in) / c  # expected_average_only_in: mean ‖x‖ = √d_in
    model = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=a.d_in, d_sae=a.width, jumprelu_sparsity_loss_mode="quadratic",
                                                          target_l0=a.target_l0))
    cfg = SAETrainerConfig(total_training_samples=steps * a.batch, train_batch_size_samples=a.batch)
    cfg.lr_end = cfg.lr / 10  # what its runner config fills in (unused by the constant schedule)
    trainer = SAETrainer(cfg, model, data_provider=iter(()))
    since_fired = torch.zeros(a.width, dtype=torch.long)
    active = 0.0
    for _ in tqdm(range(steps), desc=f"sae_lens jumprelu {a.width}", unit="step"):
        out = trainer.step(next(batches) * scale)
        trainer.n_training_steps += 1
        fired = (out.feature_acts > 0)
        active = float(fired.sum()) / len(fired)
        since_fired.add_(len(fired)).masked_fill_(fired.any(0), 0)
    folder = Path(tempfile.mkdtemp())
    model.save_inference_model(folder)
    sae = load_sae(folder)
    sae.norm_scalar.fill_(1 / scale)
    sae.cfg.site, sae.cfg.model = a.site, a.model
    return sae, since_fired, f"sae-lens {version('sae-lens')}", active


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--library", choices=["sparsify", "sae_lens"], required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--site", required=True)
    p.add_argument("--width", type=int, required=True)
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--out", required=True, help="the SAE folder to write")
    p.add_argument("--k", type=int, default=40)
    p.add_argument("--target-l0", type=float, default=40.0)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="gemma-3-270m-q4km")
    a = p.parse_args()
    batches, c, steps = stream(a)
    first = next(batches)
    a.d_in = first.shape[1]
    batches = (b for part in ([first], batches) for b in part)
    start = time.perf_counter()
    if a.library == "sparsify":
        sae, since_fired, who, l0 = sparsify(a, batches, steps)
    else:
        sae, since_fired, who, l0 = sae_lens(a, batches, steps, c)
    seconds = time.perf_counter() - start
    dead_tokens = max(a.tokens // 10, a.batch)
    sae.cfg.extra = {"peer": who, "final_metrics": {"dead_fraction": float((since_fired >= dead_tokens).float().mean()),
                                                    "l0": l0, "train_seconds": seconds, "steps": steps}}
    save_sae(sae, a.out, format="native")
    print(f"{who}: {a.out} ({steps} steps, {seconds:.0f} s, train L0 {l0:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
