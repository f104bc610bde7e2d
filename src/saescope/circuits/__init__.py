"""Circuit tracing (SPEC §9): attribution graphs of a prompt through transcoders or a CLT, their
pruning and scores, and interventions on their features."""

from .attribute import attribute
from .graph import Graph, prune, scores
from .intervene import Intervention, intervene

__all__ = ["Graph", "Intervention", "attribute", "intervene", "prune", "scores"]
