"""JumpReLU SAEs and transcoders (SPEC §2) and their straight-through pseudo-derivatives."""

from __future__ import annotations

import torch
from torch import nn

from .base import SAEConfig, SparseAutoencoder, squared_error


def _kernel(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rectangle kernel K((z − θ)/ε): 1 strictly inside (−½, ½), else 0."""
    u = (z - theta) / eps
    return ((u > -0.5) & (u < 0.5)).to(z.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient over the batch dimensions back to θ's shape."""
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


class JumpReLUFn(torch.autograd.Function):
    """z · H(z − θ). ∂/∂z = H(z − θ); ∂/∂θ := −(θ/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        dz = grad * (z > theta).to(z.dtype)
        dtheta = _sum_to(grad * -(theta / ctx.eps) * _kernel(z, theta, ctx.eps), theta.shape)
        return dz, dtheta, None


class StepFn(torch.autograd.Function):
    """H(z − θ). ∂/∂z = 0; ∂/∂θ := −(1/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        dtheta = _sum_to(grad * -(1.0 / ctx.eps) * _kernel(z, theta, ctx.eps), theta.shape)
        return torch.zeros_like(z), dtheta, None


class JumpReLUSAE(SparseAutoencoder):
    """f = pre · (pre > θ). θ is trained directly (default) or as log θ (the paper).

    Why θ directly by default: Adam moves a parameter by about lr per step, so log θ changes θ by
    a factor of e^lr per step, roughly 0.01% at lr 7e-5; from θ = 0.001, thresholds that need to
    reach 0.05–0.5 on unit-norm inputs cannot get there in a short run and L0 stays stuck high.
    θ itself moves by lr per step in absolute terms (the README's measurement)."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        init = torch.full((cfg.d_sae,), 0.001)
        if cfg.theta_param == "log":
            self.log_threshold = nn.Parameter(init.log())
        else:
            self.theta = nn.Parameter(init)

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp() if self.cfg.theta_param == "log" else self.theta

    def set_threshold(self, value: torch.Tensor) -> None:
        with torch.no_grad():
            if self.cfg.theta_param == "log":
                self.log_threshold.copy_(value.clamp_min(1e-12).log())
            else:
                self.theta.copy_(value)

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre * (pre > self.threshold).to(pre.dtype)

    def _fold_threshold(self, c: float) -> None:
        self.set_threshold(self.threshold.detach() * c)

    def training_loss(self, x, target, sparsity_coeff, dead=None, path="auto", workspace=None, pre=None):
        theta = self.threshold
        if path == "reference":
            pre = self.pre_acts(x)
            f = JumpReLUFn.apply(pre, theta, self.cfg.bandwidth)
            _, mse = self._reconstruction(f, target)
            l0 = StepFn.apply(pre, theta, self.cfg.bandwidth).sum(-1).mean()
            fired = (f != 0).any(0)
        else:
            x_hat, count, fired, _ = self._threshold_step(x, theta, path, workspace, pre)
            mse = squared_error(x_hat, target)
            l0 = count / x.shape[0]
        return {"loss": mse + sparsity_coeff * l0, "mse": mse, "l0": l0.detach(), "fired": fired}

    @torch.no_grad()
    def apply_constraints(self, rows: torch.Tensor | None = None) -> None:
        """Unit decoder rows, and θ > 0 (log θ is positive by construction)."""
        super().apply_constraints(rows)
        if self.cfg.theta_param == "theta":
            self.theta.clamp_(min=1e-6)

