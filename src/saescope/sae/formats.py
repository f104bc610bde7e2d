"""Saving and loading SAEs in the three formats (SPEC §3): the Gemma Scope `params.npz` layout,
the SAELens folder, and our own native folder. `load_sae` tells them apart by their files."""

from __future__ import annotations

import hashlib
import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import SaescopeError, first_line
from ..files import atomic_write, read_json, write_json
from ..site import Site
from .base import SAEConfig, SparseAutoencoder

FORMATS = ("gemmascope", "saelens", "native")
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
NATIVE_CONFIG, NATIVE_WEIGHTS = "config.json", "sae.safetensors"
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
_SAELENS_ARCH = {"jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}
_GEMMASCOPE_KIND = {"res": "resid", "mlp": "mlp", "att": "attn"}


def width_label(d_sae: int) -> str:
    """Gemma Scope's folder name for a width: 16384 → 16k, 65536 → 65k, 2^20 → 1m."""
    if d_sae >= 2**20 and d_sae % 2**20 == 0:
        return f"{d_sae // 2**20}m"
    return f"{d_sae // 1000}k" if d_sae >= 1000 else str(d_sae)


def gemmascope_dir(root: str | os.PathLike, layer: int, d_sae: int, l0: float) -> Path:
    """root/layer_{L}/width_{W}/average_l0_{K}, K the mean L0 rounded."""
    return Path(root) / f"layer_{layer}" / f"width_{width_label(d_sae)}" / f"average_l0_{round(l0)}"


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike, format: str = "native") -> Path:
    """Write `sae` into the folder `path`; gemmascope and saelens hold the folded (released) form."""
    path = Path(path)
    # the config goes last, and an old one first: a folder is an SAE once both files are there,
    # so an interrupted save leaves "holds no SAE", never new weights under an old config
    config = {"native": NATIVE_CONFIG, "saelens": SAELENS_CONFIG}.get(format)
    if config:
        (path / config).unlink(missing_ok=True)
    if format == "native":
        state = {k: v.detach().contiguous() for k, v in sae.state_dict().items()}
        data = st_save(state)
        atomic_write(path / NATIVE_WEIGHTS, data)
        meta = {"format": "saescope-sae", "version": 1, "config": sae.cfg.to_dict(),
                "sha256": hashlib.sha256(data).hexdigest()}
        write_json(path / NATIVE_CONFIG, meta)
        return path
    if format not in FORMATS:
        raise SaescopeError(f"unknown SAE format '{format}'; available: {', '.join(FORMATS)}")
    if sae.cfg.arch == "topk" and format == "gemmascope":
        raise SaescopeError("the Gemma Scope format holds JumpReLU SAEs; save a topk SAE as saelens or native")
    folded = sae.fold() if not sae.folded else sae
    arrays = {"W_enc": folded.W_enc, "W_dec": folded.W_dec, "b_enc": folded.b_enc, "b_dec": folded.b_dec,
              "threshold": folded.threshold}
    arrays = {k: v.detach().float().cpu().contiguous() for k, v in arrays.items()}
    if format == "gemmascope":
        buf = io.BytesIO()
        np.savez(buf, **{k: v.numpy() for k, v in arrays.items()})
        atomic_write(path / "params.npz", buf.getvalue())
        return path
    cfg = sae.cfg
    if cfg.arch == "topk":
        del arrays["threshold"]
    site = Site.parse(cfg.site) if cfg.site else None
    saelens = {
        "architecture": _SAELENS_ARCH[cfg.arch], "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
        "model_name": cfg.model, "hook_name": site.tl_name if site else None,
        "hook_layer": site.layer if site else None, "hook_head_index": None,
        "apply_b_dec_to_input": False, "normalize_activations": "none", "prepend_bos": True,
        "activation_fn_str": "topk" if cfg.arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.arch == "topk" else {},
        "saescope": {"arch": cfg.arch, "site": cfg.site, "target_site": cfg.target_site, "d_out": cfg.d_out, "k": cfg.k},
    }
    data = st_save(arrays)
    saelens["saescope"]["sha256"] = hashlib.sha256(data).hexdigest()
    atomic_write(path / SAELENS_WEIGHTS, data)
    write_json(path / SAELENS_CONFIG, saelens)
    return path


def detect_format(path: str | os.PathLike) -> str | None:
    """"native", "saelens" or "gemmascope" by the files at `path`, or None if it holds no SAE."""
    path = Path(path)
    if path.is_file():
        return "gemmascope" if path.name == "params.npz" else None
    if (path / NATIVE_CONFIG).is_file() and (path / NATIVE_WEIGHTS).is_file():
        return "native"
    if (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / "params.npz").is_file():
        return "gemmascope"
    return None


def resolve_sae_path(path: str | os.PathLike) -> Path:
    """`path` itself, or for a Gemma Scope `.../width_W/canonical` the sibling with L0 closest to 100."""
    path = Path(path)
    return _canonical(path.parent) if path.name == "canonical" and not path.exists() else path


def load_sae(path: str | os.PathLike) -> SparseAutoencoder:
    """Load an SAE from a native folder, a SAELens folder, a Gemma Scope `params.npz` (or its
    folder), or a Gemma Scope `.../width_W/canonical` path (the sibling with L0 closest to 100)."""
    path = resolve_sae_path(path)
    if not path.exists():
        raise SaescopeError(f"SAE not found: {path}")
    fmt = detect_format(path)
    if fmt == "native":
        return _load_native(path)
    if fmt == "saelens":
        return _load_saelens(path)
    if fmt == "gemmascope":
        return _load_gemmascope(path if path.is_file() else path / "params.npz")
    raise SaescopeError(f"{path} holds no SAE: expected params.npz (Gemma Scope), cfg.json + "
                        f"sae_weights.safetensors (SAELens) or config.json + sae.safetensors (saescope)")


def _canonical(width_dir: Path) -> Path:
    found = []
    for d in width_dir.glob("average_l0_*"):
        m = re.fullmatch(r"average_l0_(\d+)", d.name)
        if m and d.is_dir():
            found.append((abs(int(m[1]) - 100), int(m[1]), d))
    if not found:
        raise SaescopeError(f"no average_l0_* folders under {width_dir} to pick the canonical SAE from")
    return min(found)[2]


def _read_safetensors(path: Path, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; when its config records a sha256 (ours do), checked first."""
    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SaescopeError(f"{path} does not match the sha256 its config records: damaged or altered")
    try:
        return st_load(data)
    except SafetensorError as exc:
        raise SaescopeError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def _from_arrays(arrays: dict[str, torch.Tensor], cfg_values: dict, where: Path) -> SparseAutoencoder:
    from . import build_sae

    need = [k for k in PARAMS if k != "threshold" or cfg_values.get("arch", "jumprelu") != "topk"]
    missing = [k for k in need if k not in arrays]
    if missing:
        raise SaescopeError(f"{where} lacks {', '.join(missing)}")
    d_in, d_sae = arrays["W_enc"].shape if arrays["W_enc"].dim() == 2 else (0, 0)
    d_out = arrays["W_dec"].shape[1] if arrays["W_dec"].dim() == 2 else 0
    expected = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_out), "b_enc": (d_sae,), "b_dec": (d_out,), "threshold": (d_sae,)}
    for k in need:
        if tuple(arrays[k].shape) != expected[k] or d_in == 0:
            raise SaescopeError(f"{where}: {k} has shape {tuple(arrays[k].shape)}, expected {expected[k]} "
                                f"(from W_enc {tuple(arrays['W_enc'].shape)})")
    values = {**cfg_values, "d_in": int(d_in), "d_sae": int(d_sae)}
    if d_out != d_in:
        values["d_out"] = int(d_out)
    sae = build_sae(SAEConfig(**values))
    with torch.no_grad():
        for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, k).copy_(arrays[k].float())
        if "threshold" in need:
            if sae.cfg.arch == "jumprelu":
                sae.set_threshold(arrays["threshold"].float())
            elif (arrays["threshold"] != 0).any():
                sae.shared_threshold.fill_(float(arrays["threshold"][0]))
    return sae


def _load_gemmascope(path: Path) -> SparseAutoencoder:
    if not zipfile.is_zipfile(path):  # np.load would otherwise try a pickle
        raise SaescopeError(f"{path} is not a readable npz file (not a zip archive, or truncated)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(np.ascontiguousarray(npz[k], dtype=np.float32)) for k in npz.files}
    except ValueError as exc:  # object arrays refuse to load without pickle
        raise SaescopeError(f"{path} holds arrays that need unpickling; refused ({exc})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SaescopeError(f"{path} is not a readable npz file ({exc})") from None
    return _from_arrays(arrays, _gemmascope_provenance(path), path)


def _gemmascope_provenance(path: Path) -> dict:
    """Site and model from a release path like gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71."""
    text = path.resolve().as_posix()
    layer = re.search(r"/layer_(\d+)/", text)
    repo = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)", text)
    if not layer or not repo:
        return {}
    size, kind, L = repo[1], repo[3], int(layer[1])
    values: dict = {"model": f"gemma-2-{size}" + ("-it" if repo[2] == "it" else "")}
    if kind == "transcoders":
        values.update(site=f"mlp_in.{L}", target_site=f"mlp.{L}")
    else:
        values["site"] = f"{_GEMMASCOPE_KIND[kind]}.{L}"
    return values


def _load_saelens(path: Path) -> SparseAutoencoder:
    cfg = read_json(path / SAELENS_CONFIG)
    meta = cfg.get("metadata") or {}
    arch = cfg.get("architecture", "standard")
    ours = cfg.get("saescope") or {}
    arch = ours.get("arch") or {"jumprelu": "jumprelu", "topk": "topk", "standard": "relu"}.get(arch)
    if arch is None:
        raise SaescopeError(f"{path / SAELENS_CONFIG}: unsupported architecture '{cfg.get('architecture')}'")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise SaescopeError(f"{path / SAELENS_CONFIG}: normalize_activations '{norm}' is not supported; only 'none'")
    hook = cfg.get("hook_name") or meta.get("hook_name")
    site = ours.get("site")
    if site is None and hook:
        try:
            site = str(Site.parse(hook))
        except SaescopeError:
            site = None  # a hook we have no site for: load it, but unbound
    values = {"arch": arch, "site": site, "target_site": ours.get("target_site"),
              "model": cfg.get("model_name") or meta.get("model_name")}
    if arch in ("topk", "batchtopk"):
        values["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k") or cfg.get("k") or ours.get("k")
    sae = _from_arrays(_read_safetensors(path / SAELENS_WEIGHTS, ours.get("sha256")), values, path)
    if cfg.get("apply_b_dec_to_input"):
        sae.pre_encoder_bias.fill_(True)
    return sae


def _load_native(path: Path) -> SparseAutoencoder:
    from . import build_sae

    meta = read_json(path / NATIVE_CONFIG)
    if meta.get("format") != "saescope-sae":
        raise SaescopeError(f"{path / NATIVE_CONFIG} is not a saescope SAE config")
    try:
        sae = build_sae(SAEConfig(**meta["config"]))
    except TypeError as exc:
        raise SaescopeError(f"{path / NATIVE_CONFIG}: bad config ({exc})") from None
    state = _read_safetensors(path / NATIVE_WEIGHTS, meta.get("sha256"))
    own = sae.state_dict()
    for k, v in own.items():
        if k not in state:
            raise SaescopeError(f"{path / NATIVE_WEIGHTS} lacks {k}")
        if state[k].shape != v.shape:
            raise SaescopeError(f"{path / NATIVE_WEIGHTS}: {k} has shape {tuple(state[k].shape)}, config says {tuple(v.shape)}")
    sae.load_state_dict(state)
    return sae
