"""The dictionaries themselves: pure torch, no model and no files but their own formats."""

from .base import ARCHS, SAEConfig, SparseAutoencoder
from .jumprelu import JumpReLUFn, JumpReLUSAE, StepFn
from .topk import BatchTopKSAE, ReLUSAE, TopKSAE

_CLASSES = {"jumprelu": JumpReLUSAE, "topk": TopKSAE, "batchtopk": BatchTopKSAE, "relu": ReLUSAE}


def build_sae(cfg: SAEConfig) -> SparseAutoencoder:
    """An SAE of `cfg.arch` with all-zero parameters (call `init_weights` or load a state)."""
    return _CLASSES[cfg.arch](cfg)


__all__ = ["ARCHS", "BatchTopKSAE", "JumpReLUFn", "JumpReLUSAE", "ReLUSAE", "SAEConfig", "SparseAutoencoder",
           "StepFn", "TopKSAE", "build_sae"]
