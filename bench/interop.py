"""SAELens, through its own loader, reads the SAELens folders saescope writes, for SAEs trained
with each objective option, for a BatchTopK SAE before and after its per-latent conversion, and
for transcoders with and without a skip connection (SAELens's transcoder classes); its Gemma
Scope 2 loader reads the Gemma Scope 2 folders saescope writes; and circuit-tracer's Gemma Scope 2
loaders read our transcoders' and a cross-layer transcoder's Gemma Scope 2 files.

    .venv-peers/bin/python bench/interop.py        (or `make bench-interop`)

Why: a format is only as good as the peer that reads it. Runs in the peers' venv (the same pins
plus sae-lens and circuit-tracer's loaders, kept apart from ours); trains a small suite on synthetic activations, saves each
SAE as SAELens and (where that format holds it) as Gemma Scope 2, loads them with
`sae_lens.SAE.load_from_disk` and with SAELens's `gemma_3` loader (its hub lookups answered from
the disk), and compares SAELens's encode and
whole forward with saescope's on the same activations. Prints a table; exits 1 if any output differs by
more than 1e-3."""

from __future__ import annotations

import importlib.util
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


def circuit_tracer_rows(out: Path, x: torch.Tensor, transcoders: list) -> tuple[list[str], float]:
    """circuit-tracer's own Gemma Scope 2 loaders on our files: each single-layer transcoder's
    params.safetensors, and a cross-layer transcoder's params_layer_{i} files (random weights:
    saescope does not train CLTs yet). Rows of the table and the largest difference."""
    from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_gemma_scope_2_transcoder

    from saescope import MultiLayerConfig, MultiLayerDictionary, save_dictionary

    cpu, rows, worst = torch.device("cpu"), [], 0.0
    for name, ours in transcoders:
        folder = save_sae(ours, gemmascope2_dir(out / "ct", ours.cfg, 40), format="gemmascope2")
        theirs = load_gemma_scope_2_transcoder(str(folder / "params.safetensors"), 0, device=cpu)
        with torch.no_grad():
            d_enc = float((ours.encode(x) - theirs.encode(x)).abs().max())
            d_out = float((ours(x) - theirs(x)).abs().max())
        worst = max(worst, d_enc, d_out)
        rows.append((name, type(theirs).__name__, float((theirs.encode(x) > 0).sum(1).float().mean()), d_enc, d_out))
    clt = MultiLayerDictionary(MultiLayerConfig(kind="clt", sites_in=["mlp_in.0", "mlp_in.1", "mlp_in.2"],
                                                sites_out=["mlp.0", "mlp.1", "mlp.2"], d_in=16, d_out=16, d_sae=64))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        clt.theta.copy_(torch.rand(clt.theta.shape, generator=g))
        clt.scale_in.copy_(torch.tensor([2.0, 5.0, 3.0]))
    folder = save_dictionary(clt, out / "ct" / "clt")
    paths = {i: str(folder / f"params_layer_{i}.safetensors") for i in range(3)}
    paths[3] = paths[2]  # circuit-tracer 0.5.0 reads layers range(max(key)): one key past the last
    theirs = load_gemma_scope_2_clt(paths, device=cpu, dtype=torch.float32)
    acts = {s: x.roll(i, 1) for i, s in enumerate(clt.cfg.sites_in)}
    stacked = torch.stack([acts[s] for s in clt.cfg.sites_in])
    clt = clt.fold()  # what the files hold: the same products, so no code flips at θ by rounding alone
    with torch.no_grad():
        codes, f_theirs = clt.encode(acts), theirs.encode(stacked)
        d_enc = float(max((codes[s] - f_theirs[i]).abs().max() for i, s in enumerate(clt.cfg.sites_in)))
        y_ours, y_theirs = clt(acts), theirs(stacked)
        d_out = float(max((y_ours[s] - y_theirs[i]).abs().max() for i, s in enumerate(clt.cfg.sites_out)))
    rows.append(("random 3-layer CLT", type(theirs).__name__, float((f_theirs > 0).sum(-1).float().mean()), d_enc, d_out))
    return rows, max(worst, d_enc, d_out)


def main() -> int:
    try:
        from sae_lens import SAE
        if importlib.util.find_spec("circuit_tracer") is None:
            raise ImportError("no module named circuit_tracer")
    except ImportError as exc:
        print(f"bench/interop.py needs sae-lens and circuit-tracer ({exc}): run it with .venv-peers/bin/python "
              "(make bench-interop; an older .venv-peers: pip install --no-deps circuit-tracer==0.5.0)", file=sys.stderr)
        return 2

    x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(1)) * 5 + 2
    out = Path(tempfile.mkdtemp())
    mlp = torch.tanh(x @ torch.randn(16, 16, generator=torch.Generator().manual_seed(2)) / 4) * 3  # d_out = d_in, as a model's MLP
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
            rows.append(f"| {name} | {files} | SAELens {type(theirs).__name__} | {float((f_theirs > 0).sum(1).float().mean()):.2f} "
                        f"| {d_enc:.1e} | {d_dec:.1e} |")
    transcoders = [(f.name, load_sae(f)) for f in sorted((out / "run" / "saes").iterdir()) if "-tc-" in f.name]
    ct_rows, ct_worst = circuit_tracer_rows(out, x, transcoders)
    worst = max(worst, ct_worst)
    rows += [f"| {name} | Gemma Scope 2 | circuit-tracer {cls} | {l0:.2f} | {d_enc:.1e} | {d_out:.1e} |"
             for name, cls, l0, d_enc, d_out in ct_rows]
    print("| saescope dictionary | files | read by | L0 there | max abs Δ encode | max abs Δ output |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"worst difference {worst:.1e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
