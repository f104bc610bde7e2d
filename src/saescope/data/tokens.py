"""Tokenise documents and pack them into fixed-length rows that each start with BOS.

Documents are joined with EOS; a row is BOS followed by the next seq_len − 1 tokens of that
stream, so no text is dropped at row boundaries. The last row is right-padded, never dropped."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from ..errors import SaescopeError


@dataclass(frozen=True)
class SpecialTokens:
    bos: int
    eos: int
    pad: int

    @classmethod
    def of(cls, tokenizer) -> "SpecialTokens":
        if tokenizer is None:
            raise SaescopeError("the model has no tokenizer; text corpora need one (pass token ids instead)")
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else bos
        if bos is None:
            raise SaescopeError("the tokenizer has neither a BOS nor an EOS token to start rows with")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        return cls(int(bos), int(eos), int(pad))

    @property
    def ids(self) -> list[int]:
        return sorted({self.bos, self.eos, self.pad})


def pack(documents: Iterable[str], tokenizer, seq_len: int = 1024, *, batch_docs: int = 64) -> Iterator[np.ndarray]:
    """Yield int32 rows of length `seq_len`; deterministic given the documents' order."""
    if seq_len < 2:
        raise SaescopeError(f"seq_len must be at least 2, got {seq_len}")
    special = SpecialTokens.of(tokenizer)
    body = seq_len - 1
    buf: list[int] = []
    for texts in _batched(documents, batch_docs):
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            buf.extend(ids)
            buf.append(special.eos)
        while len(buf) >= body:
            yield _row(special.bos, buf[:body])
            del buf[:body]
    if buf:
        row = _row(special.bos, buf)
        row = np.concatenate([row, np.full(seq_len - len(row), special.pad, dtype=np.int32)])
        yield row


def keep_mask(ids, special_ids: list[int]):
    """True where a position is a real token (not BOS, EOS or padding). Works on numpy and torch."""
    import torch

    if isinstance(ids, torch.Tensor):
        return ~torch.isin(ids, torch.tensor(special_ids, dtype=ids.dtype, device=ids.device))
    return ~np.isin(ids, special_ids)


def _row(bos: int, tokens: list[int]) -> np.ndarray:
    return np.asarray([bos, *tokens], dtype=np.int32)


def _batched(items: Iterable[str], n: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch
