"""The JAX backend (`pip install saescope[jax]`): JumpReLU SAEs and transcoders as pure functions
with the SPEC §2 pseudo-derivatives as custom VJPs, for TPUs or a JAX stack."""

try:
    import jax  # noqa: F401
except ImportError as exc:  # the extra is optional; say how to get it
    from ..errors import SaescopeError

    raise SaescopeError("the JAX backend needs jax and optax: pip install 'saescope[jax]'") from exc

from .sae import encode, fold, from_torch, jumprelu, loss, pre_acts, step, threshold, to_torch

__all__ = ["encode", "fold", "from_torch", "jumprelu", "loss", "pre_acts", "step", "threshold", "to_torch"]
