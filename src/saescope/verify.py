"""`saescope verify`: read back what the pipeline wrote and say, per part, whether it is whole —
an activation store (every shard's checksum, shape and the manifests' sums), SAE folders (any
format: they load, and their weights are finite), a training folder's checkpoint and metrics log,
a feature database (SQLite's integrity check and its tables) and a report (its JSON and pictures).
Given a folder it verifies what it recognises inside, so a `saescope run` folder is checked whole."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SaescopeError, first_line
from .files import read_json, read_records

PNG = b"\x89PNG\r\n\x1a\n"
DB_TABLES = {"meta", "saes", "latents", "examples", "logits", "neighbours", "sequences", "vocab"}


@dataclass
class Check:
    what: str                  # the path checked
    detail: str                # what it holds (or what was wrong)
    ok: bool = True


def verify(path: str | Path) -> list[Check]:
    """Every check under `path`; a one-line error when there is nothing to check."""
    path = Path(path)
    if not path.exists():
        raise SaescopeError(f"nothing at {path}")
    checks: list[Check] = []
    _walk(path, checks)
    if not checks:
        raise SaescopeError(f"{path} holds nothing to verify: no activation store, SAE, checkpoint, metrics log, "
                            "feature database or report")
    return checks


def _walk(path: Path, checks: list[Check]) -> None:
    from .sae.formats import detect_format

    if path.is_file():
        kind = {".db": _database, ".jsonl": _metrics, ".npz": _sae}.get(path.suffix)
        if path.name in ("report.json", "eval.json"):
            kind = _records
        if kind:
            checks.append(_guarded(kind, path))
        return
    if (path / "store.json").is_file() or (path / "manifest.json").is_file():
        checks.append(_guarded(_store, path))
        return
    if detect_format(path):
        checks.append(_guarded(_sae, path))
        return
    if (path / "state.json").is_file() and path.name == "checkpoint":
        checks.append(_guarded(_checkpoint, path))
        return
    if (path / "report.md").is_file():
        checks.append(_guarded(_pictures, path / "report.md"))
    for child in sorted(path.iterdir()):
        if not child.name.startswith("."):
            _walk(child, checks)


def _guarded(kind, path: Path) -> Check:
    try:
        return Check(str(path), kind(path))
    except SaescopeError as exc:
        return Check(str(path), str(exc), ok=False)
    except (OSError, ValueError, RuntimeError, KeyError, sqlite3.Error) as exc:
        return Check(str(path), f"{type(exc).__name__}: {first_line(exc)}", ok=False)


def _store(path: Path) -> str:
    from .data.store import ActivationStore

    store = ActivationStore(path)
    problems, rows = [], 0
    for site, m in store.manifests.items():
        if sum(e["rows"] for e in m["shards"]) != m["n_rows"]:
            problems.append(f"{site}: manifest rows {m['n_rows']} are not the sum of its shards'")
        for k, entry in enumerate(m["shards"]):
            try:
                shard = store.shard(site, k)
            except SaescopeError as exc:
                problems.append(str(exc))
                continue
            shape = tuple(shard["acts"].shape)
            if shape != (entry["rows"], m["d_in"]) or any(len(shard[c]) != entry["rows"] for c in ("token_id", "sequence", "position")):
                problems.append(f"{site} shard {k}: acts {shape}, manifest says ({entry['rows']}, {m['d_in']})")
        rows = m["n_rows"]
    if store.record is not None:
        for k in range(len(store.record["shards"])):
            try:
                store.sequences(k)
            except SaescopeError as exc:
                problems.append(str(exc))
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SaescopeError(problems[0] + more)
    state = "" if store.record is None or store.record["complete"] else "; incomplete: rerun the harvest to resume"
    return f"activation store: {len(store.sites)} sites, {store.n_shards} shards, {rows} rows, checksums match{state}"


def _sae(path: Path) -> str:
    from .sae.formats import load_sae

    sae = load_sae(path)
    bad = [k for k, v in sae.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise SaescopeError(f"non-finite values in {', '.join(bad)}")
    return f"SAE: {sae.cfg.arch}, d_in {sae.cfg.d_in}, {sae.cfg.d_sae} latents" + (f", {sae.cfg.site}" if sae.cfg.site else "")


def _checkpoint(path: Path) -> str:
    from .config import TrainConfig
    from .train import expand

    state = read_json(path / "state.json")
    folder = path / state["folder"]
    names = [p.name for p in expand(TrainConfig(**state["config"]))]
    for name in names:
        file = folder / f"{name}.pt"
        if not file.is_file():
            raise SaescopeError(f"checkpoint file missing: {file}")
        try:
            torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for a damaged file
            raise SaescopeError(f"checkpoint {file} cannot be read ({first_line(exc)})") from None
    return f"checkpoint of step {state['step']}: {len(names)} SAEs, {state['parts']} data parts"


def _metrics(path: Path) -> str:
    lines = path.read_text().splitlines(keepends=True)
    for n, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except ValueError:
            raise SaescopeError(f"line {n} is not JSON" + (" (cut off)" if not line.endswith("\n") else "")) from None
    return f"metrics log: {len(lines)} lines"


def _records(path: Path) -> str:
    records = read_json(path)
    if not isinstance(records, list) or not all(isinstance(r, dict) and "sae" in r for r in records):
        raise SaescopeError("not a list of per-SAE records")
    records = read_records(path)
    missing = [r["path"] for r in records if r.get("path") and not Path(r["path"]).exists()]
    if missing:
        raise SaescopeError(f"{len(missing)} SAE paths do not exist, e.g. {missing[0]}")
    return f"results of {len(records)} SAEs"


def _pictures(report: Path) -> str:
    import re

    names = re.findall(r"\]\(([^)]+\.png)\)", report.read_text())
    for name in names:
        picture = report.parent / name
        if not picture.is_file() or picture.read_bytes()[:8] != PNG:
            raise SaescopeError(f"{picture} is missing or not a PNG")
    return f"report: {len(names)} pictures"


def _database(path: Path) -> str:
    from .explore.db import connect

    con = connect(path, readonly=True)
    try:
        result = con.execute("PRAGMA integrity_check").fetchone()[0]
        if result != "ok":
            raise SaescopeError(f"SQLite integrity check: {result}")
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not DB_TABLES <= tables:
            raise SaescopeError(f"not a feature database: no {', '.join(sorted(DB_TABLES - tables))} table")
        saes = con.execute("SELECT count(*) FROM saes").fetchone()[0]
        latents = con.execute("SELECT count(*) FROM latents").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise SaescopeError(f"not a readable SQLite database ({exc})") from None
    finally:
        con.close()
    return f"feature database: {saes} SAEs, {latents} latents"
