"""The consumer side shared by the disk store and the disk-less harvest: a shuffle buffer that
turns chunks of aligned rows ({site: [n, d]}) into shuffled float32 batches."""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

DEFAULT_BUFFER_ROWS = 1_000_000  # the paper shuffles in buckets of about 10^6 activations


def norm_scalar_of(x: torch.Tensor) -> float:
    """C with E‖x/C‖² = 1 over the rows of x (SPEC §2)."""
    return float(x.double().pow(2).sum(1).mean().sqrt())


def default_buffer_rows(row_bytes: int, memory_share: float = 0.25) -> int:
    """About 10^6 rows, fewer when that would take more than `memory_share` of free memory."""
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return DEFAULT_BUFFER_ROWS
    return max(4096, min(DEFAULT_BUFFER_ROWS, int(free * memory_share) // max(row_bytes, 1)))


def shuffled_batches(chunks: Iterator[dict[str, torch.Tensor]], batch_size: int, buffer_rows: int,
                     generator: torch.Generator, *, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Fill a buffer of `buffer_rows` rows; when full, emit a random half of it as batches and
    keep the other half to mix with what comes next. At the end, emit everything left, shuffled.
    The same permutation applies to every site, so rows stay aligned."""
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    buffer_rows = max(buffer_rows, 2 * batch_size)
    buf: dict[str, torch.Tensor] = {}
    fill = 0

    def drain(n_out: int):
        """Emit `n_out` random rows of the buffer as batches; keep the rest, moved to the front."""
        nonlocal fill
        perm = torch.randperm(fill, generator=generator)
        for i in range(0, n_out, batch_size):
            idx = perm[i:i + batch_size]
            if len(idx) < batch_size and drop_last:
                break
            yield {s: b[idx] for s, b in buf.items()}
        rest = perm[n_out:]
        for s, b in buf.items():
            b[:len(rest)] = b[rest]
        fill = len(rest)

    for chunk in chunks:
        if not buf:
            buf = {s: torch.empty(buffer_rows, x.shape[1], dtype=torch.float32) for s, x in chunk.items()}
        n = next(iter(chunk.values())).shape[0]
        start = 0
        while start < n:
            take = min(n - start, buffer_rows - fill)
            for s, x in chunk.items():
                buf[s][fill:fill + take] = x[start:start + take]
            fill += take
            start += take
            if fill == buffer_rows:  # a random half, in whole batches
                yield from drain(buffer_rows // 2 // batch_size * batch_size)
    if fill:
        yield from drain(fill)


class TensorSource:
    """Activations already in memory ({site: [rows, d]}, rows aligned), behind the store's interface."""

    produced = False

    def __init__(self, acts: dict[str, torch.Tensor], model_name: str | None = None):
        rows = {x.shape[0] for x in acts.values()}
        if len(rows) != 1:
            raise ValueError(f"all sites need the same number of rows, got {sorted(rows)}")
        self.acts = {str(k): v.float() for k, v in acts.items()}
        self.model_name = model_name
        self._whole = self  # a part's normalisation scalar is the whole source's

    def part(self, index: int, parts: int) -> "TensorSource":
        """Data part `index` of `parts`: rows index, index + parts, …"""
        if parts == 1:
            return self
        view = TensorSource({k: v[index::parts] for k, v in self.acts.items()}, self.model_name)
        view._whole = self._whole
        return view

    @property
    def sites(self) -> list[str]:
        return list(self.acts)

    def d_in(self, site) -> int:
        return self.acts[str(site)].shape[1]

    def n_rows(self, site=None) -> int:
        return next(iter(self.acts.values())).shape[0]

    def norm_scalar(self, site) -> float:
        return norm_scalar_of(self._whole.acts[str(site)])

    def default_buffer(self, sites) -> int:
        """All rows: they are in memory already."""
        return self.n_rows()

    def batches(self, batch_size: int, *, sites=None, seed: int = 0, epochs: int = 1,
                buffer_rows: int | None = None, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        keys = [str(s) for s in (sites if sites is not None else self.sites)]
        gen = torch.Generator().manual_seed(seed)
        chunks = ({k: self.acts[k] for k in keys} for _ in range(epochs))
        rows = buffer_rows or self.default_buffer(keys)
        return shuffled_batches(chunks, batch_size, max(rows, batch_size), gen, drop_last=drop_last)
