"""bench/train_step.py's interface (outside comparisons parse its JSON line), on a tiny shape; the
suite's, the distributed bench's and the GPU check's, on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "train_step.py"


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_train_step_bench_prints_and_appends_one_json_line(arch, tmp_path):
    out = tmp_path / "steps.jsonl"
    args = [sys.executable, str(BENCH), "--arch", arch, "--d-in", "16", "--d-sae", "256", "--batch", "128",
            "--threads", "1", "--target-s", "0.2", "--k", "8", "--out", str(out)]
    printed = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    line = json.loads(printed)
    assert json.loads(out.read_text()) == line
    assert {"library": "saescope", "arch": arch, "d_in": 16, "d_sae": 256, "batch": 128}.items() <= line.items()
    assert line["n_timed"] >= 3 and line["tokens_per_s"] == pytest.approx(128 / line["sec_per_step_median"])
    assert line["peak_rss_mib"] > 0 and line["matmul_gflops"] > 0
    assert 4 <= line["l0"] <= 16  # about k latents fire per token, JumpReLU's thresholds included


@pytest.mark.slow
def test_the_suite_prints_one_table_and_writes_json(tmp_path):
    """bench/suite.py on one tiny shape without peers or harvest: a row per path and precision."""
    out = tmp_path / "suite.json"
    args = [sys.executable, str(BENCH.parent / "suite.py"), "--d-in", "16", "--d-sae", "256", "--batch", "128",
            "--k", "8", "--threads", "1", "--target-s", "0.05", "--warmup", "0", "--no-harvest", "--out", str(out)]
    printed = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    rows = [line for line in printed.splitlines() if line.startswith("| 16 | 256 |")]
    who = [row.split(" | ")[3] for row in rows]
    assert who == ["reference", "dense", "auto", "auto bf16", "reference", "auto", "auto bf16"]
    steps = json.loads(out.read_text())["steps"]
    assert len(steps) == 7 and all(s["dense_roofline_fraction"] > 0 for s in steps)


def test_the_distributed_bench_prints_a_row_per_mode(tmp_path):
    out = tmp_path / "distributed.json"
    args = [sys.executable, str(BENCH.parent / "distributed.py"), "--d-in", "8", "--width", "64", "--saes", "2",
            "--steps", "4", "--batch", "128", "--out", str(out)]
    printed = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    assert [row.split(" | ")[1] for row in printed.splitlines() if row.startswith("| ")][1:] == ["one process", "data", "sae"]
    results = json.loads(out.read_text())["results"]
    assert [r["ranks"] for r in results] == [1, 2, 2] and all(r["tokens_per_s"] > 0 for r in results)


def test_train_step_bench_times_the_jax_step(tmp_path):
    args = [sys.executable, str(BENCH), "--arch", "jumprelu", "--d-in", "16", "--d-sae", "256", "--batch", "128",
            "--threads", "1", "--target-s", "0.2", "--k", "8", "--backend", "jax"]
    line = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    assert line["backend"] == "jax" and line["tokens_per_s"] > 0 and 4 <= line["l0"] <= 16


@pytest.mark.slow
def test_the_gpu_check_runs_every_part_on_the_cpu(model_dir, tmp_path):
    """bench/gpu.py without CUDA: tiny shapes, every part on the CPU (gloo for torchrun), tf32
    recorded as skipped, one JSON and the tables."""
    out = tmp_path / "gpu.json"
    args = [sys.executable, str(BENCH.parent / "gpu.py"), "--device", "cpu", "--model", str(model_dir),
            "--site", "resid.1", "--tests-k", "code_sums or bfloat16", "--out", str(out)]
    done = subprocess.run(args, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["sizes"] == "tiny" and report["torch"]
    parts = report["parts"]
    assert list(parts) == ["tests", "matmul", "steps", "pipeline", "torchrun"]
    assert all(p["status"] == "passed" and p["seconds"] > 0 for p in parts.values()), parts
    assert parts["tests"]["result"].startswith("5 passed")
    rates = {(r["d_sae"], r["precision"]): r for r in parts["matmul"]["rates"]}
    assert len(rates) == 6 and all(r["tflops"] > 0 for (_, p), r in rates.items() if p != "tf32")
    assert {r["status"] for (_, p), r in rates.items() if p == "tf32"} == {"skipped: no CUDA"}
    lines = parts["steps"]["lines"]
    assert len(lines) == 3 * 2 * 4  # precisions × widths × paths
    for line in lines:
        if line["precision"] == "tf32":
            assert line["status"] == "skipped: no CUDA"
            continue
        assert line["status"] == "passed" and line["of_bf16_matmul"] > 0 and line["tokens_per_s"] > 0
        assert ("x_dense" in line) == (line["arch"] == "jumprelu" and line["kernels"] != "dense")
    assert set(parts["pipeline"]["stages"]) >= {"harvest", "train", "eval"} and len(parts["pipeline"]["saes"]) == 3
    assert parts["torchrun"]["backend"] == "gloo" and parts["torchrun"]["tokens_per_s"] > 0
    assert "| tests | passed |" in done.stdout and "| jumprelu | 32 × 2048 | bfloat16 | sparse |" in done.stdout
