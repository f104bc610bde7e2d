"""Training: many SAEs from one activation stream, schedules, checkpoints, metrics."""

from .schedule import TargetL0, coeff_at, lr_at
from .trainer import Trainer, expand, train

__all__ = ["TargetL0", "Trainer", "coeff_at", "expand", "lr_at", "train"]
