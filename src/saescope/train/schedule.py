"""Learning-rate and sparsity-coefficient schedules (SPEC §2), and the target-L0 controller."""

from __future__ import annotations

import math
from dataclasses import dataclass


def warmup_steps(configured: int | None, total: int, paper: int, share: float) -> int:
    """The paper's warm-up length, shortened to `share` of the run when the run is short (choice)."""
    return configured if configured is not None else min(paper, int(share * total))


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Cosine warm-up from 0.1·lr to lr over `warmup` steps, then constant (no decay)."""
    if step >= warmup:
        return lr
    return lr * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * step / warmup)))


def coeff_at(step: int, coeff: float, warmup: int) -> float:
    """λ warmed up linearly from 0 over `warmup` steps."""
    return coeff if step >= warmup else coeff * step / warmup


@dataclass
class TargetL0:
    """Adapts λ so that the SAE's L0 settles on `target`.

    L0 answers λ with a lag: thresholds move at most about lr per Adam step. So log λ moves by
    gain × the error log(L0/target) *predicted `horizon` steps ahead* from its current trend;
    while L0 already heads for the target fast enough, λ holds still instead of winding up and
    overshooting. (Measured on Gemma 3 270M and on a planted dictionary; see the README.)"""

    target: float
    log_lambda: float
    gain: float
    horizon: float = 50.0
    ema_l0: float | None = None
    last_error: float | None = None

    @property
    def coeff(self) -> float:
        return math.exp(self.log_lambda)

    def update(self, l0: float) -> None:
        self.ema_l0 = l0 if self.ema_l0 is None else 0.8 * self.ema_l0 + 0.2 * l0
        error = math.log(max(self.ema_l0, 1e-3) / self.target)
        trend = 0.0 if self.last_error is None else error - self.last_error
        self.last_error = error
        self.log_lambda += max(-0.1, min(0.1, self.gain * (error + self.horizon * trend)))

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("target", "log_lambda", "gain", "horizon", "ema_l0", "last_error")}
