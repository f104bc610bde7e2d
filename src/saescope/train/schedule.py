"""Learning-rate and sparsity-coefficient schedules (SPEC §2), and the target-L0 controller."""

from __future__ import annotations

import math

import torch


def warmup_steps(configured: int | None, total: int, paper: int, share: float) -> int:
    """The paper's warm-up length, shortened to `share` of the run when the run is short (choice)."""
    return configured if configured is not None else min(paper, int(share * total))


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Cosine warm-up from 0.1·lr to lr over `warmup` steps, then constant (no decay)."""
    if step >= warmup:
        return lr
    return lr * (0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * step / warmup)))


def decayed(step: int, start: float, end: float, steps: int) -> float:
    """Linear from `start` to `end` over `steps` steps, then `end`."""
    return end if step >= steps else start + (end - start) * step / steps


def coeff_at(step: int, coeff: float, warmup: int) -> float:
    """λ warmed up linearly from 0 over `warmup` steps."""
    return decayed(step, 0.0, coeff, warmup)


class TargetL0:
    """Adapts λ so that the SAE's L0 settles on `target`.

    L0 answers λ with a lag: thresholds move at most about lr per Adam step. So log λ moves by
    gain × the error log(L0/target) *predicted `horizon` steps ahead* from its current trend;
    while L0 already heads for the target fast enough, λ holds still instead of winding up and
    overshooting. (Measured on Gemma 3 270M and on a planted dictionary; see the README.)

    The state lives in tensors so that a training step never waits on the device."""

    def __init__(self, target: float, log_lambda: float, gain: float, horizon: float = 50.0,
                 ema_l0: float | None = None, last_error: float | None = None, device="cpu"):
        self.target, self.gain, self.horizon = target, gain, horizon
        self.started = ema_l0 is not None

        def scalar(value):
            return torch.tensor(float(value or 0.0), dtype=torch.float64, device=device)

        self.log_lambda, self.ema_l0, self.last_error = scalar(log_lambda), scalar(ema_l0), scalar(last_error)

    @property
    def coeff(self) -> torch.Tensor:
        return self.log_lambda.exp()

    def update(self, l0: torch.Tensor) -> None:
        l0 = l0.detach().to(self.ema_l0)
        self.ema_l0 = 0.8 * self.ema_l0 + 0.2 * l0 if self.started else l0
        error = (self.ema_l0.clamp_min(1e-3) / self.target).log()
        trend = error - self.last_error if self.started else torch.zeros_like(error)
        self.last_error = error
        self.started = True
        self.log_lambda = self.log_lambda + (self.gain * (error + self.horizon * trend)).clamp(-0.1, 0.1)

    def state(self) -> dict:
        return {"target": self.target, "log_lambda": float(self.log_lambda), "gain": self.gain,
                "horizon": self.horizon, "ema_l0": float(self.ema_l0) if self.started else None,
                "last_error": float(self.last_error) if self.started else None}
