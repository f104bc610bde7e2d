"""Where text comes from: the built-in offline corpus, local files and folders, or a Hugging Face
dataset streamed over the network. Every source yields plain document strings in a fixed order."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from ..config import BUILTIN_CORPUS as BUILTIN
from ..config import CorpusConfig
from ..errors import SaescopeError, first_line

FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
# Parts of the standard library that are tests, vendored code or generated tables, not prose.
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "ensurepip", "turtledemo"}


def iter_documents(cfg: CorpusConfig) -> Iterator[str]:
    """Documents of the configured split, shuffled deterministically by `cfg.seed`."""
    docs = (d for d in _raw_documents(cfg) if d.strip() and _keep(d, cfg))
    if cfg.shuffle_documents:
        docs = _buffer_shuffle(docs, cfg.shuffle_documents, cfg.seed)
    return docs


def _keep(doc: str, cfg: CorpusConfig) -> bool:
    """Held-out membership is a hash of the text, so it does not depend on order or seed."""
    if cfg.split == "all" or cfg.holdout_fraction == 0:
        return cfg.split != "heldout"
    bucket = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=8).digest(), "big") / 2**64
    return (bucket < cfg.holdout_fraction) == (cfg.split == "heldout")


def _buckets(cfg: CorpusConfig) -> tuple[float, float]:
    """The text-hash buckets [lo, hi) whose documents `cfg` reads (see _keep)."""
    if cfg.split == "all" or cfg.holdout_fraction == 0:
        return (0.0, 0.0) if cfg.split == "heldout" else (0.0, 1.0)
    return (0.0, cfg.holdout_fraction) if cfg.split == "heldout" else (cfg.holdout_fraction, 1.0)


def shares_documents(a: CorpusConfig, b: CorpusConfig) -> bool:
    """Whether two corpus settings read some of the same documents: the same text source, and
    hash buckets that meet (order, seed and row length do not change which documents)."""
    if (a.source, a.text_field, a.hf_split) != (b.source, b.text_field, b.hf_split):
        return False
    (lo_a, hi_a), (lo_b, hi_b) = _buckets(a), _buckets(b)
    return max(lo_a, lo_b) < min(hi_a, hi_b)


def _buffer_shuffle(items: Iterator[str], size: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    buf: list[str] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


def _raw_documents(cfg: CorpusConfig) -> Iterator[str]:
    if cfg.source == BUILTIN:
        return builtin_documents()
    if cfg.source.startswith("hf:"):
        return _hf_documents(cfg)
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise SaescopeError(f"corpus not found: {cfg.source} (expected '{BUILTIN}', a file, a folder or hf:NAME)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FILE_SUFFIXES)
        if not files:
            raise SaescopeError(f"corpus folder {path} holds no {'/'.join(FILE_SUFFIXES)} files")
        return (doc for f in files for doc in _file_documents(f, cfg.text_field))
    if path.suffix not in FILE_SUFFIXES:
        raise SaescopeError(f"corpus file {path} is not one of {', '.join(FILE_SUFFIXES)}")
    return _file_documents(path, cfg.text_field)


def _file_documents(path: Path, field: str) -> Iterator[str]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SaescopeError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get(field), str):
                    raise SaescopeError(f"{path}:{n}: no string field '{field}' (set text_field)")
                yield record[field]
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise SaescopeError(f"cannot read parquet file {path}: {exc}") from None
        if field not in table.schema_arrow.names:
            raise SaescopeError(f"{path}: no column '{field}' (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str))


def _hf_documents(cfg: CorpusConfig) -> Iterator[str]:
    name, _, config = cfg.source[3:].partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
        for record in ds:
            text = record.get(cfg.text_field)
            if not isinstance(text, str):
                raise SaescopeError(f"dataset {name} has no string field '{cfg.text_field}' (set text_field)")
            yield text
    except SaescopeError:
        raise
    except Exception as exc:  # network, missing dataset, bad config: all one line for the user
        raise SaescopeError(f"cannot stream dataset '{name}' ({first_line(exc)}); offline, use '{BUILTIN}' or local files") from None


def builtin_documents() -> Iterator[str]:
    """The offline default: Python's documentation topics, then the docstrings of every standard
    library module, class and function (read from source with `ast`, nothing imported), in a
    fixed order. About 2 MB of English technical prose, ~0.5M Gemma tokens."""
    return iter(_builtin_list())


@functools.lru_cache(maxsize=1)
def _builtin_list() -> tuple[str, ...]:
    """Parsing the standard library takes seconds; keep the 2 MB of text once per process."""
    from pydoc_data.topics import topics

    docs = [topics[name] for name in sorted(topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if not _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]):
            docs.extend(_docstrings(path))
    return tuple(docs)


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc and len(doc) >= 80:  # one-liners like "Return self." carry little text
            yield doc
