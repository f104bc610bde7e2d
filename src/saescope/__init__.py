"""saescope: read activations from any transformer LM, train and evaluate JumpReLU SAEs and
transcoders by the Gemma Scope recipe, and explore their features."""

from .checks import check_sae
from .config import CorpusConfig, HarvestConfig
from .data import ActivationStore, HarvestStream, harvest, iter_documents, pack
from .errors import SaescopeError
from .lm import DEFAULT_MODEL, LanguageModel, capture, load_model, splice
from .sae import BatchTopKSAE, JumpReLUSAE, ReLUSAE, SAEConfig, SparseAutoencoder, TopKSAE, build_sae
from .sae.circuit_tracer import load_circuit_tracer, save_circuit_tracer
from .sae.convert import batchtopk_to_jumprelu
from .sae.objectives import Objective
from .sae.formats import load_dictionary, load_sae, save_dictionary, save_sae
from .sae.multilayer import MultiLayerConfig, MultiLayerDictionary
from .site import Site

__version__ = "0.1.0"

__all__ = ["DEFAULT_MODEL", "ActivationStore", "BatchTopKSAE", "CorpusConfig", "HarvestConfig", "HarvestStream",
           "JumpReLUSAE", "LanguageModel", "MultiLayerConfig", "MultiLayerDictionary", "Objective", "ReLUSAE", "SAEConfig",
           "SaescopeError", "Site", "SparseAutoencoder", "TopKSAE", "batchtopk_to_jumprelu", "build_sae", "capture",
           "check_sae", "harvest", "iter_documents", "load_circuit_tracer", "load_dictionary", "load_model", "load_sae", "pack", "save_circuit_tracer",
           "save_dictionary", "save_sae", "splice"]
