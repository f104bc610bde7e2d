"""JumpReLU SAEs and transcoders (SPEC §2) and their straight-through pseudo-derivatives."""

from __future__ import annotations

import torch
from torch import nn

from .base import SAEConfig, SparseAutoencoder
from .objectives import Encoded, frequency_penalty, sparsity_penalty


def _kernel(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    """Rectangle kernel K((z − θ)/ε): 1 strictly inside (−½, ½), else 0."""
    u = (z - theta) / eps
    return ((u > -0.5) & (u < 0.5)).to(z.dtype)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum a broadcast gradient over the batch dimensions back to θ's shape."""
    return grad.reshape(-1, *shape).sum(0) if grad.shape != shape else grad


class JumpReLUFn(torch.autograd.Function):
    """z · H(z − θ). ∂/∂z = H(z − θ); ∂/∂θ := −(θ/ε)·K((z − θ)/ε). With the input STE,
    ∂/∂z := H(z − θ) + (θ/ε)·K((z − θ)/ε) (the kernel's gradient reaches z as well)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float, input_ste: bool = False):
        ctx.save_for_backward(z, theta)
        ctx.eps, ctx.input_ste = eps, input_ste
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        kernel_part = grad * (theta / ctx.eps) * _kernel(z, theta, ctx.eps)
        dz = grad * (z > theta).to(z.dtype) + (kernel_part if ctx.input_ste else 0.0)
        return dz, _sum_to(-kernel_part, theta.shape), None, None


class StepFn(torch.autograd.Function):
    """H(z − θ). ∂/∂z = 0 (with the input STE, (1/ε)·K); ∂/∂θ := −(1/ε)·K((z − θ)/ε)."""

    @staticmethod
    def forward(ctx, z, theta, eps: float, input_ste: bool = False):
        ctx.save_for_backward(z, theta)
        ctx.eps, ctx.input_ste = eps, input_ste
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, theta = ctx.saved_tensors
        kernel_part = grad * (1.0 / ctx.eps) * _kernel(z, theta, ctx.eps)
        dz = kernel_part if ctx.input_ste else torch.zeros_like(z)
        return dz, _sum_to(-kernel_part, theta.shape), None, None


class JumpReLUSAE(SparseAutoencoder):
    """f = pre · (pre > θ). θ is trained directly (default) or as log θ (the paper).

    Why θ directly by default: Adam moves a parameter by about lr per step, so log θ changes θ by
    a factor of e^lr per step, roughly 0.01% at lr 7e-5; from θ = 0.001, thresholds that need to
    reach 0.05–0.5 on unit-norm inputs cannot get there in a short run and L0 stays stuck high.
    θ itself moves by lr per step in absolute terms (the README's measurement)."""

    PER_LATENT_SCALE = True

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

    @property
    def aux_weight(self) -> float:
        return self.objective.dead_aux

    def training_code(self, x, dead, path, workspace, pre):
        theta, obj = self.threshold, self.objective
        if path == "reference":
            pre = self.pre_acts(x)
            f = JumpReLUFn.apply(pre, theta, self.cfg.bandwidth, obj.input_ste)
            h = StepFn.apply(pre, theta, self.cfg.bandwidth, obj.input_ste)
            enc = Encoded(f, None, h.sum(), h.sum(-1) if obj.per_token else None, h.sum(0) if obj.per_latent else None)
            return enc, (lambda residual: (self._aux_reference(pre, residual, dead), None)) if obj.dead_aux else None
        pre = self._fast_pre(x, workspace) if pre is None else pre
        aux_code = self._aux_code(pre, dead) if obj.dead_aux else None  # before a dense step overwrites pre
        enc = self._threshold_encoded(x, theta, path, workspace, pre)
        return enc, (lambda residual: self._aux_loss(x, aux_code, residual)) if obj.dead_aux else None

    def penalty(self, enc, sparsity_coeff, out):
        return sparsity_penalty(self.objective, sparsity_coeff, enc) + frequency_penalty(self.objective, enc)

    @torch.no_grad()
    def apply_constraints(self, rows: torch.Tensor | None = None) -> None:
        """Unit decoder rows, and θ > 0 (log θ is positive by construction)."""
        super().apply_constraints(rows)
        if self.cfg.theta_param == "theta":
            self.theta.clamp_(min=1e-6)

