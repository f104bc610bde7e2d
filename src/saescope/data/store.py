"""The activation store: per-site folders of safetensors shards, a manifest per site, and a
store-level record that says how far a harvest got.

Why safetensors shards: a typed, header-checked, never-unpickled format that holds bfloat16 (numpy
.npy cannot), loads zero-copy in torch, numpy and JAX, and keeps each shard's activations beside
their token id / sequence / position columns in one file, so one checksum covers a whole shard.

Layout of a store folder:

    store.json                      model, sites, corpus, seq_len, committed shards (the commit record)
    sequences/00000.safetensors     tokens [n_seq, seq_len] int32 — the packed rows, for context
    resid.6/manifest.json           model, site, d_in, dtype, n_rows, norm_scalar C, shards + sha256
    resid.6/00000.safetensors       acts [rows, d_in], token_id, sequence, position (int32 [rows])

Shard k of every site and of sequences/ covers the same sequences. A shard becomes part of the
store only when store.json lists it; files a crash left behind are removed on resume."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import SaescopeError
from ..files import atomic_write, read_json, remove_temporaries, write_json
from .stream import default_buffer_rows, shuffled_batches

FORMAT = 1
STORE_FILE = "store.json"
MANIFEST = "manifest.json"
SEQUENCES = "sequences"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _shard_name(k: int) -> str:
    return f"{k:05d}.safetensors"


def read_shard(path: Path, sha256: str, nbytes: int | None = None) -> dict[str, torch.Tensor]:
    """Load one shard after checking its checksum; a missing, truncated or altered shard is named."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SaescopeError(f"shard missing: {path}") from None
    if nbytes is not None and len(data) != nbytes:
        raise SaescopeError(f"shard {path} is truncated or altered: {len(data)} bytes, manifest says {nbytes}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise SaescopeError(f"shard {path} is corrupt: sha256 {digest[:12]}… does not match the manifest's {sha256[:12]}…")
    try:
        return st_load(data)
    except SafetensorError as exc:
        raise SaescopeError(f"shard {path} cannot be read: {exc}") from None


class _ShardFile:
    """One safetensors shard written as its rows arrive. The row count is known before the model
    runs (it is the number of non-special tokens), so the header is fixed up front and the sha256 is
    updated as bytes go out. Only the commit fsyncs: syncing per batch is slower (bench/harvest.py)."""

    _CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int32: "I32"}

    def __init__(self, path: Path, head: dict[str, torch.Tensor], tail: tuple[str, tuple[int, ...], torch.dtype]):
        self.path = path
        name, shape, self.dtype = tail
        self.shape = shape
        header, offset = {}, 0
        for key, t in head.items():
            header[key] = {"dtype": self._CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        size = self.dtype.itemsize * shape[0] * shape[1]
        header[name] = {"dtype": self._CODES[self.dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = path.with_name(f".{path.name}.partial")
        self.file = self.tmp.open("wb")
        self.hash = hashlib.sha256()
        self.nbytes = 0
        self.rows = 0
        self._out(struct.pack("<Q", len(raw)) + raw)
        for t in head.values():
            self._out(t.contiguous().view(torch.uint8).numpy())

    def _out(self, data) -> None:
        self.file.write(data)
        self.hash.update(data)
        self.nbytes += len(data) if isinstance(data, bytes) else data.nbytes

    def append(self, x: torch.Tensor) -> None:
        if x.shape[1:] != self.shape[1:] or self.rows + x.shape[0] > self.shape[0]:
            raise SaescopeError(f"{self.path}: got rows {tuple(x.shape)} after {self.rows}, expected {self.shape} in all")
        self._out(x.to(self.dtype).contiguous().view(torch.uint8).numpy())
        self.rows += x.shape[0]

    def commit(self) -> dict:
        if self.rows != self.shape[0]:
            raise SaescopeError(f"{self.path}: {self.rows} of {self.shape[0]} rows written")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "rows": self.shape[0], "bytes": self.nbytes, "sha256": self.hash.hexdigest()}

    def abandon(self) -> None:
        try:
            self.file.close()  # flushes: on a full disk this fails too
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


class StoreWriter:
    """Appends shards to a store, committing each one atomically; reopening resumes.

    A shard is written in three steps, so that the model's forward overlaps the disk:
    `begin_shard(tokens)`, `append(acts)` once per forward batch, `commit_shard()`."""

    def __init__(self, root: str | os.PathLike, *, model: str, sites: dict[str, int], dtype: str,
                 seq_len: int, corpus: dict, special_ids: list[int]):
        self.root = Path(root)
        self.dtype = dtype
        self.sites = dict(sites)
        self.special_ids = list(special_ids)
        self._open: dict[str, _ShardFile] = {}
        settings = {"model": model, "sites": list(self.sites), "dtype": dtype, "seq_len": seq_len, "corpus": corpus}
        record_path = self.root / STORE_FILE
        if record_path.is_file():
            record = read_json(record_path)
            old = {k: record.get(k) for k in settings}
            if old != settings:
                diff = ", ".join(f"{k}: {old[k]!r} → {settings[k]!r}" for k in settings if old[k] != settings[k])
                raise SaescopeError(f"{self.root} holds a store made with other settings ({diff}); use another output folder")
            self.record = record
            self._drop_uncommitted()
        else:
            if self.root.exists() and any(self.root.iterdir()):
                raise SaescopeError(f"output folder {self.root} exists and is not an activation store; use another folder")
            self.record = {"format": FORMAT, **settings, "special_ids": self.special_ids, "n_sequences": 0,
                           "n_tokens": 0, "n_rows": 0, "complete": False, "shards": []}
            self.manifests = {}
            for site, d_in in self.sites.items():
                self.manifests[site] = {"format": FORMAT, "model": model, "site": site, "d_in": d_in, "dtype": dtype,
                                        "seq_len": seq_len, "n_rows": 0, "sum_sq_norm": 0.0, "norm_scalar": None,
                                        "shards": []}
                write_json(self.root / site / MANIFEST, self.manifests[site])
            write_json(record_path, self.record)

    def _drop_uncommitted(self) -> None:
        """Trim manifests back to the committed shard count and delete stray files."""
        n = len(self.record["shards"])
        self.manifests = {}
        for site in self.sites:
            m = read_json(self.root / site / MANIFEST)
            if len(m["shards"]) > n:
                _trim(m, n)
                write_json(self.root / site / MANIFEST, m)
            self.manifests[site] = m
        keep = {_shard_name(k) for k in range(n)}
        for folder in [SEQUENCES, *self.sites]:
            for f in (self.root / folder).glob("*.safetensors"):
                if f.name not in keep:
                    f.unlink()
            remove_temporaries(self.root / folder)
        for f in self.root.glob(f".{STORE_FILE}.*"):  # the record's own write, killed before its rename
            f.unlink()

    @property
    def complete(self) -> bool:
        return self.record["complete"]

    @property
    def n_sequences(self) -> int:
        return self.record["n_sequences"]

    def begin_shard(self, tokens: torch.Tensor) -> None:
        """Open shard files for these packed rows; their non-special positions are the shard's rows."""
        tokens = tokens.to(torch.int32)
        keep = ~torch.isin(tokens, torch.tensor(self.special_ids, dtype=torch.int32))
        seq, pos = torch.nonzero(keep, as_tuple=True)
        meta = {"token_id": tokens[keep], "sequence": (seq + self.n_sequences).to(torch.int32),
                "position": pos.to(torch.int32)}
        rows = int(keep.sum())
        name = _shard_name(len(self.record["shards"]))
        self._tokens = tokens
        self._sum_sq = dict.fromkeys(self.sites, 0.0)
        self._open = {site: _ShardFile(self.root / site / name, meta, ("acts", (rows, d), _DTYPES[self.dtype]))
                      for site, d in self.sites.items()}

    def append(self, acts: dict[str, torch.Tensor]) -> None:
        """Add the next rows of every site (in token order); non-finite values stop the harvest."""
        for site, x in acts.items():
            sum_sq = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
            if not math.isfinite(sum_sq):
                k = len(self.record["shards"])
                self.abandon()
                raise SaescopeError(f"non-finite activations at {site} in shard {k}; the store keeps its first {k} shards")
            self._sum_sq[site] += sum_sq
            self._open[site].append(x)

    def commit_shard(self) -> None:
        entries = {site: f.commit() for site, f in self._open.items()}
        seq_entry = self._put(SEQUENCES, _shard_name(len(self.record["shards"])), {"tokens": self._tokens.contiguous()})
        rows = next(iter(entries.values()))["rows"]
        for site, entry in entries.items():
            entry["sum_sq_norm"] = self._sum_sq[site]
            m = self.manifests[site]
            m["shards"].append(entry)
            m["n_rows"] += rows
            m["sum_sq_norm"] += entry["sum_sq_norm"]
            m["norm_scalar"] = _norm_scalar(m)
            write_json(self.root / site / MANIFEST, m)
        rec = self.record
        rec["shards"].append(seq_entry)
        rec["n_sequences"] += int(self._tokens.shape[0])
        rec["n_tokens"] += int(self._tokens.numel())
        rec["n_rows"] += rows
        write_json(self.root / STORE_FILE, rec)
        self._open = {}

    def abandon(self) -> None:
        for f in self._open.values():
            f.abandon()
        self._open = {}

    def _put(self, folder: str, name: str, tensors: dict[str, torch.Tensor]) -> dict:
        data = st_save(tensors)
        atomic_write(self.root / folder / name, data)
        first = next(iter(tensors.values()))
        return {"file": name, "rows": int(first.shape[0]), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    def finish(self, **info) -> None:
        self.record.update(info, complete=True)
        write_json(self.root / STORE_FILE, self.record)


def _trim(m: dict, n: int) -> None:
    """Cut a site manifest back to its first n shards (a crash left it ahead of store.json)."""
    m["shards"] = m["shards"][:n]
    m["n_rows"] = sum(e["rows"] for e in m["shards"])
    m["sum_sq_norm"] = sum(e["sum_sq_norm"] for e in m["shards"])
    m["norm_scalar"] = _norm_scalar(m)


def _norm_scalar(m: dict) -> float | None:
    """C with E‖x/C‖² = 1 over the stored rows (SPEC §2)."""
    return (m["sum_sq_norm"] / m["n_rows"]) ** 0.5 if m["n_rows"] else None


class ActivationStore:
    """Read side of a store (or of one site folder): manifests, shards, shuffled batches."""

    produced = False  # its rows cost a read, not a model forward: any rank may read any part

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._pool: list[int] | None = None  # a part's shards (see `part`); None: all
        if (self.root / STORE_FILE).is_file():
            self.record = read_json(self.root / STORE_FILE)
            self._site_dirs = {s: self.root / s for s in self.record["sites"]}
        elif (self.root / MANIFEST).is_file():
            self.record = None
            m = read_json(self.root / MANIFEST)
            self._site_dirs = {m["site"]: self.root}
        else:
            raise SaescopeError(f"{self.root} is not an activation store (no {STORE_FILE} or {MANIFEST})")
        self.manifests = {s: read_json(d / MANIFEST) for s, d in self._site_dirs.items()}
        if self.record is not None:
            n = len(self.record["shards"])
            for m in self.manifests.values():  # a crash between manifest and record writes: trust the record
                if len(m["shards"]) > n:
                    _trim(m, n)

    @property
    def sites(self) -> list[str]:
        return list(self.manifests)

    @property
    def model_name(self) -> str | None:
        return next(iter(self.manifests.values())).get("model")

    @property
    def corpus(self) -> dict | None:
        """The corpus settings the store was harvested with (which documents its rows come from)."""
        return (self.record or {}).get("corpus")

    def _site(self, site) -> str:
        key = str(site)
        if key not in self.manifests:
            from ..lm.sites import Site

            key = str(Site.parse(site))
        if key not in self.manifests:
            raise SaescopeError(f"site {key} is not in store {self.root}; it holds {', '.join(self.sites)}")
        return key

    def d_in(self, site) -> int:
        return self.manifests[self._site(site)]["d_in"]

    def norm_scalar(self, site) -> float:
        c = self.manifests[self._site(site)]["norm_scalar"]
        if c is None:
            raise SaescopeError(f"store {self.root} has no rows for {site} yet")
        return c

    def n_rows(self, site=None) -> int:
        m = self.manifests[self._site(site if site is not None else self.sites[0])]
        return m["n_rows"] if self._pool is None else sum(m["shards"][k]["rows"] for k in self._pool)

    def part(self, index: int, parts: int) -> "ActivationStore":
        """Data part `index` of `parts`: shards index, index + parts, … (a rank reads only its own).
        The normalisation scalar stays the whole store's."""
        if parts == 1:
            return self
        if self.n_shards < parts:
            raise SaescopeError(f"store {self.root} has {self.n_shards} shards, fewer than the {parts} data parts that "
                                "share it; harvest with a smaller --shard-mb, or use fewer parts")
        view = copy.copy(self)
        view._pool = list(range(index, self.n_shards, parts))
        return view

    @property
    def n_shards(self) -> int:
        return len(self.manifests[self.sites[0]]["shards"])

    def shard(self, site, k: int) -> dict[str, torch.Tensor]:
        """Shard k of a site: acts plus token_id / sequence / position, checksum verified."""
        site = self._site(site)
        entry = self.manifests[site]["shards"][k]
        return read_shard(self._site_dirs[site] / entry["file"], entry["sha256"], entry.get("bytes"))

    def sequences(self, k: int) -> torch.Tensor:
        """The packed token rows of shard k ([n_seq, seq_len] int32)."""
        if self.record is None:
            raise SaescopeError(f"{self.root} is a single site folder; token rows live in its store's {SEQUENCES}/")
        entry = self.record["shards"][k]
        return read_shard(self.root / SEQUENCES / entry["file"], entry["sha256"], entry.get("bytes"))["tokens"]

    def iter_shards(self, site, shards: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        for k in shards if shards is not None else range(self.n_shards):
            yield self.shard(site, k)

    def default_buffer(self, sites) -> int:
        """Shuffle-buffer rows when none is set: about 10^6, fewer when memory is short."""
        return default_buffer_rows(sum(self.d_in(s) for s in sites) * 4)

    def batches(self, batch_size: int, *, sites=None, seed: int = 0, epochs: int = 1,
                buffer_rows: int | None = None, drop_last: bool = False,
                shards: list[int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
        """Shuffled float32 batches {site: [batch, d_in]}; rows stay aligned across sites, so
        a transcoder sees the mlp_in and mlp of the same token. Shard order is reshuffled each
        epoch; a shuffle buffer of `buffer_rows` rows mixes rows across shards."""
        keys = [self._site(s) for s in (sites if sites is not None else self.sites)]
        pool = list(shards if shards is not None else self._pool if self._pool is not None else range(self.n_shards))
        if not pool:
            raise SaescopeError(f"store {self.root} has no shards to read")
        total = sum(self.manifests[keys[0]]["shards"][k]["rows"] for k in pool) * epochs
        rows = buffer_rows if buffer_rows is not None else self.default_buffer(keys)
        gen = torch.Generator().manual_seed(seed)

        def chunks():
            for _ in range(epochs):
                for k in torch.randperm(len(pool), generator=gen).tolist():
                    yield {s: self.shard(s, pool[k])["acts"] for s in keys}

        return shuffled_batches(chunks(), batch_size, max(batch_size, min(rows, total)), gen, drop_last=drop_last)

    def summary(self) -> str:
        lines = [f"activation store {self.root}"]
        if self.record:
            r = self.record
            state = "complete" if r["complete"] else "incomplete (rerun the harvest to resume)"
            lines.append(f"  model {r['model']}, {r['n_sequences']} sequences × {r['seq_len']} = {r['n_tokens']} tokens, "
                         f"{r['n_rows']} rows kept (BOS/EOS/pad excluded), {len(r['shards'])} shards, {state}")
        for s, m in self.manifests.items():
            size = sum(e["bytes"] for e in m["shards"]) / 2**20
            c = f"{m['norm_scalar']:.2f}" if m["norm_scalar"] else "n/a"
            lines.append(f"  {s:>10}: d_in {m['d_in']}, {m['dtype']}, {m['n_rows']} rows, norm scalar C = {c}, {size:.1f} MiB")
        return "\n".join(lines)
