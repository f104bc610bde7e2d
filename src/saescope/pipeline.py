"""`saescope run`: the pipeline's stages in order, each skipped when its output is complete.

Stages so far: harvest. Training, evaluation and the explorer join as they land."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import Field

from .config import HarvestConfig, _Config, one_line
from .data import harvest
from .errors import SaescopeError


class RunConfig(_Config):
    """The whole pipeline; the defaults are the embedded Gemma 3 270M on the built-in corpus."""

    harvest: HarvestConfig = Field(default_factory=lambda: HarvestConfig(
        sites=["resid.6", "attn.6", "mlp.6", "mlp_in.6"], tokens=8192))


def load_config(path: str | Path | None) -> RunConfig:
    """Read a .json or .toml run configuration; unknown or misspelt keys are errors."""
    from pydantic import ValidationError

    if path is None:
        return RunConfig()
    path = Path(path)
    if not path.is_file():
        raise SaescopeError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            data = tomllib.loads(path.read_text())
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
        else:
            raise SaescopeError(f"config {path}: use a .toml or .json file")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise SaescopeError(f"config {path} cannot be parsed: {exc}") from None
    try:
        return RunConfig(**data)
    except ValidationError as exc:
        raise SaescopeError(f"config {path}: " + one_line(exc, "RunConfig")) from None


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Run every stage into `out`; returns each stage's output."""
    out = Path(out)
    store = harvest(cfg.harvest, out / "activations", progress=progress)
    return {"activations": store}
