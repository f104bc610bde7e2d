"""Training: many SAEs from one activation stream, schedules, checkpoints, metrics."""

from .launch import train, trainer_for
from .schedule import TargetL0, coeff_at, lr_at
from .suite import Planned, expand
from .trainer import Trainer

__all__ = ["Planned", "TargetL0", "Trainer", "coeff_at", "expand", "lr_at", "train", "trainer_for"]
