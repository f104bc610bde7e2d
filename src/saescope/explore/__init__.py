"""The feature explorer: the feature database (and, next, the web app on top of it)."""

from .build import build
from .db import connect

__all__ = ["build", "connect"]
