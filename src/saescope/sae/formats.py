"""Saving and loading SAEs in four formats: the Gemma Scope `params.npz` layout (SPEC §3), Gemma
Scope 2's folder (SPEC §8: `params.safetensors` + `config.json`), the SAELens folder, and our own
native folder. `load_sae` tells them apart by their files."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SaescopeError
from ..files import atomic_write, read_json, read_safetensors, write_json, write_safetensors
from ..lm.loading import model_provenance
from ..site import TRANSCODER_INPUTS, Site
from .base import SAEConfig, SparseAutoencoder
from .circuit_tracer import is_circuit_tracer, load_circuit_tracer
from .multilayer import MultiLayerConfig, MultiLayerDictionary

FORMATS = ("gemmascope", "gemmascope2", "saelens", "native")
PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")
NATIVE_CONFIG, NATIVE_WEIGHTS = "config.json", "sae.safetensors"
SAELENS_CONFIG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
GS2_CONFIG, GS2_PARAMS = "config.json", "params.safetensors"
GS2_LAYER = "params_layer_{}.safetensors"          # a multi-layer dictionary's input layer i
NATIVE_MULTI_WEIGHTS = "dictionary.safetensors"    # beside config.json: a multi-layer dictionary, native
# Gemma Scope 2's names of our parameters (its affine_skip_connection is d_in × d_out, as our W_skip)
_GS2_NAMES = {"W_enc": "w_enc", "W_dec": "w_dec", "b_enc": "b_enc", "b_dec": "b_dec", "threshold": "threshold",
              "W_skip": "affine_skip_connection"}
_GS2_FOLDER = {"resid": "resid_post", "attn": "attn_out", "mlp": "mlp_out"}
_SAELENS_ARCH = {"jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu", "relu": "standard"}
# SAELens's transcoder classes, by (our arch, skip); its W_skip is stored d_out × d_in, the transpose of ours
_SAELENS_TRANSCODER = {("jumprelu", False): "jumprelu_transcoder", ("jumprelu", True): "jumprelu_skip_transcoder",
                       ("batchtopk", False): "jumprelu_transcoder", ("batchtopk", True): "jumprelu_skip_transcoder",
                       ("relu", False): "transcoder", ("relu", True): "skip_transcoder"}
_FROM_SAELENS = {"jumprelu": ("jumprelu", False), "topk": ("topk", False), "standard": ("relu", False),
                 "jumprelu_transcoder": ("jumprelu", False), "jumprelu_skip_transcoder": ("jumprelu", True),
                 "transcoder": ("relu", False), "skip_transcoder": ("relu", True)}
_GEMMASCOPE_KIND = {"res": "resid", "mlp": "mlp", "att": "attn"}


def width_label(d_sae: int) -> str:
    """Gemma Scope's folder name for a width: 16384 → 16k, 65536 → 65k, 2^20 → 1m."""
    if d_sae >= 2**20 and d_sae % 2**20 == 0:
        return f"{d_sae // 2**20}m"
    return f"{d_sae // 1000}k" if d_sae >= 1000 else str(d_sae)


def gemmascope_dir(root: str | os.PathLike, layer: int, d_sae: int, l0: float) -> Path:
    """root/layer_{L}/width_{W}/average_l0_{K}, K the mean L0 rounded."""
    return Path(root) / f"layer_{layer}" / f"width_{width_label(d_sae)}" / f"average_l0_{round(l0)}"


# Gemma Scope 2 names an SAE's L0 by its target: about 20, 60 and 150 in the 4-layer sweeps, 20 and
# 120 (scaled down in early layers) in the all-layer sets (SPEC §7)
L0_LABELS = {"small": (16, 25), "medium": (48, 75), "big": (96, 188)}


def l0_label(l0: float) -> str:
    """Gemma Scope 2's name for a target L0 (small, medium, big), or the L0 rounded where none fits."""
    return next((name for name, (lo, hi) in L0_LABELS.items() if lo <= l0 <= hi), str(round(l0)))


def gemmascope2_dir(root: str | os.PathLike, cfg: SAEConfig, l0: float) -> Path:
    """Gemma Scope 2's folder for an SAE: root/{resid_post,attn_out,mlp_out,transcoder}/
    layer_{L}_width_{W}_l0_{label}[_affine], the label that of the target (or measured) L0, _affine
    for a skip."""
    reason = unfit(cfg, "gemmascope2")
    if reason:
        raise SaescopeError(reason)
    site = Site.parse(cfg.site)
    kind = "transcoder" if cfg.transcoder else _GS2_FOLDER[site.kind]
    name = f"layer_{site.layer}_width_{width_label(cfg.d_sae)}_l0_{l0_label(l0)}" + ("_affine" if cfg.skip else "")
    return Path(root) / kind / name


def unfit(cfg: SAEConfig, format: str) -> str | None:
    """Why `format` cannot hold an SAE of this kind, or None if it can."""
    if format in ("gemmascope", "gemmascope2") and cfg.arch == "topk":
        name = {"gemmascope": "Gemma Scope", "gemmascope2": "Gemma Scope 2"}[format]
        return f"the {name} format holds JumpReLU SAEs; save a topk SAE as saelens or native"
    if format == "gemmascope2" and not cfg.site:
        return "Gemma Scope 2's config.json names the SAE's site (hf_hook_point_in); this SAE has none"
    if format == "gemmascope2":
        kind = Site.parse(cfg.site).kind
        if (kind != "mlp_in") if cfg.transcoder else (kind not in _GS2_FOLDER):
            return (f"Gemma Scope 2 has no folder for {'transcoders' if cfg.transcoder else 'SAEs'} of {kind} sites "
                    f"({'its transcoders read mlp_in' if cfg.transcoder else 'its SAEs read ' + ', '.join(_GS2_FOLDER)}); "
                    "save it as saelens or native")
    if format == "gemmascope" and cfg.skip:
        return "Gemma Scope's params.npz has no skip connection; save a skip transcoder as saelens or native"
    if format == "saelens" and not cfg.site:  # SAELens refuses a config whose hook_name is null
        return ("a SAELens folder names the hook the SAE reads (hook_name) and this SAE does not say which site it "
                "reads: set sae.cfg.site (e.g. 'resid.6') before saving")
    if format == "saelens" and cfg.transcoder and cfg.arch == "topk":
        return "SAELens has no TopK transcoder (it would load as an SAE); save it as native"
    return None


def save_sae(sae: SparseAutoencoder, path: str | os.PathLike, format: str = "native") -> Path:
    """Write `sae` into the folder `path`; gemmascope and saelens hold the folded (released) form."""
    path = Path(path)
    # the config goes last, and an old one first: a folder is an SAE once both files are there,
    # so an interrupted save leaves "holds no SAE", never new weights under an old config
    config = {"native": NATIVE_CONFIG, "saelens": SAELENS_CONFIG, "gemmascope2": GS2_CONFIG}.get(format)
    if config:
        (path / config).unlink(missing_ok=True)
    if format == "native":
        meta = {"format": "saescope-sae", "version": 1, "config": sae.cfg.to_dict(),
                "sha256": write_safetensors(path / NATIVE_WEIGHTS, sae.state_dict())}
        write_json(path / NATIVE_CONFIG, meta)
        return path
    if format not in FORMATS:
        raise SaescopeError(f"unknown SAE format '{format}'; available: {', '.join(FORMATS)}")
    reason = unfit(sae.cfg, format)
    if reason:
        raise SaescopeError(reason)
    folded = sae.fold() if not sae.folded else sae
    arrays = {"W_enc": folded.W_enc, "W_dec": folded.W_dec, "b_enc": folded.b_enc, "b_dec": folded.b_dec,
              "threshold": folded.threshold}
    if sae.cfg.skip:
        arrays["W_skip"] = folded.W_skip
    arrays = {k: v.detach().float().cpu().contiguous() for k, v in arrays.items()}
    if format == "gemmascope2":
        return _save_gemmascope2(sae.cfg, arrays, path)
    if format == "gemmascope":
        buf = io.BytesIO()
        np.savez(buf, **{k: v.numpy() for k, v in arrays.items()})
        atomic_write(path / "params.npz", buf.getvalue())
        return path
    cfg = sae.cfg
    if cfg.arch == "topk":
        del arrays["threshold"]
    if cfg.skip:  # SAELens's W_skip is d_out × d_in
        arrays["W_skip"] = arrays["W_skip"].t().contiguous()
    site = Site.parse(cfg.site)
    arch = _SAELENS_TRANSCODER[cfg.arch, cfg.skip] if cfg.transcoder else _SAELENS_ARCH[cfg.arch]
    saelens = {
        "architecture": arch, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": "float32",
        "model_name": cfg.model, "hook_name": site.tl_name, "hook_layer": site.layer, "hook_head_index": None,
        "apply_b_dec_to_input": False, "normalize_activations": "none", "prepend_bos": True,
        "activation_fn_str": "topk" if cfg.arch == "topk" else "relu",
        "activation_fn_kwargs": {"k": cfg.k} if cfg.arch == "topk" else {},
        "saescope": {"arch": cfg.arch, "site": cfg.site, "target_site": cfg.target_site, "d_out": cfg.d_out, "k": cfg.k,
                     "skip": cfg.skip, **_model_source(cfg.model)},
    }
    if cfg.transcoder:
        saelens.update(d_out=cfg.width_out, hook_name_out=Site.parse(cfg.target_site).tl_name)
    saelens["saescope"]["sha256"] = write_safetensors(path / SAELENS_WEIGHTS, arrays)
    write_json(path / SAELENS_CONFIG, saelens)
    return path


def _save_gemmascope2(cfg: SAEConfig, arrays: dict[str, torch.Tensor], path: Path) -> Path:
    sha256 = write_safetensors(path / GS2_PARAMS, {_GS2_NAMES[k]: v for k, v in arrays.items()})
    site = Site.parse(cfg.site)
    final = cfg.extra.get("final_metrics", {}).get("l0")
    config = {"width": cfg.d_sae, "model_name": cfg.model, "architecture": "jump_relu",
              "l0": cfg.extra.get("target_l0") or final, "type": "transcoder" if cfg.transcoder else "sae",
              "hf_hook_point_in": site.hf_point,
              "hf_hook_point_out": Site.parse(cfg.target_site).hf_point if cfg.transcoder else site.hf_point,
              "saescope": {"arch": cfg.arch, "site": cfg.site, "target_site": cfg.target_site, "k": cfg.k,
                           "sha256": sha256, **_model_source(cfg.model)}}
    if cfg.transcoder:
        config["affine_connection"] = cfg.skip
    write_json(path / GS2_CONFIG, config)
    return path


def _model_source(model: str | None) -> dict:
    """What a file says of where its model's weights come from (the embedded GGUF's provenance)."""
    source = model_provenance(model)
    return {"model_source": source} if source else {}


def detect_format(path: str | os.PathLike) -> str | None:
    """"native", "saelens", "gemmascope2" or "gemmascope" by the files at `path`, or None if it holds no SAE."""
    path = Path(path)
    if path.is_file():
        return "gemmascope" if path.name == "params.npz" else None
    if (path / NATIVE_CONFIG).is_file() and (path / NATIVE_WEIGHTS).is_file():
        return "native"
    if (path / SAELENS_CONFIG).is_file() and (path / SAELENS_WEIGHTS).is_file():
        return "saelens"
    if (path / GS2_CONFIG).is_file() and ((path / GS2_PARAMS).is_file() or (path / GS2_LAYER.format(0)).is_file()):
        return "gemmascope2"
    if (path / NATIVE_CONFIG).is_file() and (path / NATIVE_MULTI_WEIGHTS).is_file():
        return "native"
    if (path / "params.npz").is_file():
        return "gemmascope"
    return None


def _multilayer_meta(path: Path) -> dict | None:
    """The config of a folder holding a cross-layer transcoder or crosscoder (native or Gemma Scope 2's)."""
    config = path / GS2_CONFIG
    if not (path.is_dir() and config.is_file()):
        return None
    meta = read_json(config)
    return meta if meta.get("format") == "saescope-multilayer" or meta.get("type") in ("clt", "crosscoder") else None


def is_multilayer(path: str | os.PathLike) -> bool:
    """Whether the folder holds a cross-layer transcoder or crosscoder (read by load_dictionary)."""
    return _multilayer_meta(Path(path)) is not None


def resolve_sae_path(path: str | os.PathLike) -> Path:
    """`path` itself, or for a Gemma Scope `.../width_W/canonical` the sibling with L0 closest to 100."""
    path = Path(path)
    return _canonical(path.parent) if path.name == "canonical" and not path.exists() else path


KINDS = ("sae", "transcoder")


def load_sae(path: str | os.PathLike, *, site: str | Site | None = None, kind: str | None = None) -> SparseAutoencoder:
    """Load an SAE from a native folder, a SAELens folder, a Gemma Scope `params.npz` (or its
    folder), a Gemma Scope 2 folder, or a Gemma Scope `.../width_W/canonical` path (the sibling
    with L0 closest to 100). A release's site and kind come from the path as given (a Hugging Face
    cache's symlinks are not followed: the blob they point to has no name); `site` and `kind`
    ("sae" or "transcoder") say them where the files do not, and must agree where they do."""
    given = Path(os.path.abspath(Path(path).expanduser()))
    path = resolve_sae_path(given)
    if not path.exists():
        raise SaescopeError(f"SAE not found: {path}{_existing_names(path)}")
    fmt = detect_format(path)
    if fmt == "native":
        sae, said = _load_native(path), True
    elif fmt == "saelens":
        sae, said = _load_saelens(path), True
    elif fmt == "gemmascope":
        npz = path if path.is_file() else path / "params.npz"
        provenance = _gemmascope_provenance(npz)
        sae, said = _load_gemmascope(npz, provenance), bool(provenance)
    elif fmt == "gemmascope2":
        sae, said = _load_gemmascope2(path), True
    else:
        raise SaescopeError(f"{path} holds no SAE: expected params.npz (Gemma Scope), config.json + params.safetensors "
                            f"(Gemma Scope 2), cfg.json + sae_weights.safetensors (SAELens) or config.json + "
                            f"sae.safetensors (saescope)")
    return _as_given(sae, path, site, kind, said)


def _as_given(sae: SparseAutoencoder, where: Path, site, kind: str | None, said: bool) -> SparseAutoencoder:
    """`sae` with the caller's site and kind where its files are silent; a one-line error where they
    disagree, so a transcoder never loads as an SAE of its input (nor an SAE as a transcoder)."""
    cfg = sae.cfg
    if kind is not None and kind not in KINDS:
        raise SaescopeError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if site is not None:
        site = Site.parse(site)
        if cfg.site is not None and Site.parse(cfg.site) != site:
            raise SaescopeError(f"{where} reads {cfg.site} (its files say so), not {site}")
        cfg.site = str(site)
    if said and kind is not None and (kind == "transcoder") != cfg.transcoder:
        what = f"a transcoder ({cfg.site} → {cfg.target_site})" if cfg.transcoder else f"an SAE of {cfg.site}"
        raise SaescopeError(f"{where} holds {what}, not {'a transcoder' if kind == 'transcoder' else 'an SAE'}")
    if said or cfg.site is None or cfg.transcoder:
        return sae
    read = Site.parse(cfg.site)
    if kind is None and read.kind in TRANSCODER_INPUTS:
        raise SaescopeError(f"{where} does not say whether it is an SAE or a transcoder, and {read} is a transcoder's "
                            "input: give kind='sae' or kind='transcoder' (--kind)")
    if kind == "transcoder":
        target = read.transcoder_target()
        if cfg.width_out != cfg.d_in:
            raise SaescopeError(f"{where}: a transcoder of {read} predicts {target}, {cfg.d_in} wide; it writes {cfg.width_out}")
        cfg.target_site = str(target)
    return sae


def _existing_names(missing: Path) -> str:
    """For a release path that does not exist, the SAE names beside it that do (users type
    `canonical`, `large` or `64k` where a release has other names)."""
    parent = missing.parent if missing.parent.is_dir() else missing.parent.parent  # `…/width_64k/canonical`
    if not parent.is_dir():
        return ""
    names = sorted(p.name for p in parent.iterdir() if p.is_dir() or p.name == "params.npz")
    layer = re.search(r"layer_(\d+)", missing.name)
    if layer:  # Gemma Scope 2 names a whole SAE in one folder name: keep the same layer's
        same = [n for n in names if re.match(rf"layer_{layer[1]}_", n)]
        names = same or names
    if not names:
        return ""
    shown = ", ".join(names[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
    return f"; {parent} has {shown}"


def find_saes(paths: list[str]) -> dict[str, Path]:
    """Each path is an SAE (any format), a folder whose subfolders are SAEs, or a release tree whose
    subfolders hold SAE folders (named `resid_post-layer_12_width_16k_l0_medium`)."""
    found: dict[str, Path] = {}
    for text in paths:
        given = Path(text)
        path = resolve_sae_path(given)
        if detect_format(path):
            found[given.parent.name if given.name in ("params.npz", "canonical") else given.name] = path
            continue
        subs = {p.name: p for p in _sae_folders(path)}
        if not subs and path.is_dir():  # a release tree: resid_post/, transcoder/, … each of SAE folders
            subs = {f"{kind.name}-{p.name}": p for kind in sorted(path.iterdir()) for p in _sae_folders(kind)}
        if not subs:
            raise SaescopeError(f"{path} is not an SAE and holds no SAE folders")
        found.update(subs)
    return found


def _sae_folders(path: Path) -> list[Path]:
    return [p for p in sorted(path.iterdir()) if p.is_dir() and detect_format(p)] if path.is_dir() else []


def run_saes(folder: str | os.PathLike) -> dict[str, Path]:
    """The SAEs of a `saescope run` folder (train/saes), a `saescope train` folder (saes), a folder
    of SAE folders, or one SAE, by name."""
    folder = Path(folder)
    for inner in (folder / "train" / "saes", folder / "saes"):
        if inner.is_dir() and not detect_format(folder):
            return find_saes([str(inner)])
    return find_saes([str(folder)])


def _canonical(width_dir: Path) -> Path:
    found = []
    for d in width_dir.glob("average_l0_*"):
        m = re.fullmatch(r"average_l0_(\d+)", d.name)
        if m and d.is_dir():
            found.append((abs(int(m[1]) - 100), int(m[1]), d))
    if not found:
        raise SaescopeError(f"no average_l0_* folders under {width_dir} to pick the canonical SAE from (Gemma Scope 2 "
                            f"has no canonical SAEs){_existing_names(width_dir / 'canonical')}")
    return min(found)[2]


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
    skip = cfg_values.get("skip", False)
    if skip and tuple(arrays.get("W_skip", torch.zeros(0)).shape) != (d_in, d_out):
        got = tuple(arrays["W_skip"].shape) if "W_skip" in arrays else "none"
        raise SaescopeError(f"{where}: a skip transcoder needs W_skip of shape {(int(d_in), int(d_out))} (d_in × d_out), got {got}")
    values = {**cfg_values, "d_in": int(d_in), "d_sae": int(d_sae)}
    if d_out != d_in:
        values["d_out"] = int(d_out)
    sae = build_sae(SAEConfig(**values))
    with torch.no_grad():
        for k in ("W_enc", "W_dec", "b_enc", "b_dec") + (("W_skip",) if skip else ()):
            getattr(sae, k).copy_(arrays[k].float())
        if "threshold" in need:
            if sae.cfg.arch == "jumprelu":
                sae.set_threshold(arrays["threshold"].float())
            elif (arrays["threshold"] != 0).any():
                sae.shared_threshold.fill_(float(arrays["threshold"][0]))
    return sae


def _load_gemmascope(path: Path, provenance: dict) -> SparseAutoencoder:
    if not zipfile.is_zipfile(path):  # np.load would otherwise try a pickle
        raise SaescopeError(f"{path} is not a readable npz file (not a zip archive, or truncated)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: torch.from_numpy(np.ascontiguousarray(npz[k], dtype=np.float32)) for k in npz.files}
    except ValueError as exc:  # object arrays refuse to load without pickle
        raise SaescopeError(f"{path} holds arrays that need unpickling; refused ({exc})") from None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SaescopeError(f"{path} is not a readable npz file ({exc})") from None
    return _from_arrays(arrays, provenance, path)


def _gemmascope_provenance(path: Path) -> dict:
    """Site and model from a release path like gemma-scope-2b-pt-res/layer_20/width_16k/average_l0_71
    (or a Hugging Face cache's models--google--gemma-scope-2b-pt-res/snapshots/REV/layer_20/…),
    read as given. Gemma Scope 1's transcoders read ln2.L, the norm's input before its scale."""
    text = path.as_posix()
    layer = re.search(r"/layer_(\d+)/", text)
    repo = re.search(r"gemma-scope-(\d+b)-(pt|it)-(res|mlp|att|transcoders)", text)
    if not layer or not repo:
        return {}
    size, kind, L = repo[1], repo[3], int(layer[1])
    values: dict = {"model": f"gemma-2-{size}" + ("-it" if repo[2] == "it" else "")}
    if kind == "transcoders":
        values.update(site=f"ln2.{L}", target_site=f"mlp.{L}")
    else:
        values["site"] = f"{_GEMMASCOPE_KIND[kind]}.{L}"
    return values


def _load_saelens(path: Path) -> SparseAutoencoder:
    cfg = read_json(path / SAELENS_CONFIG)
    meta = cfg.get("metadata") or {}
    ours = cfg.get("saescope") or {}
    kind = _FROM_SAELENS.get(cfg.get("architecture", "standard"))
    if kind is None:
        raise SaescopeError(f"{path / SAELENS_CONFIG}: unsupported architecture '{cfg.get('architecture')}'")
    arch, skip = ours.get("arch") or kind[0], kind[1]
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise SaescopeError(f"{path / SAELENS_CONFIG}: normalize_activations '{norm}' is not supported; only 'none'")
    site = ours.get("site") or _site_of(cfg.get("hook_name") or meta.get("hook_name"))
    target = ours.get("target_site")
    if target is None and "transcoder" in cfg["architecture"]:
        target = _site_of(cfg.get("hook_name_out") or meta.get("hook_name_out"))
        if target is None:
            raise SaescopeError(f"{path / SAELENS_CONFIG}: a {cfg['architecture']} whose output hook "
                                f"('{cfg.get('hook_name_out')}') names no site; set hook_name_out")
    values = {"arch": arch, "site": site, "target_site": target, "skip": skip,
              "model": cfg.get("model_name") or meta.get("model_name")}
    if arch in ("topk", "batchtopk"):
        values["k"] = (cfg.get("activation_fn_kwargs") or {}).get("k") or cfg.get("k") or ours.get("k")
    arrays = read_safetensors(path / SAELENS_WEIGHTS, ours.get("sha256"))
    if "W_skip" in arrays:
        arrays["W_skip"] = arrays["W_skip"].t()
    sae = _from_arrays(arrays, values, path)
    if cfg.get("apply_b_dec_to_input"):
        sae.pre_encoder_bias.fill_(True)
    return sae


def _load_gemmascope2(path: Path) -> SparseAutoencoder:
    cfg = read_json(path / GS2_CONFIG)
    where = path / GS2_CONFIG
    kind = cfg.get("type", "sae")
    if kind not in ("sae", "transcoder"):
        raise SaescopeError(f"{where}: a {kind} is a multi-layer dictionary; read it with saescope.load_dictionary")
    if cfg.get("architecture") != "jump_relu":
        raise SaescopeError(f"{where}: unsupported architecture '{cfg.get('architecture')}' (Gemma Scope 2 ships jump_relu)")
    ours = cfg.get("saescope") or {}
    site = Site.from_hf_point(cfg.get("hf_hook_point_in"))
    target = Site.from_hf_point(cfg.get("hf_hook_point_out")) if kind == "transcoder" else None
    if kind == "transcoder" and target is None:
        raise SaescopeError(f"{where}: a transcoder whose hf_hook_point_out ('{cfg.get('hf_hook_point_out')}') names no site")
    raw = read_safetensors(path / GS2_PARAMS, ours.get("sha256"))
    names = {v: k for k, v in _GS2_NAMES.items()}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise SaescopeError(f"{path / GS2_PARAMS}: unexpected tensors {', '.join(unknown)}")
    skip = "affine_skip_connection" in raw
    if skip != bool(cfg.get("affine_connection", False)):
        raise SaescopeError(f"{where}: affine_connection is {cfg.get('affine_connection')} but the params "
                            f"{'hold' if skip else 'lack'} affine_skip_connection")
    values = {"arch": ours.get("arch", "jumprelu"), "site": str(site) if site else None,
              "target_site": str(target) if target else None, "skip": skip, "model": cfg.get("model_name"),
              "k": ours.get("k")}
    sae = _from_arrays({names[k]: v for k, v in raw.items()}, values, path)
    if cfg.get("l0") is not None:
        sae.cfg.extra["target_l0"] = cfg["l0"]
    return sae


def save_dictionary(d: MultiLayerDictionary, path: str | os.PathLike, format: str = "gemmascope2") -> Path:
    """Write a multi-layer dictionary into the folder `path`: Gemma Scope 2's files (SPEC §8: a
    `params_layer_{i}.safetensors` per input layer with `w_dec` [F, n, d], a block for every output
    layer as Google's files have it (circuit-tracer stacks them), zero before layer i, and `b_dec`
    of output layer i; folded) or native (the training form)."""
    path, cfg = Path(path), d.cfg
    (path / GS2_CONFIG).unlink(missing_ok=True)
    if format == "native":
        write_json(path / GS2_CONFIG, {"format": "saescope-multilayer", "version": 1, "config": cfg.to_dict(),
                                       "sha256": write_safetensors(path / NATIVE_MULTI_WEIGHTS, d.state_dict())})
        return path
    if format != "gemmascope2":
        raise SaescopeError(f"a multi-layer dictionary saves as gemmascope2 or native, not '{format}'")
    if cfg.arch == "topk":
        raise SaescopeError(f"Gemma Scope 2's files hold JumpReLU latents; a TopK {cfg.kind} saves as native only")
    f = d.fold() if not d.folded else d
    hashes = {}
    for i in range(cfg.n_layers):
        w_dec = torch.cat([f.W_dec[i].new_zeros(cfg.d_sae, i, cfg.d_out), f.W_dec[i]], dim=1)
        tensors = {"w_enc": f.W_enc[i], "b_enc": f.b_enc[i], "threshold": f.theta[i], "w_dec": w_dec, "b_dec": f.b_dec[i]}
        hashes[GS2_LAYER.format(i)] = write_safetensors(path / GS2_LAYER.format(i),
                                                        {k: v.float().cpu() for k, v in tensors.items()})
    write_json(path / GS2_CONFIG, {
        "type": cfg.kind, "architecture": "jump_relu", "width": cfg.d_sae, "model_name": cfg.model,
        "l0": cfg.extra.get("target_l0"), "affine_connection": False,
        "hf_hook_point_in": [Site.parse(s).hf_point for s in cfg.sites_in],
        "hf_hook_point_out": [Site.parse(s).hf_point for s in cfg.sites_out],
        "saescope": {"sites_in": cfg.sites_in, "sites_out": cfg.sites_out, "sha256": hashes}})
    return path


def load_dictionary(path: str | os.PathLike, *, site: str | Site | None = None,
                    kind: str | None = None) -> SparseAutoencoder | MultiLayerDictionary:
    """Any dictionary: a multi-layer one (Gemma Scope 2's `clt` / `crosscoder` folder, native, or
    circuit-tracer's cross-layer transcoder), else whatever `load_sae` reads (`site`, `kind` as there)."""
    path = Path(path)
    meta = _multilayer_meta(path)
    if meta is not None and site is not None:
        raise SaescopeError(f"{path} is a multi-layer dictionary: its files name its sites")
    if meta is not None:
        load = _load_native_multi if meta.get("format") == "saescope-multilayer" else _load_gemmascope2_multi
        return load(path, meta)
    if is_circuit_tracer(path):
        found = load_circuit_tracer(path)
        if isinstance(found, list):
            raise SaescopeError(f"{path} is circuit-tracer's transcoder set (one transcoder per layer); "
                                "read it with saescope.load_circuit_tracer")
        return found
    return load_sae(path, site=site, kind=kind)


def _load_native_multi(path: Path, meta: dict) -> MultiLayerDictionary:
    try:
        d = MultiLayerDictionary(MultiLayerConfig(**meta["config"]))
    except TypeError as exc:
        raise SaescopeError(f"{path / GS2_CONFIG}: bad config ({exc})") from None
    state = read_safetensors(path / NATIVE_MULTI_WEIGHTS, meta.get("sha256"))
    for k, v in d.state_dict().items():
        if k not in state or state[k].shape != v.shape:
            got = tuple(state[k].shape) if k in state else "nothing"
            raise SaescopeError(f"{path / NATIVE_MULTI_WEIGHTS}: {k} should be {tuple(v.shape)}, got {got}")
    d.load_state_dict(state)
    return d


def _load_gemmascope2_multi(path: Path, meta: dict) -> MultiLayerDictionary:
    where, ours = path / GS2_CONFIG, meta.get("saescope") or {}
    points_in, points_out = meta.get("hf_hook_point_in"), meta.get("hf_hook_point_out")
    sites_in = ours.get("sites_in") or [_hf_site(p, where) for p in (points_in or [])]
    sites_out = ours.get("sites_out") or [_hf_site(p, where) for p in (points_out or [])]
    if meta.get("architecture") != "jump_relu":
        raise SaescopeError(f"{where}: unsupported architecture '{meta.get('architecture')}' (Gemma Scope 2 ships jump_relu)")
    hashes, n = ours.get("sha256") or {}, len(sites_in)
    missing = [GS2_LAYER.format(i) for i in range(n) if not (path / GS2_LAYER.format(i)).is_file()]
    if not n or missing:
        raise SaescopeError(f"{path} lacks {', '.join(missing) or 'its sites (hf_hook_point_in)'}")
    layers = [read_safetensors(path / GS2_LAYER.format(i), hashes.get(GS2_LAYER.format(i))) for i in range(n)]
    first = layers[0]
    d_in, d_sae = first["w_enc"].shape
    cfg = MultiLayerConfig(kind=meta["type"], sites_in=sites_in, sites_out=sites_out, d_in=int(d_in),
                           d_out=int(first["w_dec"].shape[-1]), d_sae=int(d_sae), model=meta.get("model_name"),
                           extra={"target_l0": meta.get("l0")})
    d = MultiLayerDictionary(cfg)
    with torch.no_grad():
        for i, t in enumerate(layers):
            name = GS2_LAYER.format(i)
            for key, shape in (("w_enc", (d_in, d_sae)), ("b_enc", (d_sae,)), ("threshold", (d_sae,)), ("b_dec", (cfg.d_out,))):
                if key not in t or tuple(t[key].shape) != tuple(shape):
                    raise SaescopeError(f"{path / name}: {key} should be {tuple(shape)}, got "
                                        f"{tuple(t[key].shape) if key in t else 'nothing'}")
            w_dec = t.get("w_dec")
            if w_dec is None or w_dec.dim() != 3 or w_dec.shape[0] != d_sae or w_dec.shape[1] not in (n - i, n):
                raise SaescopeError(f"{path / name}: w_dec should be {(int(d_sae), n - i, cfg.d_out)} (its own and later "
                                    f"layers) or {(int(d_sae), n, cfg.d_out)}, got {tuple(w_dec.shape) if w_dec is not None else 'nothing'}")
            if w_dec.shape[1] == n:
                if w_dec[:, :i].any():
                    raise SaescopeError(f"{path / name}: its latents write layers before their own ({', '.join(sites_out[:i])}); "
                                        f"a {cfg.kind}'s latents write their own layer and later ones only")
                w_dec = w_dec[:, i:]
            d.set_group(i, w_enc=t["w_enc"], b_enc=t["b_enc"], w_dec=w_dec, threshold=t["threshold"])
            d.b_dec[i].copy_(t["b_dec"])
    return d


def _hf_site(point: str, where: Path) -> str:
    site = Site.from_hf_point(point)
    if site is None:
        raise SaescopeError(f"{where}: hook point '{point}' names no site")
    return str(site)


def _site_of(hook: str | None) -> str | None:
    """Our name of a SAELens hook, or None for a hook we have no site for (loaded, but unbound)."""
    try:
        return str(Site.parse(hook)) if hook else None
    except SaescopeError:
        return None


def _load_native(path: Path) -> SparseAutoencoder:
    from . import build_sae

    meta = read_json(path / NATIVE_CONFIG)
    if meta.get("format") == "saescope-multilayer":
        raise SaescopeError(f"{path} holds a multi-layer dictionary; read it with saescope.load_dictionary")
    if meta.get("format") != "saescope-sae":
        raise SaescopeError(f"{path / NATIVE_CONFIG} is not a saescope SAE config")
    try:
        sae = build_sae(SAEConfig(**meta["config"]))
    except TypeError as exc:
        raise SaescopeError(f"{path / NATIVE_CONFIG}: bad config ({exc})") from None
    state = read_safetensors(path / NATIVE_WEIGHTS, meta.get("sha256"))
    own = sae.state_dict()
    for k, v in own.items():
        if k not in state:
            raise SaescopeError(f"{path / NATIVE_WEIGHTS} lacks {k}")
        if state[k].shape != v.shape:
            raise SaescopeError(f"{path / NATIVE_WEIGHTS}: {k} has shape {tuple(state[k].shape)}, config says {tuple(v.shape)}")
    sae.load_state_dict(state)
    return sae
