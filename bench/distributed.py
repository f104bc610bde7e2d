"""Training throughput under torchrun: one process against a data-parallel and an SAE-sharded job
of N ranks, on the same suite and the same batches.

    python bench/distributed.py [--ranks 2] [--d-in 640] [--width 4096] [--saes 4] [--steps 40]
                                [--batch 4096] [--device cpu] [--out FILE.json]

A synthetic store (Gaussian rows, 2 shards per rank) is written once to a temporary folder; each
row of the table is `saescope train` on it (under torchrun for N ranks; CPU jobs give each rank
cores / N threads), timed by the trainer's own tokens/s over the steps after start-up. The last
column is what data-parallel ranks exchange per step when every row is sent (the upper bound: few
fired latents send fewer rows). On one machine the ranks share its cores and memory bandwidth,
so this measures the machinery's overhead; across GPUs or nodes it measures scaling."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import synthetic_store


def _run(a, store: Path, out: Path, ranks: int, mode: str) -> float:
    cores = os.cpu_count() or 1
    config = out.with_suffix(".toml")
    lambdas = [round(1e-3 * (i + 1), 6) for i in range(a.saes)]  # a λ ladder: one SAE each
    config.write_text(f'store = "{store}"\ntokens = {a.steps * a.batch}\nbatch_size = {a.batch}\nlr = 1e-3\n'
                      f'checkpoint_every = 0\nlog_every = {a.steps}\nbuffer_rows = {4 * a.batch}\ndevice = "{a.device}"\n'
                      f'[parallel]\nmode = "{mode}"\ndata_parts = {a.ranks}\n'
                      f'[[saes]]\nsites = ["resid.0"]\nwidths = [{a.width}]\nlambdas = {lambdas}\n')
    train = ["-m", "saescope", "-q", "train", "--config", str(config), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks))}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *train]
           if ranks > 1 else [sys.executable, *train])
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return lines[-1]["tokens_per_s"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--d-in", type=int, default=640)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--saes", type=int, default=4, help="JumpReLU SAEs of the suite (a λ ladder)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        synthetic_store(store, a.d_in, rows=max(8 * a.batch, 2 * a.ranks * a.batch), shards=2 * a.ranks)
        for ranks, mode in ((1, "data"), (a.ranks, "data"), (a.ranks, "sae")):
            rate = _run(a, store, Path(tmp) / f"{mode}-{ranks}", ranks, mode)
            results.append({"ranks": ranks, "mode": "one process" if ranks == 1 else mode, "tokens_per_s": rate})
    sent = a.saes * (2 * a.d_in * a.width + 2 * a.width + a.d_in) * 4 / 2**20
    print(f"{a.saes} JumpReLU SAEs, d_in {a.d_in}, width {a.width}; batch {a.batch}, {a.steps} steps, "
          f"{a.device}, {os.cpu_count()} cores")
    print("| ranks | mode | tokens/s | x one process | all-reduce MiB/step (at most) |")
    print("|---|---|---|---|---|")
    for r in results:
        r["x_one_process"] = r["tokens_per_s"] / results[0]["tokens_per_s"]
        print(f"| {r['ranks']} | {r['mode']} | {r['tokens_per_s']:.0f} | {r['x_one_process']:.2f} | "
              f"{sent if r['mode'] == 'data' else 0:.1f} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
