"""What the benchmark scripts share: the bare truncated forward the harvest is measured against,
the training-step scripts' flags, timing loop and JSON line (ours and the peers' alike), and the
synthetic store the torchrun jobs train on."""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path
from typing import Callable

import torch


def token_count(text: str) -> int:
    """A token count as the benches' flags write it: 250K, 1M, 4096."""
    text = text.strip().upper()
    return int(float(text.rstrip("KM")) * {"K": 1e3, "M": 1e6}.get(text[-1:], 1))


def step_arguments(p: argparse.ArgumentParser) -> None:
    """The shape and timing flags of bench/train_step.py and bench/peers.py."""
    p.add_argument("--d-in", type=int, required=True)
    p.add_argument("--d-sae", type=int, required=True)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--target-s", type=float, default=10.0)
    p.add_argument("--k", type=int, default=32, help="TopK's k; JumpReLU: latents set to fire per token")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help="also append the JSON line to this file")


def time_steps(step: Callable[[int, bool], None], warmup: int, target_s: float) -> list[float]:
    """Seconds of each timed step: `warmup` untimed ones first, then steps until `target_s` have
    passed (at least 3). `step(i, timed)` runs step i."""
    for i in range(warmup):
        step(i, False)
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < target_s or len(times) < 3:
        t = time.perf_counter()
        step(warmup + len(times), True)
        times.append(time.perf_counter() - t)
    return times


def step_line(a: argparse.Namespace, times: list[float], **fields) -> dict:
    """The JSON line every step script prints: shape, timing, peak memory and `fields`."""
    median = statistics.median(times)
    return {**fields, "d_in": a.d_in, "d_sae": a.d_sae, "batch": a.batch, "k": a.k, "threads": torch.get_num_threads(),
            "n_timed": len(times), "sec_per_step_median": median, "tokens_per_s": a.batch / median,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def emit(line: dict, out: str | None) -> None:
    print(json.dumps(line))
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(line) + "\n")


def bare_forward_seconds(lm, rows: torch.Tensor, layer: int, batch: int) -> float:
    """Seconds for the model's forward over `rows`, `batch` rows at a time, stopped after `layer`."""
    from saescope.lm import forward_until

    t = time.perf_counter()
    for i in range(0, len(rows), batch):
        forward_until(lm, rows[i:i + batch], layer)
    return time.perf_counter() - t


def synthetic_store(root: Path, d_in: int, rows: int, shards: int) -> None:
    """A store of Gaussian rows at `resid.0`: training throughput does not depend on what the
    rows mean, and writing them takes no model."""
    from saescope.data import StoreWriter

    g = torch.Generator().manual_seed(0)
    per = rows // shards
    writer = StoreWriter(root, model="synthetic", sites={"resid.0": d_in}, dtype="float32", seq_len=per,
                         corpus={"source": "synthetic"}, special_ids=[0])
    for _ in range(shards):
        writer.begin_shard(torch.ones(1, per, dtype=torch.long))
        writer.append({"resid.0": torch.randn(per, d_in, generator=g)})
        writer.commit_shard()
    writer.finish()
