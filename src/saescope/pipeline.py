"""`saescope run`: the pipeline's stages in order, each skipped when its output is complete.

Stages so far: harvest. Training, evaluation and the explorer join as they land."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from .config import HarvestConfig, _Config, config_from_file
from .data import harvest


class RunConfig(_Config):
    """The whole pipeline; the defaults are the embedded Gemma 3 270M on the built-in corpus."""

    harvest: HarvestConfig = Field(default_factory=lambda: HarvestConfig(
        sites=["resid.6", "attn.6", "mlp.6", "mlp_in.6"], tokens=8192))


def load_config(path: str | Path | None) -> RunConfig:
    """The run configuration in a .toml or .json file (the defaults when None)."""
    return RunConfig() if path is None else config_from_file(RunConfig, path)


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True) -> dict:
    """Run every stage into `out`; returns each stage's output."""
    out = Path(out)
    store = harvest(cfg.harvest, out / "activations", progress=progress)
    return {"activations": store}
