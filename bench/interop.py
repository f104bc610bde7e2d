"""SAELens, through its own loader, reads the SAELens folders saescope writes, for SAEs trained
with each objective option, for a BatchTopK SAE before and after its per-latent conversion, and
for transcoders with and without a skip connection (SAELens's transcoder classes); and its
Gemma Scope 2 loader reads the Gemma Scope 2 folders saescope writes.

    .venv-peers/bin/python bench/interop.py        (or `make bench-interop`)

Why: a format is only as good as the peer that reads it. Runs in the peers' venv (the same pins
plus sae-lens, kept apart from ours); trains a small suite on synthetic activations, saves each
SAE as SAELens and (where that format holds it) as Gemma Scope 2, loads them with
`sae_lens.SAE.load_from_disk` and with SAELens's `gemma_3` loader (its hub lookups answered from
the disk), and compares SAELens's encode and
whole forward with saescope's on the same activations. Prints a table; exits 1 if any output differs by
more than 1e-3."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from saescope import batchtopk_to_jumprelu, load_sae, save_sae
from saescope.sae.formats import gemmascope2_dir, unfit
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
            SAESpec(sites=["resid.0"], arch="batchtopk", widths=[64], ks=[4], matryoshka=[16]),
            SAESpec(sites=["mlp_in.0"], transcoder=True, widths=[64], lambdas=[1e-2]),
            SAESpec(sites=["mlp_in.0"], transcoder=True, skip=True, widths=[64], target_l0=[6.0])]


def gemma_scope_2(folder: Path):
    """SAELens's own Gemma Scope 2 loader (its `gemma_3` conversion) on a folder of ours: the hub's
    two lookups, the config/params download and the tensor shapes, are answered from the disk."""
    from safetensors import safe_open
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.saes.sae import handle_config_defaulting

    root, name = folder.parent.parent, f"{folder.parent.name}/{folder.name}"

    def download(repo_id, filename, subfolder=None, **_):
        return str(root / (subfolder or "") / filename)

    def shapes(repo_id, filename):
        with safe_open(str(root / filename), "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}

    saved = loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes
    loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes = download, shapes
    try:
        cfg, state, _ = loaders.gemma_3_sae_huggingface_loader("google/gemma-scope-2-270m-pt", name, device="cpu")
    finally:
        loaders.hf_hub_download, loaders.get_safetensors_tensor_shapes = saved
    sae = SAE.from_dict(handle_config_defaulting(cfg))
    sae.process_state_dict_for_loading(state)
    sae.load_state_dict(state, assign=True)
    return sae


def main() -> int:
    try:
        from sae_lens import SAE
    except ImportError:
        print("bench/interop.py needs sae-lens: run it with .venv-peers/bin/python (make bench-interop)", file=sys.stderr)
        return 2

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1)) * 5 + 2
    out = Path(tempfile.mkdtemp())
    mlp = torch.tanh(x[:, :12] @ torch.randn(12, 12, generator=torch.Generator().manual_seed(2))) * 3
    train(TrainConfig(saes=suite(), tokens=60 * 256, batch_size=256, lr=1e-3), out / "run",
          source=TensorSource({"resid.0": x, "mlp_in.0": x, "mlp.0": mlp}), progress=False)
    worst, rows = 0.0, []
    for folder in sorted((out / "run" / "saes").iterdir()):
        sae = load_sae(folder)
        versions = [(folder.name, sae)]
        if sae.cfg.arch == "batchtopk":
            versions.append((f"{folder.name} → jumprelu", batchtopk_to_jumprelu(sae, x, 256)))
        readers = [("SAELens", lambda sae, i: SAE.load_from_disk(
            str(save_sae(sae, out / "saelens" / str(i), format="saelens")), device="cpu"))]
        if not unfit(sae.cfg, "gemmascope2"):
            readers.append(("Gemma Scope 2", lambda sae, i: gemma_scope_2(
                save_sae(sae, gemmascope2_dir(out / "gs2" / str(i), sae.cfg, 40), format="gemmascope2"))))
        for (name, ours), (files, read) in ((v, r) for v in versions for r in readers):
            ours.cfg.model = "gemma-3-270m"  # Gemma Scope 2's loader reads a model name
            theirs = read(ours, len(rows))
            with torch.no_grad():
                f_ours, f_theirs = ours.encode(x), theirs.encode(x)
                d_enc = float((f_ours - f_theirs).abs().max())
                # the whole forward: a skip transcoder's output is the decode plus x·A
                d_dec = float((ours(x) - theirs(x)).abs().max())
            worst = max(worst, d_enc, d_dec)
            rows.append(f"| {name} | {files} | {type(theirs).__name__} | {float((f_theirs > 0).sum(1).float().mean()):.2f} "
                        f"| {d_enc:.1e} | {d_dec:.1e} |")
    print("| saescope SAE | files | SAELens class | L0 in SAELens | max abs Δ encode | max abs Δ output |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"worst difference {worst:.1e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
