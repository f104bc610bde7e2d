"""Time saescope's real training step (forward, loss, backward, Adam, decoder-norm step).

    python bench/train_step.py --arch jumprelu|topk --d-in D --d-sae M --batch B --threads T
                               --target-s S [--k K] [--kernels auto|dense|sparse|reference]
                               [--precision float32|bfloat16|tf32] [--device cpu|cuda] [--rate-s S] [--out FILE]

The activations are synthetic and made before the timed region; a few warm-up steps run first,
then steps until S seconds have passed. For JumpReLU, --k sets every threshold at its latent's
(1 − K/M) quantile of pre-activations on the first batch, so that about K latents fire per token
(the trained regime); the line reports the measured `l0`. The same run measures the machine's
matmul rate on the step's encoder shape in the step's precision, and reports the step against the dense roofline
(6 · 2 · batch · d_in · d_sae FLOPs a step). On CUDA each step and product is synchronised before
the clock is read. Prints one JSON line and appends it to FILE."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch

from saescope.config import SAESpec, TrainConfig, validated
from saescope.errors import SaescopeError
from saescope.data import TensorSource
from saescope.train import trainer_for
from saescope.train.step_torch import tf32_products

from common import emit, step_arguments, step_line, time_steps

SITE = "resid.0"


def matmul_gflops(batch: int, d_in: int, d_sae: int, seconds: float = 1.0, precision: str = "float32",
                  device: str = "cpu") -> float:
    """Measured GFLOP/s of [batch, d_in] @ [d_in, d_sae] in `precision` (float32, tf32: float32
    on CUDA's TensorFloat-32 cores, bfloat16) on this device now."""
    kw = {"dtype": torch.bfloat16 if precision == "bfloat16" else torch.float32, "device": device}
    a, b, out = torch.randn(batch, d_in, **kw), torch.randn(d_in, d_sae, **kw), torch.empty(batch, d_sae, **kw)
    times = []
    with tf32_products(precision == "tf32"):
        torch.matmul(a, b, out=out)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds or len(times) < 3:
            t = time.perf_counter()
            torch.matmul(a, b, out=out)
            _sync(device)
            times.append(time.perf_counter() - t)
    return 2 * batch * d_in * d_sae / statistics.median(times) / 1e9


def _sync(device: str) -> None:
    """Wait for an accelerator's queued work, so that wall time is the work's time."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["jumprelu", "topk"], required=True)
    step_arguments(p)
    p.add_argument("--kernels", choices=["auto", "dense", "sparse", "reference"], default="auto",
                   help="the step's path (reference: SPEC §2 written plainly, the speed before the fast paths)")
    p.add_argument("--precision", choices=["float32", "bfloat16", "tf32"], default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--backend", choices=["torch", "jax"], default="torch", help="jax: the step in JAX (jumprelu)")
    p.add_argument("--rate-s", type=float, default=1.0, help="seconds spent measuring the matmul rate")
    return p


def measure(a: argparse.Namespace) -> dict:
    """The JSON line of one timed step (`a` as `parser` makes it). bench/gpu.py calls it for many
    shapes in one process, so the device's peak memory is reset first and the line carries this
    step's own; raises SaescopeError for settings the trainer refuses."""
    if a.threads:
        torch.set_num_threads(a.threads)
    cuda = torch.device(a.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(a.device)
    gen = torch.Generator().manual_seed(0)
    batches = [{SITE: torch.randn(a.batch, a.d_in, generator=gen).to(a.device)} for _ in range(4)]
    spec = SAESpec(sites=[SITE], arch=a.arch, widths=[a.d_sae], ks=[a.k], lambdas=[1e-4])
    cfg = validated(TrainConfig, saes=[spec], tokens=a.batch * 10**6, batch_size=a.batch, lr=7e-5, log_every=10**6,
                    checkpoint_every=10**6, kernels=a.kernels, precision=a.precision, device=a.device,
                    backend=a.backend)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for(cfg, tmp, source=TensorSource({SITE: batches[0][SITE].cpu()}))
    trainer.build(batches[0])
    sae = trainer.members[0].sae
    if a.arch == "jumprelu":
        with torch.no_grad():
            pre = sae.pre_acts(batches[0][SITE] / trainer.members[0].scale)
            sae.set_threshold(pre.quantile(1 - a.k / a.d_sae, dim=0).clamp_min(1e-3))
        if a.backend == "jax":  # the JAX state starts from the thresholds just set
            trainer.backend.reset(trainer.members[0])

    def step(i: int, timed: bool) -> None:
        trainer.train_step(batches[i % len(batches)])
        trainer.step += 1
        _sync(a.device)

    times = time_steps(step, a.warmup, a.target_s)
    member = trainer.members[0]
    l0 = float(member.sums["l0"]) / member.steps
    line = step_line(a, times, library="saescope", arch=a.arch, kernels=a.kernels, precision=a.precision, l0=l0,
                     backend=a.backend, device=torch.cuda.get_device_name(a.device) if cuda else "cpu")
    if cuda:
        line["peak_device_mib"] = torch.cuda.max_memory_allocated(a.device) / 2**20
    line["matmul_gflops"] = gflops = matmul_gflops(a.batch, a.d_in, a.d_sae, a.rate_s, a.precision, a.device)
    line["dense_roofline_fraction"] = 12 * a.batch * a.d_in * a.d_sae / line["sec_per_step_median"] / 1e9 / gflops
    return line


def main() -> int:
    a = parser().parse_args()
    try:
        line = measure(a)
    except SaescopeError as exc:
        print(f"train_step: {exc}", file=sys.stderr)
        return 2
    emit(line, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
