"""Evaluation (SPEC §4): metrics by splicing reconstructions into the model, on held-out tokens."""

from .metrics import dead_dense, evaluate, fvu, kl_divergence, l0, massive_dims

__all__ = ["dead_dense", "evaluate", "fvu", "kl_divergence", "l0", "massive_dims"]
