"""Fault injection: `kill -9` a harvest, a training run and an explorer build at random points
(three seeds each), rerun the same command, and check the outputs equal an uninterrupted run's."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from saescope import load_sae

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    """A tiny Gemma 3 in a folder and a corpus folder of 400 generated documents."""
    root = tmp_path_factory.mktemp("faults")
    save_tiny_model(root / "model", tokenizer)
    rng = random.Random(0)
    words = "the quick brown fox sparse latent model layer token feature residual stream python data".split()
    (root / "docs").mkdir()
    for i in range(400):
        (root / "docs" / f"{i:03d}.txt").write_text(" ".join(rng.choice(words) for _ in range(300)) + ".")
    return root


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "saescope", "-q", *args]


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _at_work(cmd: list[str], started) -> subprocess.Popen:
    """Start `cmd` and return once `started()` says it is at work (past imports and loading)."""
    job = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started():
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()
        time.sleep(0.01)
    return job


def _work_seconds(cmd: list[str], started) -> float:
    """The uninterrupted run: how long it works once started."""
    job = _at_work(cmd, started)
    start = time.monotonic()
    _, err = job.communicate()
    assert job.returncode == 0, err
    return time.monotonic() - start


def _kill_then_finish(cmd: list[str], seed: int, work: float, started) -> None:
    """SIGKILL `cmd` at a random point of its work (seeded), then run it again to the end."""
    share = random.Random(seed).uniform(0.05, 0.7)
    _kill_when(cmd, started, lambda since: since >= share * work)


def _kill_when(cmd: list[str], started, due) -> None:
    """SIGKILL `cmd` once `due(seconds at work)` holds, then run it again to the end. A job whose
    progress can be read is better killed by it than by time: the machine's load changes between
    the timed run and this one."""
    job = _at_work(cmd, started)
    start = time.monotonic()
    while job.poll() is None and not due(time.monotonic() - start):
        time.sleep(0.005)
    assert job.poll() is None, "finished before the kill: make the job longer"
    job.send_signal(signal.SIGKILL)
    job.wait()
    job.stderr.close()
    _run(cmd)


def _store_digest(store: Path) -> dict:
    record = json.loads((store / "store.json").read_text())
    sites = {s: [e["sha256"] for e in json.loads((store / s / "manifest.json").read_text())["shards"]]
             for s in record["sites"]}
    return {"shards": [e["sha256"] for e in record["shards"]], "sites": sites, "rows": record["n_rows"],
            "complete": record["complete"]}


def _no_leftovers(folder: Path) -> None:
    stray = [p for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".partial")]
    assert not stray, stray


def _harvest(setup, out: Path) -> list[str]:
    return _cli("harvest", "--model", str(setup / "model"), "--sites", "resid.1,mlp_in.1,mlp.1", "--tokens", "40000",
                "--seq-len", "64", "--shard-mb", "0.15", "--corpus", str(setup / "docs"), "--out", str(out))


@pytest.mark.slow
def test_killed_harvests_resume_to_the_same_store(setup, tmp_path):
    work = _work_seconds(_harvest(setup, tmp_path / "whole"), lambda: (tmp_path / "whole" / "store.json").is_file())
    whole = _store_digest(tmp_path / "whole")
    assert whole["complete"] and len(whole["shards"]) > 20
    for seed in SEEDS:
        out = tmp_path / f"cut{seed}"
        _kill_then_finish(_harvest(setup, out), seed, work, lambda: (out / "store.json").is_file())
        assert _store_digest(out) == whole
        _no_leftovers(out)


@pytest.fixture(scope="module")
def store(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "store"
    _run(_harvest(setup, out))
    return out


def _train(store: Path, out: Path) -> list[str]:
    return _cli("train", "--store", str(store), "--sites", "resid.1", "--widths", "64,128", "--lambdas", "1e-3,1e-2",
                "--tokens", str(256 * 240), "--batch-size", "256", "--lr", "1e-3", "--checkpoint-every", "10",
                "--log-every", "5", "--out", str(out))


def _trained(out: Path) -> tuple[dict, list]:
    weights = {p.name: load_sae(p).state_dict() for p in sorted((out / "saes").iterdir())}
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, [(line["sae"], line["step"], line["loss"]) for line in lines]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_saes_and_log(store, tmp_path):
    _run(_train(store, tmp_path / "whole"))
    weights, log = _trained(tmp_path / "whole")
    assert len(weights) == 4 and len(log) == 4 * 48
    for seed in SEEDS:
        out = tmp_path / f"cut{seed}"
        lines = int(random.Random(seed).uniform(0.05, 0.7) * len(log))  # killed once that many are logged
        _kill_when(_train(store, out), lambda: (out / "metrics.jsonl").is_file(),
                   lambda _: (out / "metrics.jsonl").read_bytes().count(b"\n") >= lines)
        got, got_log = _trained(out)
        for name, state in weights.items():
            for key, value in state.items():
                torch.testing.assert_close(got[name][key], value, rtol=1e-6, atol=1e-7, msg=f"seed {seed}: {name} {key}")
        assert [row[:2] for row in got_log] == [row[:2] for row in log]  # each step logged once, in order
        _no_leftovers(out)


def _explore(setup, saes: Path, out: Path) -> list[str]:
    return _cli("explore", "build", str(saes), "--model", str(setup / "model"), "--tokens", "32768", "--seq-len", "64",
                "--corpus", str(setup / "docs"), "--holdout-fraction", "0.5", "--out", str(out))


def _db_digest(path: Path) -> dict:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    digest = {}
    for table in tables:
        rows = con.execute(f"SELECT * FROM {table} ORDER BY 1, 2" if table != "meta" else
                           "SELECT * FROM meta WHERE key NOT LIKE '%seconds%' ORDER BY 1").fetchall()
        digest[table] = hashlib.sha256(repr(rows).encode()).hexdigest()
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    con.close()
    return digest


@pytest.mark.slow
def test_killed_explorer_builds_rebuild_the_same_database(setup, store, tmp_path):
    _run(_train(store, tmp_path / "train"))
    saes = tmp_path / "train" / "saes"
    (tmp_path / "whole").mkdir()
    work = _work_seconds(_explore(setup, saes, tmp_path / "whole" / "features.db"),
                         lambda: any((tmp_path / "whole").iterdir()))
    whole = _db_digest(tmp_path / "whole" / "features.db")
    for seed in SEEDS:
        out = tmp_path / f"cut{seed}" / "features.db"
        out.parent.mkdir()
        # at work once the partial database exists; the finished file appears only at the end
        _kill_then_finish(_explore(setup, saes, out), seed, work, lambda: any(out.parent.iterdir()))
        assert _db_digest(out) == whole
        _no_leftovers(out.parent)
