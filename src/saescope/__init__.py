"""saescope: read activations from any transformer LM, train and evaluate JumpReLU SAEs and
transcoders by the Gemma Scope recipe, and explore their features."""

from .config import CorpusConfig, HarvestConfig
from .data import ActivationStore, HarvestStream, harvest, iter_documents, pack
from .errors import SaescopeError
from .lm import DEFAULT_MODEL, LanguageModel, Site, capture, load_model, splice

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "ActivationStore", "CorpusConfig", "HarvestConfig", "HarvestStream", "LanguageModel",
           "SaescopeError", "Site", "capture", "harvest", "iter_documents", "load_model", "pack", "splice"]
