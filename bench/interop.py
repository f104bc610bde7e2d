"""SAELens, through its own loader, reads the SAELens folders saescope writes, for SAEs trained
with each objective option and for a BatchTopK SAE before and after its per-latent conversion.

    .venv-peers/bin/python bench/interop.py        (or `make bench-interop`)

Why: a format is only as good as the peer that reads it. Runs in the peers' venv (the same pins
plus sae-lens, kept apart from ours); trains a small suite on synthetic activations, saves each
SAE as SAELens, loads it with `sae_lens.SAE.load_from_disk`, and compares SAELens's encode and
decode with saescope's on the same activations. Prints a table; exits 1 if any output differs by
more than 1e-3."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from saescope import batchtopk_to_jumprelu, load_sae, save_sae
from saescope.config import SAESpec, TrainConfig
from saescope.data import TensorSource
from saescope.train import train

TOLERANCE = 1e-3


def suite() -> list[SAESpec]:
    common = dict(sites=["resid.0"], widths=[64], lambdas=[1e-2])
    return [SAESpec(**common, target_l0=[6.0], sparsity="quadratic", threshold_init="quantile", frequency_penalty=1.0),
            SAESpec(**common, sparsity="tanh", matryoshka=[16, 32], dead_aux=1 / 32),
            SAESpec(**common, input_ste=True),
            SAESpec(sites=["resid.0"], arch="topk", widths=[64], ks=[4], matryoshka=[16]),
            SAESpec(sites=["resid.0"], arch="batchtopk", widths=[64], ks=[4], matryoshka=[16])]


def main() -> int:
    try:
        from sae_lens import SAE
    except ImportError:
        print("bench/interop.py needs sae-lens: run it with .venv-peers/bin/python (make bench-interop)", file=sys.stderr)
        return 2

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1)) * 5 + 2
    out = Path(tempfile.mkdtemp())
    train(TrainConfig(saes=suite(), tokens=60 * 256, batch_size=256, lr=1e-3), out / "run",
          source=TensorSource({"resid.0": x}), progress=False)
    worst, rows = 0.0, []
    for folder in sorted((out / "run" / "saes").iterdir()):
        sae = load_sae(folder)
        versions = [(folder.name, sae)]
        if sae.cfg.arch == "batchtopk":
            versions.append((f"{folder.name} → jumprelu", batchtopk_to_jumprelu(sae, x, 256)))
        for name, ours in versions:
            theirs = SAE.load_from_disk(str(save_sae(ours, out / "saelens" / str(len(rows)), format="saelens")),
                                        device="cpu")
            with torch.no_grad():
                f_ours, f_theirs = ours.encode(x), theirs.encode(x)
                d_enc = float((f_ours - f_theirs).abs().max())
                d_dec = float((ours.decode(f_ours) - theirs.decode(f_theirs)).abs().max())
            worst = max(worst, d_enc, d_dec)
            rows.append(f"| {name} | {type(theirs).__name__} | {float((f_theirs > 0).sum(1).float().mean()):.2f} "
                        f"| {d_enc:.1e} | {d_dec:.1e} |")
    print("| saescope SAE (SAELens folder) | SAELens class | L0 in SAELens | max abs Δ encode | max abs Δ decode |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"worst difference {worst:.1e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
