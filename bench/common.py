"""What the benchmark scripts share: the bare truncated forward they are measured against."""

from __future__ import annotations

import time

import torch

from saescope.lm import LanguageModel, forward_until


def bare_forward_seconds(lm: LanguageModel, rows: torch.Tensor, layer: int, batch: int) -> float:
    """Seconds for the model's forward over `rows`, `batch` rows at a time, stopped after `layer`."""
    t = time.perf_counter()
    for i in range(0, len(rows), batch):
        forward_until(lm, rows[i:i + batch], layer)
    return time.perf_counter() - t
