"""A normalisation layer taken apart into its normalised input and its learned scale: the `ln2`
site is the pre-MLP norm's input normalised but not yet scaled (what TransformerLens calls
`ln2.hook_normalized` and Gemma Scope 1's transcoders read), `mlp_in` is the same after the scale
(what Gemma Scope 2's transcoders read), and the local replacement model freezes the per-token
factor between them."""

from __future__ import annotations

import torch

from ..errors import SaescopeError


def norm_kind(module: torch.nn.Module) -> str | None:
    """"layer" (LayerNorm), "gemma" (RMSNorm scaled by 1 + w), "rms" (by w) or None."""
    if isinstance(module, torch.nn.LayerNorm):
        return "layer"
    name = type(module).__name__
    if name.endswith("RMSNorm") and (hasattr(module, "eps") or hasattr(module, "variance_epsilon")):
        return "gemma" if name.startswith("Gemma") else "rms"
    return None


def _kind(module: torch.nn.Module) -> str:
    kind = norm_kind(module)
    if kind is None:
        raise SaescopeError(f"{type(module).__name__} is not a LayerNorm or RMSNorm: its normalised input is unknown")
    return kind


def centred(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input in float32, less its mean for a LayerNorm (an RMSNorm does not centre)."""
    x = x.float()
    return x - x.mean(-1, keepdim=True) if _kind(module) == "layer" else x


def inverse_scale(module: torch.nn.Module, centred_x: torch.Tensor) -> torch.Tensor:
    """1 / sqrt(mean square + eps) per token, the factor a frozen norm holds fixed."""
    eps = getattr(module, "eps", getattr(module, "variance_epsilon", 0.0))
    return torch.rsqrt(centred_x.pow(2).mean(-1, keepdim=True) + eps)


def normalised(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The norm of `x` before its learned scale and bias (float32): RMS 1 per token, up to eps."""
    c = centred(module, x)
    return c * inverse_scale(module, c)


def gain(module: torch.nn.Module) -> torch.Tensor | None:
    """The learned per-dimension scale as applied: 1 + w for Gemma's RMSNorm, w otherwise."""
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return 1.0 + weight.float() if _kind(module) == "gemma" else weight.float()


def bias(module: torch.nn.Module) -> torch.Tensor | float:
    b = getattr(module, "bias", None) if _kind(module) == "layer" else None
    return b.float() if b is not None else 0.0
