"""The text and activations bench/quality.py trains and evaluates on, made once and kept.

Training text: the docstrings of every module, class and function in the packages of our venv
(its pins make it the same on every machine: technical English, ~10M Gemma tokens), read with
the built-in corpus's parser, duplicates dropped. In-distribution held-out text: the documents
that corpus's hash holds out. Out-of-distribution held-out text: Debian's `fortunes` (quotations,
literature, verse, jokes: prose unlike the docstrings), grouped into documents of 30.

Why not the built-in corpus alone: it holds ~0.5M tokens, so a 1M-token budget would read it
twice; here the store holds `--tokens` distinct rows, and larger budgets re-read it (the table
says how often)."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

FORTUNES = Path("/usr/share/games/fortunes")
PROSE_FILES = ("literature", "people", "wisdom", "love", "songs-poems", "humorists", "education", "food",
               "law", "science", "politics", "medicine", "news", "pets", "sports", "work", "platitudes",
               "miscellaneous", "fortunes", "goedel", "kids", "riddles", "men-women", "magic", "startrek")


def docstring_corpus(path: Path) -> Path:
    """One JSON line per distinct docstring of the venv's packages (written once)."""
    if path.is_file():
        return path
    from saescope.data.corpus import _docstrings

    root = Path(sysconfig.get_paths()["purelib"])
    seen, tmp = set(), path.with_suffix(".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tmp.open("w") as f:
        for source in sorted(root.rglob("*.py")):
            for doc in _docstrings(source):
                key = hashlib.sha1(doc.encode()).digest()
                if key not in seen:
                    seen.add(key)
                    f.write(json.dumps({"text": doc}) + "\n")
    tmp.rename(path)
    return path


def prose_corpus(path: Path, per_document: int = 30) -> Path:
    """Debian's fortunes as documents of `per_document` quotations (written once)."""
    if path.is_file():
        return path
    if not FORTUNES.is_dir():
        raise SystemExit(f"{FORTUNES} is missing: apt-get install fortunes (the out-of-distribution held-out text)")
    quotes = []
    for name in PROSE_FILES:
        f = FORTUNES / name
        if f.is_file():
            quotes += [q.strip() for q in f.read_text(encoding="utf-8", errors="replace").split("\n%\n") if q.strip()]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for i in range(0, len(quotes), per_document):
            f.write(json.dumps({"text": "\n\n".join(quotes[i:i + per_document])}) + "\n")
    return path
