"""SAELens, through its own loader, reads the SAELens folders saescope writes, for SAEs trained
with each objective option, for a BatchTopK SAE before and after its per-latent conversion, and
for transcoders with and without a skip connection (SAELens's transcoder classes); its Gemma
Scope 1 loaders read the params.npz files saescope writes in a release's layout (SAEs and
transcoders), its Gemma Scope 2 loader the Gemma Scope 2 folders; circuit-tracer's Gemma Scope 2
loaders read our transcoders' and a trained cross-layer transcoder's Gemma Scope 2 files, and its
own layout's loaders read what `saescope export --format circuit-tracer` writes of that CLT and of
a set of skip transcoders.

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
from saescope.sae.formats import gemmascope2_dir, gemmascope_dir, unfit
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


def gemma_scope_1(sae, root: Path):
    """SAELens's own Gemma Scope 1 loaders (`gemma_2` for SAEs, `gemma_2_transcoder` for
    transcoders) on a params.npz of ours in a release's folder layout; its hub download is answered
    from the disk and the shapes it would take from the repository's name come from ours."""
    from sae_lens import SAE
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from sae_lens.saes.sae import handle_config_defaulting

    repo = "google/gemma-scope-2b-pt-" + ("transcoders" if sae.cfg.transcoder else "res")
    folder = gemmascope_dir(root / repo, 0, 16384, 6)  # the folder names a width; the overrides say ours
    save_sae(sae, folder, format="gemmascope")
    name = folder.relative_to(root / repo).as_posix()

    def download(repo_id, filename, subfolder=None, **_):
        return str(root / repo_id / (subfolder or "") / filename)

    saved = loaders.hf_hub_download
    loaders.hf_hub_download = download
    load = loaders.gemma_2_transcoder_huggingface_loader if sae.cfg.transcoder else loaders.gemma_2_sae_huggingface_loader
    overrides = {"d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, **({"d_out": sae.cfg.width_out} if sae.cfg.transcoder else {})}
    try:
        cfg, state, _ = load(repo, name, device="cpu", cfg_overrides=overrides)
    finally:
        loaders.hf_hub_download = saved
    theirs = SAE.from_dict(handle_config_defaulting(cfg))
    theirs.process_state_dict_for_loading(state)
    theirs.load_state_dict(state, assign=True)
    back = load_sae(folder / "params.npz")  # and ours reads the same file back with its site and kind
    assert back.cfg.transcoder == sae.cfg.transcoder and back.cfg.site == ("ln2.0" if sae.cfg.transcoder else "resid.0")
    return theirs


def multi_layer(out: Path, x: torch.Tensor) -> tuple:
    """A 3-layer CLT and a set of skip transcoders at layers 0–2, trained on synthetic MLPs."""
    from saescope import load_dictionary

    g = torch.Generator().manual_seed(4)
    acts = {f"mlp_in.{i}": x.roll(i, 1) for i in range(3)}
    acts.update({f"mlp.{i}": torch.tanh(acts[f"mlp_in.{i}"] @ torch.randn(16, 16, generator=g) / 4) * 3 for i in range(3)})
    sites = list(acts)[:3]
    specs = [SAESpec(sites=sites, clt=True, widths=[64], target_l0=[6]),
             SAESpec(sites=sites, transcoder=True, skip=True, widths=[64], target_l0=[6])]
    train(TrainConfig(saes=specs, tokens=60 * 256, batch_size=256), out / "multi", source=TensorSource(acts), progress=False)
    found = sorted((out / "multi" / "saes").iterdir())
    clt = load_dictionary(next(f for f in found if "-clt-" in f.name))
    return clt, [load_sae(f) for f in found if "-tc-" in f.name], acts


def circuit_tracer_rows(out: Path, x: torch.Tensor, transcoders: list) -> tuple[list[tuple], float]:
    """circuit-tracer's loaders on our files: its Gemma Scope 2 loaders on each single-layer
    transcoder's params.safetensors and on a trained CLT's params_layer_{i} files, and its own
    layout's loaders (`load_clt`, `load_transcoders` of a transcoder set) on `saescope export
    --format circuit-tracer`'s folders. Rows of the table and the largest difference."""
    import yaml
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt, load_gemma_scope_2_clt
    from circuit_tracer.transcoder.single_layer_transcoder import load_gemma_scope_2_transcoder, load_transcoder_set

    from saescope import save_dictionary
    from saescope.sae.export import export_saes

    cpu, rows, worst = torch.device("cpu"), [], 0.0
    for name, ours in transcoders:
        folder = save_sae(ours, gemmascope2_dir(out / "ct", ours.cfg, 40), format="gemmascope2")
        theirs = load_gemma_scope_2_transcoder(str(folder / "params.safetensors"), 0, device=cpu)
        with torch.no_grad():
            d_enc = float((ours.encode(x) - theirs.encode(x)).abs().max())
            d_out = float((ours(x) - theirs(x)).abs().max())
        worst = max(worst, d_enc, d_out)
        rows.append((name, "Gemma Scope 2", type(theirs).__name__, float((theirs.encode(x) > 0).sum(1).float().mean()),
                     d_enc, d_out))
    clt, tc_set, acts = multi_layer(out, x)
    clt = clt.fold()  # what the files hold: the same products, so no code flips at θ by rounding alone
    stacked = torch.stack([acts[s] for s in clt.cfg.sites_in])
    folder = save_dictionary(clt, out / "ct" / "clt")
    paths = {i: str(folder / f"params_layer_{i}.safetensors") for i in range(3)}
    paths[3] = paths[2]  # circuit-tracer 0.5.0 reads layers range(max(key)): one key past the last
    exported = {f.name: f for f in export_saes(out / "multi", out / "ct-own", "circuit-tracer")}
    own = next(f for name, f in exported.items() if "-clt-" in name)
    config = yaml.safe_load((own / "config.yaml").read_text())
    readers = [("Gemma Scope 2", load_gemma_scope_2_clt(paths, device=cpu, dtype=torch.float32)),
               ("circuit-tracer", load_clt(str(own), feature_input_hook=config["feature_input_hook"],
                                           feature_output_hook=config["feature_output_hook"], device=cpu,
                                           dtype=torch.float32, lazy_decoder=False))]
    for files, theirs in readers:
        with torch.no_grad():
            codes, f_theirs = clt.encode(acts), theirs.encode(stacked)
            d_enc = float(max((codes[s] - f_theirs[i]).abs().max() for i, s in enumerate(clt.cfg.sites_in)))
            y_ours, y_theirs = clt(acts), theirs(stacked)
            d_out = float(max((y_ours[s] - y_theirs[i]).abs().max() for i, s in enumerate(clt.cfg.sites_out)))
        worst = max(worst, d_enc, d_out)
        rows.append(("trained 3-layer CLT", files, type(theirs).__name__, float((f_theirs > 0).sum(-1).float().mean()),
                     d_enc, d_out))
    own = next(f for name, f in exported.items() if "-tc-" in name)
    config = yaml.safe_load((own / "config.yaml").read_text())
    # what its load_transcoders does with a transcoder_set config whose files are local (its hf_utils
    # module itself does not import against the peers' huggingface_hub)
    theirs = load_transcoder_set({i: str(own / f"layer_{i}.safetensors") for i in range(3)}, scan=config["scan"],
                                 feature_input_hook=config["feature_input_hook"],
                                 feature_output_hook=config["feature_output_hook"], device=cpu, dtype=torch.float32,
                                 lazy_encoder=False, lazy_decoder=False)
    d_enc = d_out = 0.0
    with torch.no_grad():
        for i, ours in enumerate(tc_set):
            x_i = acts[ours.cfg.site]
            d_enc = max(d_enc, float((ours.encode(x_i) - theirs.transcoders[i].encode(x_i)).abs().max()))
            d_out = max(d_out, float((ours(x_i) - theirs.transcoders[i](x_i)).abs().max()))
    worst = max(worst, d_enc, d_out)
    rows.append(("3 skip transcoders (a set)", "circuit-tracer", type(theirs).__name__,
                 float((theirs.transcoders[0].encode(acts["mlp_in.0"]) > 0).sum(-1).float().mean()), d_enc, d_out))
    return rows, worst


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
    worst, rows, by_format = 0.0, [], {}
    for folder in sorted((out / "run" / "saes").iterdir()):
        sae = load_sae(folder)
        versions = [(folder.name, sae)]
        if sae.cfg.arch == "batchtopk":
            versions.append((f"{folder.name} → jumprelu", batchtopk_to_jumprelu(sae, x, 256)))
        readers = [("SAELens folder", lambda sae, i: SAE.load_from_disk(
            str(save_sae(sae, out / "saelens" / str(i), format="saelens")), device="cpu"))]
        if not unfit(sae.cfg, "gemmascope") and sae.cfg.arch == "jumprelu":
            readers.append(("Gemma Scope 1 npz", lambda sae, i: gemma_scope_1(sae, out / "gs1" / str(i))))
        if not unfit(sae.cfg, "gemmascope2"):
            readers.append(("Gemma Scope 2", lambda sae, i: gemma_scope_2(
                save_sae(sae, gemmascope2_dir(out / "gs2" / str(i), sae.cfg, 40), format="gemmascope2"))))
        for (name, ours), (files, read) in ((v, r) for v in versions for r in readers):
            ours.cfg.model = "gemma-3-270m-q4km"  # Gemma Scope 2's loader reads a model name
            theirs = read(ours, len(rows))
            with torch.no_grad():
                f_ours, f_theirs = ours.encode(x), theirs.encode(x)
                d_enc = float((f_ours - f_theirs).abs().max())
                # the whole forward: a skip transcoder's output is the decode plus x·A
                d_dec = float((ours(x) - theirs(x)).abs().max())
            worst = max(worst, d_enc, d_dec)
            by_format[files] = max(by_format.get(files, 0.0), d_enc, d_dec)
            rows.append(f"| {name} | {files} | SAELens {type(theirs).__name__} | {float((f_theirs > 0).sum(1).float().mean()):.2f} "
                        f"| {d_enc:.1e} | {d_dec:.1e} |")
    transcoders = [(f.name, load_sae(f)) for f in sorted((out / "run" / "saes").iterdir()) if "-tc-" in f.name]
    ct_rows, ct_worst = circuit_tracer_rows(out, x, transcoders)
    worst = max(worst, ct_worst)
    by_format["circuit-tracer's loaders"] = ct_worst
    rows += [f"| {name} | {files} | circuit-tracer {cls} | {l0:.2f} | {d_enc:.1e} | {d_out:.1e} |"
             for name, files, cls, l0, d_enc, d_out in ct_rows]
    print("| saescope dictionary | files | read by | L0 there | max abs Δ encode | max abs Δ output |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    print("largest difference by format: " + ", ".join(f"{k} {v:.1e}" for k, v in by_format.items()))
    print(f"worst difference {worst:.1e} (tolerance {TOLERANCE:g})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
