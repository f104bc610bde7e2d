"""The feature explorer: the feature database, the web app on top of it, and the Neuronpedia export."""

from .build import build
from .db import connect

__all__ = ["build", "connect"]
