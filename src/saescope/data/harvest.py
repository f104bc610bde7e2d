"""Model → activations: into a store on disk (resumable), or straight to a consumer with no disk."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..config import CorpusConfig, HarvestConfig
from ..errors import SaescopeError, first_line
from ..lm import LanguageModel, capture, load_model, parse_sites
from .corpus import iter_documents
from .store import ActivationStore, StoreWriter
from .stream import default_buffer_rows, norm_scalar_of, shuffled_batches
from .tokens import SpecialTokens, keep_mask, pack

log = logging.getLogger(__name__)


def token_rows(lm: LanguageModel, corpus: CorpusConfig) -> Iterator[np.ndarray]:
    """The packed rows of the corpus for this model's tokenizer, in their deterministic order."""
    return pack(iter_documents(corpus), lm.tokenizer, corpus.seq_len)


def token_tensor(lm: LanguageModel, corpus: CorpusConfig, tokens: int) -> torch.Tensor:
    """The first ⌈tokens / seq_len⌉ packed rows of the corpus as one tensor [n_seq, seq_len]."""
    rows = list(islice(token_rows(lm, corpus), max(1, math.ceil(tokens / corpus.seq_len))))
    if not rows:
        raise SaescopeError(f"the {corpus.split} split of {corpus.source} has no text")
    return torch.from_numpy(np.stack(rows))


def _kept(acts: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each site's rows at non-special positions, as float32 on the CPU, in token order."""
    flat = keep.reshape(-1)
    return {s: a.reshape(-1, a.shape[-1])[flat.to(a.device)].float().cpu() for s, a in acts.items()}


def harvest(cfg: HarvestConfig, out: str | Path, *, lm: LanguageModel | None = None, progress: bool = True,
            min_shards: int = 1) -> ActivationStore:
    """Run the model over `cfg.tokens` tokens and write every site's activations to `out`, in
    shards of about `cfg.shard_mb`, smaller where that makes at least `min_shards` (so that many
    data-parallel ranks each get their own).

    Rerunning with the same settings resumes after the last committed shard. A writer thread
    masks, checks, hashes and writes each batch while the model computes the next one."""
    lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
    sites = [s.check(lm) for s in parse_sites(cfg.sites)]
    seq_len = cfg.corpus.seq_len
    n_seq_total = math.ceil(cfg.tokens / seq_len)
    widths = {str(s): s.width(lm) for s in sites}
    bytes_per_row = sum(widths.values()) * (4 if cfg.dtype == "float32" else 2)
    shard_seqs = max(1, min(int(cfg.shard_mb * 2**20 / bytes_per_row) // seq_len, n_seq_total // min_shards))
    special = SpecialTokens.of(lm.tokenizer).ids
    fresh = not Path(out).exists()
    writer = StoreWriter(out, model=lm.name, sites=widths, dtype=cfg.dtype, seq_len=seq_len,
                         corpus=cfg.corpus.model_dump(), special_ids=special)

    def drop_if_empty():  # a store this call made and nothing was committed to: leave no folder behind
        if fresh and not writer.record["shards"]:
            shutil.rmtree(out, ignore_errors=True)
    if writer.complete:
        log.info("store %s is already complete", out)
        return ActivationStore(out)
    done = writer.n_sequences
    try:
        rows = islice(token_rows(lm, cfg.corpus), done, n_seq_total)
    except SaescopeError:
        drop_if_empty()
        raise
    bar = tqdm(total=n_seq_total * seq_len, initial=done * seq_len, unit="tok", unit_scale=True,
               desc=f"harvest {','.join(widths)}", disable=not progress)
    special_t = torch.tensor(special)
    in_flight: deque[Future] = deque()
    with ThreadPoolExecutor(max_workers=1) as pool:  # one worker: shard steps stay in order

        def submit(fn, *args):
            in_flight.append(pool.submit(fn, *args))
            while len(in_flight) > 2:  # bounds memory to about two batches of activations
                in_flight.popleft().result()

        try:
            while shard := list(islice(rows, shard_seqs)):
                tokens = torch.from_numpy(np.stack(shard)).long()
                submit(writer.begin_shard, tokens)
                for i in range(0, len(tokens), cfg.batch_size):
                    ids = tokens[i:i + cfg.batch_size]
                    acts = capture(lm, ids, sites)
                    submit(lambda a=acts, k=~torch.isin(ids, special_t): writer.append(_kept(a, k)))
                    bar.update(ids.numel())
                submit(writer.commit_shard)
                done += len(tokens)
            while in_flight:
                in_flight.popleft().result()
        except BaseException as exc:
            for f in in_flight:
                f.cancel()
            pool.shutdown(wait=True)
            writer.abandon()
            drop_if_empty()
            if isinstance(exc, OSError):  # a full disk, a lost mount: what is committed stays usable
                raise SaescopeError(f"cannot write the store {out} ({exc.strerror or first_line(exc)}); it keeps its "
                                    f"first {len(writer.record['shards'])} shards: make room and rerun to resume") from None
            raise
    bar.close()
    if done == 0:
        drop_if_empty()
        raise SaescopeError(f"corpus {cfg.corpus.source} (split {cfg.corpus.split}) gave no text")
    if done < n_seq_total:
        log.warning("corpus %s ran out after %d sequences (%d tokens) of the %d tokens asked for",
                    cfg.corpus.source, done, done * seq_len, cfg.tokens)
    writer.finish(tokens_requested=cfg.tokens, corpus_exhausted=done < n_seq_total)
    return ActivationStore(out)


class HarvestStream:
    """The store's consumer interface with no disk: the model runs as batches are drawn.

    The normalisation scalar C is estimated from the first `estimate_rows` rows, which are then
    fed to the consumer too, so no forward pass is wasted. Data part `index` of `parts` (see
    `part`) reads packed rows index, index + parts, … of the corpus."""

    produced = True  # its rows cost a model forward: ranks split the making and share the rows

    def __init__(self, cfg: HarvestConfig, *, lm: LanguageModel | None = None, estimate_rows: int = 32_768,
                 part: tuple[int, int] = (0, 1)):
        self.cfg = cfg
        self.lm = lm or load_model(cfg.model, device=cfg.device, dtype=cfg.model_dtype)
        self._sites = [s.check(self.lm) for s in parse_sites(cfg.sites)]
        self._special = SpecialTokens.of(self.lm.tokenizer).ids
        index, parts = part
        self._rows = islice(token_rows(self.lm, cfg.corpus), index, None, parts)
        self._n_seq = len(range(index, math.ceil(cfg.tokens / cfg.corpus.seq_len), parts))
        self._seq = 0
        self._head: list[dict[str, torch.Tensor]] = []
        self._norm: dict[str, float] = {}
        self._estimate_rows = estimate_rows

    def part(self, index: int, parts: int) -> "HarvestStream":
        """Data part `index` of `parts`, on the same model; its C is estimated from its own rows."""
        if parts == 1:
            return self
        return HarvestStream(self.cfg, lm=self.lm, estimate_rows=self._estimate_rows, part=(index, parts))

    @property
    def sites(self) -> list[str]:
        return [str(s) for s in self._sites]

    @property
    def model_name(self) -> str:
        return self.lm.name

    @property
    def corpus(self) -> dict:
        return self.cfg.corpus.model_dump()

    def d_in(self, site) -> int:
        return self._site(site).width(self.lm)

    def _site(self, site):
        for s in self._sites:
            if str(s) == str(site) or s == site:
                return s
        raise SaescopeError(f"site {site} is not harvested by this stream; it reads {', '.join(self.sites)}")

    def default_buffer(self, sites) -> int:
        """Shuffle-buffer rows when none is set: about 10^6, fewer when memory is short."""
        return default_buffer_rows(sum(self.d_in(s) for s in sites) * 4)

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
                self._norm[s] = norm_scalar_of(torch.cat([c[s] for c in self._head]))
        return self._norm[str(self._site(site))]

    def _next_chunk(self) -> dict[str, torch.Tensor] | None:
        left = self._n_seq - self._seq
        rows = list(islice(self._rows, min(self.cfg.batch_size, left)))
        if not rows:
            return None
        ids = torch.from_numpy(np.stack(rows)).long()
        acts = _kept(capture(self.lm, ids, self._sites), keep_mask(ids, self._special))
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
        rows = buffer_rows if buffer_rows is not None else self.default_buffer(keys)
        rows = min(rows, max(batch_size, self._n_seq * self.cfg.corpus.seq_len))
        bar = tqdm(unit="row", unit_scale=True, desc="harvest (streaming)", disable=not progress)
        gen = torch.Generator().manual_seed(seed)
        yield from shuffled_batches(self._chunks(keys, bar), batch_size, rows, gen, drop_last=drop_last)
        bar.close()
