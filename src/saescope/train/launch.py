"""`train`: the backend chosen by the config, the ranks joined, the trainer run. A backend is a
module with a `Backend` subclass, named here; nothing else knows the list."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ..config import TrainConfig
from .distributed import Ranks, joined
from .trainer import Trainer

BACKENDS = {"torch": ("saescope.train.step_torch", "TorchStep"), "jax": ("saescope.jax.backend", "JaxStep")}


def backend_for(cfg: TrainConfig):
    """A new backend object for `cfg.backend` (it checks that it can train the suite)."""
    module, name = BACKENDS[cfg.backend]
    return getattr(import_module(module), name)(cfg)


def trainer_for(cfg: TrainConfig, out: str | Path, source=None, *, ranks: Ranks | None = None, **kwargs) -> Trainer:
    """The trainer of `cfg` with its backend: what `train` runs, for callers that step it themselves."""
    return Trainer(cfg, out, backend_for(cfg), source, ranks=ranks, **kwargs)


def train(cfg: TrainConfig, out: str | Path, *, source=None, progress: bool = True) -> list[Path]:
    """Train every SAE of `cfg` into `out/saes/<name>/`; rerunning resumes from the checkpoint.
    Under torchrun (WORLD_SIZE > 1) every rank calls this; `cfg.parallel` says how they share."""
    backend = backend_for(cfg)
    with joined(cfg.parallel, cfg.device) as ranks:
        return Trainer(cfg, out, backend, source, ranks=ranks).run(progress=progress)
