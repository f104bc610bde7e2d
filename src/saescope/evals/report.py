"""Evaluation results as files: JSON records and a markdown table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..config import CorpusConfig
from ..data import token_rows
from ..errors import SaescopeError
from ..files import atomic_write
from ..lm import load_model
from ..sae.formats import detect_format, load_sae
from .metrics import evaluate

TABLE_KEYS = ("l0", "fvu", "fvu_without_massive_dims", "delta_loss", "ce_loss_recovered", "kl", "dead_fraction",
              "dense_fraction")


def find_saes(paths: list[str]) -> dict[str, Path]:
    """Each path is an SAE (any format) or a folder whose subfolders are SAEs."""
    found: dict[str, Path] = {}
    for text in paths:
        path = Path(text)
        if detect_format(path) or path.name == "canonical":
            found[path.parent.name if path.name in ("params.npz", "canonical") else path.name] = path
            continue
        subs = [p for p in sorted(path.iterdir()) if p.is_dir() and detect_format(p)] if path.is_dir() else []
        if not subs:
            raise SaescopeError(f"{path} is not an SAE and holds no SAE folders")
        found.update({p.name: p for p in subs})
    return found


def heldout_rows(lm, corpus: CorpusConfig, tokens: int) -> torch.Tensor:
    n_seq = max(1, math.ceil(tokens / corpus.seq_len))
    rows = [r for _, r in zip(range(n_seq), token_rows(lm, corpus))]
    if not rows:
        raise SaescopeError(f"the {corpus.split} split of {corpus.source} has no text")
    return torch.from_numpy(np.stack(rows))


def evaluate_paths(paths: list[str], model: str, corpus: CorpusConfig, tokens: int, out: str | Path, *,
                   batch_size: int = 1, device: str = "cpu", site: str | None = None, progress: bool = True) -> list[dict]:
    """Load the SAEs and the model, evaluate on held-out rows, write JSON and markdown."""
    found = find_saes(paths)
    saes = {name: load_sae(p) for name, p in found.items()}
    lm = load_model(model, device=device)
    records = evaluate({k: v.to(lm.device) for k, v in saes.items()}, lm, heldout_rows(lm, corpus, tokens),
                       batch_size=batch_size, site=site, progress=progress)
    result = [{**rec, "path": str(found[name])} for name, rec in records.items()]
    write_results(result, Path(out))
    return result


def write_results(records: list[dict], out: Path) -> None:
    atomic_write(out, json.dumps(records, indent=1).encode())
    atomic_write(out.with_suffix(".md"), markdown_table(records).encode())


def markdown_table(records: list[dict]) -> str:
    head = "| SAE | site | d_sae | " + " | ".join(TABLE_KEYS) + " |"
    lines = [head, "|" + "---|" * (3 + len(TABLE_KEYS))]
    for r in records:
        cells = [f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k)) for k in TABLE_KEYS]
        lines.append(f"| {r['sae']} | {r['site']} | {r['d_sae']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
