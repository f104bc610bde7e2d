"""Files: writes that never leave a half-written file under the final name, and JSON read with
one-line errors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import SaescopeError


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
