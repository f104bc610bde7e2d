"""Model → activations: into a store on disk (resumable), or straight to a consumer with no disk."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import CorpusConfig, HarvestConfig
from ..errors import SaescopeError
from ..lm import LanguageModel, capture, load_model, parse_sites
from .corpus import iter_documents
from .store import ActivationStore, StoreWriter
from .stream import default_buffer_rows, shuffled_batches
from .tokens import SpecialTokens, keep_mask, pack

log = logging.getLogger(__name__)


def token_rows(lm: LanguageModel, corpus: CorpusConfig) -> Iterator[np.ndarray]:
    """The packed rows of the corpus for this model's tokenizer, in their deterministic order."""
    return pack(iter_documents(corpus), lm.tokenizer, corpus.seq_len)


def _kept_rows(lm, sites, ids: torch.Tensor, special: list[int], first_seq: int):
    """One forward over `ids`; returns each site's non-special rows and their (token, sequence, position)."""
    acts = capture(lm, ids, sites)
    keep = keep_mask(ids, special)
    flat = keep.reshape(-1).to(next(iter(acts.values())).device)
    seq, pos = torch.nonzero(keep, as_tuple=True)
    meta = {"token_id": ids[keep], "sequence": seq + first_seq, "position": pos}
    out = {s: a.reshape(-1, a.shape[-1])[flat].float().cpu() for s, a in acts.items()}
    return out, meta


def harvest(cfg: HarvestConfig, out: str | Path, *, lm: LanguageModel | None = None, progress: bool = True) -> ActivationStore:
    """Run the model over `cfg.tokens` tokens and write every site's activations to `out`.

    Rerunning with the same settings resumes after the last committed shard. Shards are written
    by a background thread, so the disk works while the model computes the next batch."""
    lm = lm or load_model(cfg.model, device=cfg.device)
    sites = [s.check(lm) for s in parse_sites(cfg.sites)]
    seq_len = cfg.corpus.seq_len
    n_seq_total = math.ceil(cfg.tokens / seq_len)
    widths = {str(s): s.width(lm) for s in sites}
    bytes_per_row = max(widths.values()) * (4 if cfg.dtype == "float32" else 2)
    shard_seqs = max(1, int(cfg.shard_mb * 2**20 / bytes_per_row) // seq_len)
    writer = StoreWriter(out, model=lm.name, sites=widths, dtype=cfg.dtype, seq_len=seq_len,
                         corpus=cfg.corpus.model_dump(), shard_rows=shard_seqs * seq_len)
    if writer.complete:
        log.info("store %s is already complete", out)
        return ActivationStore(out)
    special = SpecialTokens.of(lm.tokenizer).ids
    done = writer.n_sequences
    rows = islice(token_rows(lm, cfg.corpus), done, n_seq_total)
    bar = tqdm(total=n_seq_total * seq_len, initial=done * seq_len, unit="tok", unit_scale=True,
               desc=f"harvest {','.join(widths)}", disable=not progress)
    pending: Future | None = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        while True:
            shard_rows = list(islice(rows, shard_seqs))
            if not shard_rows:
                break
            tokens = torch.from_numpy(np.stack(shard_rows))
            parts, metas = [], []
            for i in range(0, len(tokens), cfg.batch_size):
                ids = tokens[i:i + cfg.batch_size]
                acts, meta = _kept_rows(lm, sites, ids, special, done + i)
                parts.append(acts)
                metas.append(meta)
                bar.update(ids.numel())
            acts = {s: torch.cat([p[s] for p in parts]) for s in widths}
            meta = {k: torch.cat([m[k] for m in metas]) for k in metas[0]}
            if pending is not None:
                pending.result()  # one shard in flight at a time keeps commits in order
            pending = pool.submit(writer.write_shard, tokens, acts, **meta)
            done += len(tokens)
        if pending is not None:
            pending.result()
    bar.close()
    if done < n_seq_total:
        log.warning("corpus %s ran out after %d sequences (%d tokens) of the %d tokens asked for",
                    cfg.corpus.source, done, done * seq_len, cfg.tokens)
    if done == 0:
        raise SaescopeError(f"corpus {cfg.corpus.source} (split {cfg.corpus.split}) gave no text")
    writer.finish(tokens_requested=cfg.tokens, corpus_exhausted=done < n_seq_total)
    return ActivationStore(out)


class HarvestStream:
    """The store's consumer interface with no disk: the model runs as batches are drawn.

    The normalisation scalar C is estimated from the first `estimate_rows` rows, which are then
    fed to the consumer too, so no forward pass is wasted."""

    def __init__(self, cfg: HarvestConfig, *, lm: LanguageModel | None = None, estimate_rows: int = 32_768):
        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, device=cfg.device)
        self._sites = [s.check(self.lm) for s in parse_sites(cfg.sites)]
        self._special = SpecialTokens.of(self.lm.tokenizer).ids
        self._rows = token_rows(self.lm, cfg.corpus)
        self._n_seq = math.ceil(cfg.tokens / cfg.corpus.seq_len)
        self._seq = 0
        self._head: list[dict[str, torch.Tensor]] = []
        self._norm: dict[str, float] = {}
        self._estimate_rows = estimate_rows

    @property
    def sites(self) -> list[str]:
        return [str(s) for s in self._sites]

    def d_in(self, site) -> int:
        return self._site(site).width(self.lm)

    def _site(self, site):
        for s in self._sites:
            if str(s) == str(site) or s == site:
                return s
        raise SaescopeError(f"site {site} is not harvested by this stream; it reads {', '.join(self.sites)}")

    def norm_scalar(self, site) -> float:
        if not self._norm:
            seen = 0
            while seen < self._estimate_rows:
                chunk = self._next_chunk()
                if chunk is None:
                    break
                self._head.append(chunk)
                seen += next(iter(chunk.values())).shape[0]
            if not self._head:
                raise SaescopeError(f"corpus {self.cfg.corpus.source} gave no text")
            for s in self.sites:
                x = torch.cat([c[s] for c in self._head]).double()
                self._norm[s] = float(x.pow(2).sum(1).mean().sqrt())
        return self._norm[str(self._site(site))]

    def _next_chunk(self) -> dict[str, torch.Tensor] | None:
        left = self._n_seq - self._seq
        rows = list(islice(self._rows, min(self.cfg.batch_size, left)))
        if not rows:
            return None
        acts, _ = _kept_rows(self.lm, self._sites, torch.from_numpy(np.stack(rows)), self._special, self._seq)
        self._seq += len(rows)
        return acts

    def _chunks(self, sites: list[str], bar) -> Iterator[dict[str, torch.Tensor]]:
        start = time.perf_counter()
        while self._head or self._seq < self._n_seq:
            chunk = self._head.pop(0) if self._head else self._next_chunk()
            if chunk is None:
                break
            bar.update(next(iter(chunk.values())).shape[0])
            bar.set_postfix_str(f"{bar.n / max(time.perf_counter() - start, 1e-9):.0f} rows/s", refresh=False)
            yield {s: chunk[s] for s in sites}

    def batches(self, batch_size: int, *, sites=None, seed: int = 0, epochs: int = 1,
                buffer_rows: int | None = None, drop_last: bool = False, progress: bool = True):
        """Shuffled float32 batches {site: [batch, d_in]}, as `ActivationStore.batches` gives."""
        if epochs != 1:
            raise SaescopeError("a disk-less harvest stream is read once; harvest to a store for several epochs")
        keys = [str(self._site(s)) for s in (sites if sites is not None else self.sites)]
        rows = buffer_rows if buffer_rows is not None else default_buffer_rows(sum(self.d_in(s) for s in keys) * 4)
        rows = min(rows, max(batch_size, self._n_seq * self.cfg.corpus.seq_len))
        bar = tqdm(unit="row", unit_scale=True, desc="harvest (streaming)", disable=not progress)
        gen = torch.Generator().manual_seed(seed)
        yield from shuffled_batches(self._chunks(keys, bar), batch_size, rows, gen, drop_last=drop_last)
        bar.close()
