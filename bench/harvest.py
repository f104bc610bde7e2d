"""Harvest tokens/s beside the bare model forward truncated at the same layer, same rows, same run.

    python bench/harvest.py [--model gemma-3-270m-q4km] [--layer 6] [--tokens 16384] [--batch 4] [--out FILE.json]

Both sides run the same packed rows with the same batch shape; runs alternate so that machine
noise hits both alike, and the table reports the median. Model loading and corpus reading are
start-up costs outside both timings. Target (issue 2): harvest >= 0.9 x bare."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from saescope import CorpusConfig, HarvestConfig, harvest, load_model
from saescope.data import token_tensor

from common import bare_forward_seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m-q4km")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--kinds", default="resid,attn,mlp,mlp_in", help="site kinds harvested at --layer")
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4, help="sequences per forward")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)

    lm = load_model(a.model)
    corpus = CorpusConfig(seq_len=a.seq_len)
    rows = token_tensor(lm, corpus, a.tokens).long()
    tokens = rows.numel()
    sites = [f"{k}.{a.layer}" for k in a.kinds.split(",")]
    cfg = HarvestConfig(model=a.model, sites=sites, tokens=tokens, batch_size=a.batch, dtype=a.dtype, corpus=corpus)

    def bare() -> float:
        return bare_forward_seconds(lm, rows, a.layer, a.batch)

    def harvested() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            harvest(cfg, Path(tmp) / "store", lm=lm, progress=False)
            return time.perf_counter() - t

    bare()  # warm-up: first calls allocate and pick kernels
    times = {"bare": [], "harvest": []}
    for _ in range(a.repeats):
        times["bare"].append(bare())
        times["harvest"].append(harvested())
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": lm.name, "layer": a.layer, "sites": sites, "tokens": tokens, "batch": a.batch,
        "seq_len": a.seq_len, "dtype": a.dtype, "threads": torch.get_num_threads(), "repeats": a.repeats,
        "bare_tokens_per_s": tokens / med["bare"], "harvest_tokens_per_s": tokens / med["harvest"],
        "ratio": med["bare"] / med["harvest"], "target_ratio": 0.9, "times_s": times,
    }
    print(f"harvest benchmark: {lm.name}, sites {','.join(sites)}, {tokens} tokens "
          f"({len(rows)} × {a.seq_len}), batch {a.batch}, {result['threads']} threads, median of {a.repeats}")
    print(f"| {'path':<40} | {'tokens/s':>9} | {'x bare':>6} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 8}|")
    print(f"| {'bare forward, stopped after layer ' + str(a.layer):<40} | {result['bare_tokens_per_s']:>9.0f} | {1.0:>6.2f} |")
    print(f"| {'harvest to store (' + str(len(sites)) + ' sites, ' + a.dtype + ')':<40} | "
          f"{result['harvest_tokens_per_s']:>9.0f} | {result['ratio']:>6.2f} |")
    verdict = "meets" if result["ratio"] >= 0.9 else "MISSES"
    print(f"harvest / bare = {result['ratio']:.3f} ({verdict} the 0.9 target)")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
