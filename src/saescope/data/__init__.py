"""Text and activations: corpora, packed token rows, the activation store and the harvest. Knows no SAE."""

from .corpus import builtin_documents, iter_documents
from .harvest import HarvestStream, harvest, token_rows, token_tensor
from .store import ActivationStore, StoreWriter
from .stream import TensorSource
from .tokens import SpecialTokens, keep_mask, pack

__all__ = ["ActivationStore", "HarvestStream", "SpecialTokens", "StoreWriter", "TensorSource", "builtin_documents", "harvest",
           "iter_documents", "keep_mask", "pack", "token_rows", "token_tensor"]
