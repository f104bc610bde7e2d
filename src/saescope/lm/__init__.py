"""The language-model side: loading, sites, capture and splice. Knows nothing of SAEs."""

from .loading import DEFAULT_MODEL, cache_root, load_model
from .model import LanguageModel
from .sites import KINDS, Site, available_sites, capture, forward_until, parse_sites, splice

__all__ = ["DEFAULT_MODEL", "KINDS", "LanguageModel", "Site", "available_sites", "cache_root", "capture",
           "forward_until", "load_model", "parse_sites", "splice"]
