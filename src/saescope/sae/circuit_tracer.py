"""circuit-tracer's own layout (SPEC §8), what its `load_transcoders` reads from a folder: a
`config.yaml` naming the kind and the hooks, and for a transcoder set `layer_{i}.safetensors`
(W_enc [F, d] — transposed against ours —, W_dec [F, d], b_enc, b_dec,
`activation_function.threshold`, and W_skip [d_out, d_in], which it applies as x·W_skipᵀ), or for
a cross-layer transcoder `W_enc_{i}.safetensors` (W_enc_i [F, d], b_enc_i, b_dec_i, threshold_i)
and `W_dec_{i}.safetensors` (W_dec_i [F, L − i, d]). Both cover every layer from 0: its replacement
model replaces every MLP. The hooks are its names for Gemma's MLP input after the
pre-feed-forward norm (our mlp_in.L) and output after the post-feed-forward norm (our mlp.L)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from ..errors import SaescopeError
from ..files import atomic_write, read_safetensors, write_safetensors
from ..site import Site
from . import build_sae
from .base import SAEConfig, SparseAutoencoder
from .jumprelu import JumpReLUSAE
from .multilayer import MultiLayerConfig, MultiLayerDictionary

CONFIG = "config.yaml"
HOOKS = {"feature_input_hook": "mlp.hook_in", "feature_output_hook": "hook_mlp_out"}


def _check_layers(sites: list[str], what: str) -> None:
    parsed = [Site.parse(s) for s in sites]
    if any(s.kind != "mlp_in" for s in parsed) or [s.layer for s in parsed] != list(range(len(parsed))):
        raise SaescopeError(f"circuit-tracer reads {what} over mlp_in.0, mlp_in.1, … every layer from 0 (its "
                            f"replacement model replaces every MLP); got {', '.join(sites)}")


def _write(path: Path, name: str, tensors: dict[str, torch.Tensor]) -> str:
    return write_safetensors(path / name, {k: v.float().cpu() for k, v in tensors.items()})


def check_circuit_tracer(d: MultiLayerDictionary | list[SparseAutoencoder]) -> None:
    """Raise the one-line reason circuit-tracer cannot read `d`, if there is one."""
    if isinstance(d, MultiLayerDictionary):
        if d.cfg.kind != "clt" or d.cfg.arch == "topk":
            raise SaescopeError(f"circuit-tracer reads JumpReLU cross-layer transcoders and transcoder sets, not a "
                                f"{d.cfg.arch} {d.cfg.kind}")
        _check_layers(d.cfg.sites_in, "a cross-layer transcoder")
        return
    bad = [s for s in d if not s.cfg.transcoder or s.cfg.arch not in ("jumprelu", "relu", "batchtopk")]
    if bad:
        raise SaescopeError(f"circuit-tracer's transcoder sets hold JumpReLU or ReLU transcoders; "
                            f"{bad[0].cfg.site} is a {bad[0].cfg.arch} {'transcoder' if bad[0].cfg.transcoder else 'SAE'}")
    _check_layers([s.cfg.site for s in sorted(d, key=lambda s: Site.parse(s.cfg.site).layer)], "a transcoder set")
    if len({s.cfg.skip for s in d}) > 1:
        raise SaescopeError("circuit-tracer's transcoder set has a skip on every layer or on none")


def save_circuit_tracer(d: MultiLayerDictionary | list[SparseAutoencoder], path: str | os.PathLike, scan: str) -> Path:
    """Write a CLT, or transcoders for layers 0…L−1 (a transcoder set), into the folder `path`."""
    check_circuit_tracer(d)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hashes = {}
    if isinstance(d, MultiLayerDictionary):
        f = d.fold()
        for i in range(f.cfg.n_layers):
            hashes[f"W_enc_{i}.safetensors"] = _write(path, f"W_enc_{i}.safetensors", {
                f"W_enc_{i}": f.W_enc[i].T, f"b_enc_{i}": f.b_enc[i], f"b_dec_{i}": f.b_dec[i], f"threshold_{i}": f.theta[i]})
            hashes[f"W_dec_{i}.safetensors"] = _write(path, f"W_dec_{i}.safetensors", {f"W_dec_{i}": f.W_dec[i]})
        kind = "cross_layer_transcoder"
    else:
        for i, sae in enumerate(sorted(d, key=lambda s: Site.parse(s.cfg.site).layer)):
            f = sae.fold()
            tensors = {"W_enc": f.W_enc.T, "W_dec": f.W_dec, "b_enc": f.b_enc, "b_dec": f.b_dec}
            if f.cfg.arch != "relu":
                tensors["activation_function.threshold"] = f.threshold
            if f.cfg.skip:
                tensors["W_skip"] = f.W_skip.T
            hashes[f"layer_{i}.safetensors"] = _write(path, f"layer_{i}.safetensors", tensors)
        kind = "transcoder_set"
    config = {"model_kind": kind, **HOOKS, "scan": scan, "saescope": {"sha256": hashes}}
    atomic_write(path / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())
    return path


def is_circuit_tracer(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / CONFIG).is_file() and ((path / "layer_0.safetensors").is_file() or (path / "W_enc_0.safetensors").is_file())


def load_circuit_tracer(path: str | os.PathLike) -> MultiLayerDictionary | list[SparseAutoencoder]:
    """A circuit-tracer folder back: a CLT as a MultiLayerDictionary, a transcoder set as its
    transcoders in layer order (sites mlp_in.L → mlp.L)."""
    path = Path(path)
    try:
        config = yaml.safe_load((path / CONFIG).read_text())
    except yaml.YAMLError as exc:
        raise SaescopeError(f"{path / CONFIG} cannot be parsed: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict) or config.get("model_kind") not in ("transcoder_set", "cross_layer_transcoder"):
        raise SaescopeError(f"{path / CONFIG}: model_kind should be transcoder_set or cross_layer_transcoder")
    if config.get("feature_input_hook") != HOOKS["feature_input_hook"] or config.get("feature_output_hook") != HOOKS["feature_output_hook"]:
        raise SaescopeError(f"{path / CONFIG}: hooks {config.get('feature_input_hook')} → {config.get('feature_output_hook')} "
                            f"name no saescope sites (read: {HOOKS['feature_input_hook']} → {HOOKS['feature_output_hook']})")
    hashes = (config.get("saescope") or {}).get("sha256") or {}
    if config["model_kind"] == "cross_layer_transcoder":
        n = len(list(path.glob("W_enc_*.safetensors")))
        enc = [read_safetensors(path / f"W_enc_{i}.safetensors", hashes.get(f"W_enc_{i}.safetensors")) for i in range(n)]
        dec = [read_safetensors(path / f"W_dec_{i}.safetensors", hashes.get(f"W_dec_{i}.safetensors"))[f"W_dec_{i}"]
               for i in range(n)]
        d_sae, d_in = enc[0]["W_enc_0"].shape
        d = MultiLayerDictionary(MultiLayerConfig(kind="clt", sites_in=[f"mlp_in.{i}" for i in range(n)],
                                                  sites_out=[f"mlp.{i}" for i in range(n)], d_in=int(d_in),
                                                  d_out=int(dec[0].shape[-1]), d_sae=int(d_sae)))
        with torch.no_grad():
            for i, (t, w) in enumerate(zip(enc, dec)):
                if tuple(w.shape) != (d_sae, n - i, d.cfg.d_out):
                    raise SaescopeError(f"{path / f'W_dec_{i}.safetensors'}: W_dec_{i} should be "
                                        f"{(int(d_sae), n - i, d.cfg.d_out)}, got {tuple(w.shape)}")
                d.set_group(i, w_enc=t[f"W_enc_{i}"].T, b_enc=t[f"b_enc_{i}"], w_dec=w, threshold=t[f"threshold_{i}"].flatten())
                d.b_dec[i].copy_(t[f"b_dec_{i}"])
        return d
    saes = []
    for i in range(len(list(path.glob("layer_*.safetensors")))):
        t = read_safetensors(path / f"layer_{i}.safetensors", hashes.get(f"layer_{i}.safetensors"))
        d_sae, d_in = t["W_enc"].shape
        threshold = t.get("activation_function.threshold")
        sae = build_sae(SAEConfig(arch="jumprelu" if threshold is not None else "relu", d_in=int(d_in), d_sae=int(d_sae),
                                  d_out=int(t["W_dec"].shape[1]), site=f"mlp_in.{i}", target_site=f"mlp.{i}",
                                  skip="W_skip" in t))
        with torch.no_grad():
            sae.W_enc.copy_(t["W_enc"].T)
            sae.W_dec.copy_(t["W_dec"])
            sae.b_enc.copy_(t["b_enc"])
            sae.b_dec.copy_(t["b_dec"])
            if isinstance(sae, JumpReLUSAE):
                sae.set_threshold(threshold)
            if sae.cfg.skip:
                sae.W_skip.copy_(t["W_skip"].T)
        saes.append(sae)
    return saes
