"""Files: writes that never leave a half-written file under the final name, and JSON and
safetensors read with one-line errors (safetensors checked against the sha256 a config records)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .errors import SaescopeError, first_line


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_temporaries(folder: Path) -> None:
    """Delete what an atomic_write killed before its rename left in `folder` (dot-named files):
    the final names were never touched, so these hold nothing anyone reads."""
    for stray in folder.glob(".*") if folder.is_dir() else ():
        if stray.is_file():
            stray.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    atomic_write(path, (json.dumps(obj, indent=1) + "\n").encode())


def read_json(path: Path):
    """The parsed file, or a one-line error naming it (missing, or not JSON)."""
    if not path.is_file():
        raise SaescopeError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SaescopeError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def write_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> str:
    """Write tensors as one safetensors file (atomically); its sha256, for the config beside it."""
    from safetensors.torch import save

    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write(path, data)
    return hashlib.sha256(data).hexdigest()


def read_safetensors(path: Path, sha256: str | None = None) -> dict:
    """The tensors of a safetensors file; when its config records a sha256 (ours do), checked first."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = path.read_bytes()
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise SaescopeError(f"{path} does not match the sha256 its config records: damaged or altered")
    try:
        return load(data)
    except SafetensorError as exc:
        raise SaescopeError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise SaescopeError(f"{path} is not a readable safetensors file ({first_line(exc)})") from None


def relative_to(folder: str | Path, path: str | Path) -> str:
    """`path` as recorded in a file under `folder`: relative to it, so that the folder can be
    copied or moved (a run serves and evaluates from wherever it is)."""
    return os.path.relpath(Path(path).absolute(), Path(folder).absolute())


def recorded_path(folder: str | Path, recorded: str) -> Path:
    """A path recorded by `relative_to` (or, by older files, absolute or cwd-relative) made usable."""
    path = Path(recorded)
    if path.is_absolute():
        return path
    beside = Path(os.path.abspath(Path(folder) / path))
    return beside if beside.exists() or not path.exists() else path


PATH_KEYS = ("path", "released")  # what evaluation records hold of where a dictionary is


def write_records(path: Path, records: list[dict]) -> None:
    """Evaluation records as JSON, each dictionary's paths relative to the file's folder."""
    write_json(path, [{k: relative_to(path.parent, v) if k in PATH_KEYS and v else v for k, v in r.items()}
                      for r in records])


def read_records(path: Path) -> list[dict]:
    """Records written by `write_records`, their paths usable from the current directory."""
    return [{k: str(recorded_path(path.parent, v)) if k in PATH_KEYS and v else v for k, v in r.items()}
            for r in read_json(path)]
