"""saescope: read activations from any transformer LM, train and evaluate JumpReLU SAEs and
transcoders by the Gemma Scope recipe, and explore their features."""

from .checks import check_sae
from .circuits import Graph, Intervention, attribute, intervene, prune, scores
from .circuits.files import load_graph, save_graph, write_graph_files
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

__all__ = ["DEFAULT_MODEL", "ActivationStore", "BatchTopKSAE", "CorpusConfig", "Graph", "HarvestConfig", "HarvestStream",
           "Intervention", "JumpReLUSAE", "LanguageModel", "MultiLayerConfig", "MultiLayerDictionary", "Objective", "ReLUSAE", "SAEConfig",
           "SaescopeError", "Site", "SparseAutoencoder", "TopKSAE", "attribute", "batchtopk_to_jumprelu", "build_sae",
           "capture", "check_sae", "harvest", "intervene", "iter_documents", "load_circuit_tracer", "load_dictionary", "load_graph",
           "load_model", "load_sae", "pack", "prune", "save_circuit_tracer", "save_dictionary", "save_graph", "save_sae",
           "scores", "splice", "write_graph_files"]
