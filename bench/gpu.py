"""Every CUDA path of saescope checked and timed in one prepared run, because a GPU is lent to this
project only now and then, for minutes, start-up included.

    python bench/gpu.py [--out runs/gpu.json] [--device cuda|cpu] [--model gemma-3-270m-q4km] [--site resid.6]
                        [--tests-k EXPR]

Parts, each under its own time limit (LIMITS) so that the whole fits in 8 minutes on a GPU; a part
that fails is recorded with its one-line error and the next one runs:

- tests: tests/test_fast.py on the device (`pytest --device`): every fast path against the
  reference, in float32 and under bfloat16 autocast, grouped encoders and the automatic switch;
- matmul: the float32, tf32 and bfloat16 rates of each step shape's encoder product, the ceiling
  the steps are measured against;
- steps: bench/train_step.py's step (`measure`, in this process) for JumpReLU and TopK at d_in 2304
  × width 131072 and 16384, batch 4096, L0 ≈ 32, in bfloat16, tf32 and float32, with JumpReLU's
  sparse and dense paths beside the automatic one; each line against its shape's bfloat16 rate (the
  issue's target is 0.6 at 131072) and, for the sparse paths, against the dense one;
- pipeline: `saescope run` on the device, tiny (harvest, train, eval, absorption, explorer);
- torchrun: `saescope train` under torchrun on one rank, then one all-reduce and one all-gather in a
  process group on the device. One rank trains without joining a process group (WORLD_SIZE 1), and
  NCCL will not put two ranks on one GPU, so the collectives probe is what reaches NCCL here.

On a machine without CUDA every shape is tiny and every part runs on the CPU (gloo in place of
NCCL), tf32 excepted ("skipped: no CUDA"), so the script is kept working by tests/test_bench.py
before the minutes on a GPU are spent. The JSON is rewritten after each part: a run cut short
keeps what it measured. Ends with a markdown table of the parts and one of the steps."""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from saescope.errors import first_line
from saescope.files import write_json

import train_step
from common import synthetic_store

ROOT = Path(__file__).resolve().parent.parent
# seconds per part: with the matmul part's few (its rate_s per rate) they sum to under 8 minutes. The
# pipeline's includes dequantising the embedded model, which a fresh machine has not cached.
LIMITS = {"tests": 75, "steps": 150, "pipeline": 160, "torchrun": 45}
PRECISIONS = ("bfloat16", "tf32", "float32")
PATHS = (("jumprelu", "auto"), ("jumprelu", "sparse"), ("jumprelu", "dense"), ("topk", "auto"))


@dataclass(frozen=True)
class Sizes:
    """The shapes and durations of a run: the issue's on a GPU, tiny ones where a CPU stands in,
    there only to show that every part still runs."""

    d_in: int
    widths: tuple[int, ...]
    batch: int
    k: int
    warmup: int
    target_s: float
    rate_s: float
    step_s: float       # no step line starts with less than this left of the part's limit
    tokens: int         # the pipeline's harvest and training
    seq_len: int
    train_batch: int
    sae_width: int
    eval_tokens: int


FULL = Sizes(d_in=2304, widths=(131072, 16384), batch=4096, k=32, warmup=2, target_s=1.0, rate_s=0.5, step_s=15,
             tokens=16384, seq_len=256, train_batch=1024, sae_width=4096, eval_tokens=2048)
TINY = Sizes(d_in=32, widths=(2048, 512), batch=256, k=8, warmup=1, target_s=0.05, rate_s=0.05, step_s=1,
             tokens=1024, seq_len=64, train_batch=128, sae_width=256, eval_tokens=128)

PIPELINE = """
[harvest]
model = "{model}"
sites = ["{site}"]
tokens = {s.tokens}
batch_size = 4
device = "{device}"
corpus = {{ seq_len = {s.seq_len} }}

[train]
tokens = {s.tokens}
batch_size = {s.train_batch}
device = "{device}"
precision = "bfloat16"
log_every = 2

[[train.saes]]          # trained as BatchTopK, saved as JumpReLU
sites = ["{site}"]
widths = [{s.sae_width}]
target_l0 = [16]

[[train.saes]]          # JumpReLU trained as itself, by its own kernels
sites = ["{site}"]
widths = [{s.sae_width}]
lambdas = [1e-3]

[[train.saes]]
sites = ["{site}"]
arch = "topk"
widths = [{s.sae_width}]
ks = [16]

[eval]
tokens = {s.eval_tokens}
seq_len = {s.seq_len}
batch_size = 4
absorption_words_per_letter = 4

[explore]
tokens = {s.eval_tokens}
seq_len = {s.seq_len}
batch_size = 4
"""


class Failed(Exception):
    """A part's failure: its one-line reason, and what the part had found by then."""

    def __init__(self, reason: str, **found):
        super().__init__(reason)
        self.found = found


def _run(cmd: list[str], limit: float) -> subprocess.CompletedProcess:
    """`cmd` in its own process group, all of it killed at the limit (torchrun's workers would
    outlive their launcher and hold the GPU)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise Failed(f"over its {limit:g} s limit") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _last_line(done: subprocess.CompletedProcess) -> str:
    lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    return lines[-1].strip() if lines else f"exit status {done.returncode}"


def _tests(a, sizes: Sizes, parts: dict) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "tests/test_fast.py",
           "--device", a.device] + (["-k", a.tests_k] if a.tests_k else [])
    done = _run(cmd, LIMITS["tests"])
    lines = done.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else _last_line(done)
    failed = [line for line in lines if line.startswith("FAILED ")]
    if done.returncode:
        raise Failed(summary + (f"; first: {failed[0][len('FAILED '):]}" if failed else ""), failed=failed,
                     output_tail=done.stdout[-4000:] + done.stderr[-2000:])
    return {"result": summary}


def _matmul(a, sizes: Sizes, parts: dict) -> dict:
    rates = []
    for width in sizes.widths:
        for precision in PRECISIONS:
            rate = {"batch": sizes.batch, "d_in": sizes.d_in, "d_sae": width, "precision": precision}
            if precision == "tf32" and not a.cuda:
                rate["status"] = "skipped: no CUDA"
            else:
                gflops = train_step.matmul_gflops(sizes.batch, sizes.d_in, width, sizes.rate_s, precision, a.device)
                rate.update(status="passed", tflops=gflops / 1000)
            rates.append(rate)
    return {"result": "; ".join(f"{r['d_sae']} {r['precision']} {r['tflops']:.1f}" for r in rates if "tflops" in r)
            + " TFLOP/s", "rates": rates}


def _steps(a, sizes: Sizes, parts: dict) -> dict:
    deadline = time.monotonic() + LIMITS["steps"]
    bf16 = {r["d_sae"]: r["tflops"] for r in parts.get("matmul", {}).get("rates", [])
            if r["precision"] == "bfloat16" and "tflops" in r}
    lines = []
    for precision in PRECISIONS:  # the targets first, in case the limit cuts the rest
        for width in sizes.widths:
            for arch, kernels in PATHS:
                line = {"arch": arch, "d_in": sizes.d_in, "d_sae": width, "precision": precision, "kernels": kernels}
                lines.append(line)
                if precision == "tf32" and not a.cuda:
                    line["status"] = "skipped: no CUDA"
                    continue
                if time.monotonic() > deadline - sizes.step_s:
                    line["status"] = "skipped: time limit"
                    continue
                args = train_step.parser().parse_args(
                    ["--arch", arch, "--d-in", str(sizes.d_in), "--d-sae", str(width), "--batch", str(sizes.batch),
                     "--k", str(sizes.k), "--kernels", kernels, "--precision", precision, "--device", a.device,
                     "--warmup", str(sizes.warmup), "--target-s", str(sizes.target_s), "--rate-s", str(sizes.rate_s)])
                try:
                    line.update(train_step.measure(args), status="passed")
                except Exception as exc:  # one shape's failure (memory, say) is a finding; the others still run
                    line.update(status="failed", error=f"{type(exc).__name__}: {first_line(exc)}")
                line.pop("peak_rss_mib", None)  # the whole process's, in here: not this step's
                gc.collect()  # the trainer holds reference cycles; its device memory goes back before the next shape
                if a.cuda:
                    torch.cuda.empty_cache()
                if "sec_per_step_median" in line:
                    # train_step's roofline (the step's dense FLOPs per second) over its matmul rate, undone
                    line["step_tflops"] = line["dense_roofline_fraction"] * line["matmul_gflops"] / 1000
                    if width in bf16:
                        line["of_bf16_matmul"] = line["step_tflops"] / bf16[width]
    dense = {(l["arch"], l["d_sae"], l["precision"]): l["tokens_per_s"] for l in lines
             if l["kernels"] == "dense" and "tokens_per_s" in l}
    for l in lines:
        base = dense.get((l["arch"], l["d_sae"], l["precision"]))
        if base and l["kernels"] != "dense" and "tokens_per_s" in l:
            l["x_dense"] = l["tokens_per_s"] / base
    ran = [l for l in lines if l["status"] in ("passed", "failed")]
    failed = [l for l in ran if l["status"] == "failed"]
    result = f"{len(ran) - len(failed)} of {len(lines)} step lines timed"
    if failed:
        f = failed[0]
        raise Failed(f"{len(failed)} failed; first: {f['arch']} {f['d_sae']} {f['precision']} {f['kernels']}: "
                     f"{f['error']}", lines=lines)
    return {"result": result, "lines": lines}


def _pipeline(a, sizes: Sizes, parts: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        config, out = Path(tmp) / "run.toml", Path(tmp) / "run"
        config.write_text(PIPELINE.format(model=a.model, site=a.site, device=a.device, s=sizes))
        done = _run([sys.executable, "-m", "saescope", "-q", "run", "--config", str(config), "--out", str(out)],
                    LIMITS["pipeline"])
        timing = out / "timings.json"
        stages = json.loads(timing.read_text()) if timing.is_file() else {}
        if done.returncode:
            raise Failed(_last_line(done), stages=stages)
        records = json.loads((out / "report.json").read_text())
    saes = [{key: r.get(key) for key in ("sae", "l0", "fvu", "delta_loss")} for r in records]
    return {"result": f"{len(records)} SAEs evaluated; " + ", ".join(f"{k} {v:g} s" for k, v in stages.items()),
            "stages": stages, "saes": saes}


def _torchrun(a, sizes: Sizes, parts: dict) -> dict:
    deadline = time.monotonic() + LIMITS["torchrun"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    with tempfile.TemporaryDirectory() as tmp:
        store, out = Path(tmp) / "store", Path(tmp) / "train"
        synthetic_store(store, sizes.d_in, rows=4 * sizes.train_batch, shards=2)
        done = _run(launch + ["-m", "saescope", "-q", "train", "--store", str(store), "--sites", "resid.0",
                              "--widths", str(sizes.sae_width), "--lambdas", "1e-3", "--tokens", str(8 * sizes.train_batch),
                              "--batch-size", str(sizes.train_batch), "--log-every", "4", "--device", a.device,
                              "--out", str(out)], deadline - time.monotonic())
        if done.returncode:
            raise Failed(_last_line(done))
        tokens_per_s = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["tokens_per_s"]
    done = _run(launch + [str(Path(__file__).resolve()), "--collectives", "--device", a.device],
                deadline - time.monotonic())
    if done.returncode:
        raise Failed(f"the collectives probe: {_last_line(done)}", tokens_per_s=tokens_per_s)
    backend = done.stdout.split()[-1]
    return {"result": f"1 rank trained at {tokens_per_s:.0f} tokens/s; {backend}: all-reduce and all-gather agree",
            "tokens_per_s": tokens_per_s, "backend": backend}


def _collectives(device: str) -> int:
    """Under torchrun: one all-reduce and one all-gather on `device`, in a process group of the
    backend saescope's trainer would join there."""
    import torch.distributed as dist

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    x = torch.arange(4.0, device=torch.cuda.current_device() if cuda else "cpu")
    dist.all_reduce(x)
    gathered = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(gathered, x)
    expected = torch.arange(4.0) * world
    assert all(torch.equal(g.cpu(), expected) for g in gathered), gathered
    print(dist.get_backend())
    dist.destroy_process_group()
    return 0


PARTS = {"tests": _tests, "matmul": _matmul, "steps": _steps, "pipeline": _pipeline, "torchrun": _torchrun}


def _table(report: dict) -> None:
    print(f"bench/gpu.py on {report['device']}, torch {report['torch']}"
          + (f", CUDA {report['cuda']}" if report["cuda"] else "") + f", {report['sizes']} shapes, "
          f"{report['seconds']:.0f} s")
    print("| part | status | seconds | result |")
    print("|---|---|---|---|")
    for name, part in report["parts"].items():
        print(f"| {name} | {part['status']} | {part['seconds']:.1f} | {part.get('error') or part.get('result')} |")
    lines = report["parts"].get("steps", {}).get("lines", [])
    if not lines:
        return
    print()
    print("| arch | d_in × width | precision | path | L0 | tokens/s | step TFLOP/s | matmul TFLOP/s | of bf16 matmul | x dense |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for l in lines:
        if l["status"] != "passed":
            print(f"| {l['arch']} | {l['d_in']} × {l['d_sae']} | {l['precision']} | {l['kernels']} | "
                  f"{l.get('error') or l['status']} | | | | | |")
            continue
        print(f"| {l['arch']} | {l['d_in']} × {l['d_sae']} | {l['precision']} | {l['kernels']} | {l['l0']:.1f} | "
              f"{l['tokens_per_s']:.0f} | {l['step_tflops']:.2f} | {l['matmul_gflops'] / 1000:.2f} | "
              f"{_number(l.get('of_bf16_matmul'))} | {_number(l.get('x_dense'))} |")


def _number(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/gpu.json")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (the default where there is one), cuda:1, cpu; a CPU gets tiny shapes")
    p.add_argument("--model", default="gemma-3-270m-q4km", help="the pipeline part's model")
    p.add_argument("--site", default="resid.6", help="the pipeline part's site")
    p.add_argument("--tests-k", default=None, help="only the tests matching this pytest -k expression")
    p.add_argument("--collectives", action="store_true", help=argparse.SUPPRESS)  # the torchrun part's probe
    a = p.parse_args()
    if a.collectives:
        return _collectives(a.device)
    a.cuda = torch.device(a.device).type == "cuda"
    sizes = FULL if a.cuda else TINY
    report = {"device": torch.cuda.get_device_name(a.device) if a.cuda else f"cpu ({os.cpu_count()} cores)",
              "torch": torch.__version__, "cuda": torch.version.cuda, "sizes": "full" if a.cuda else "tiny",
              "limits_s": LIMITS, "args": {k: v for k, v in vars(a).items() if k != "collectives"}, "parts": {}}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for name, part in PARTS.items():
        print(f"{name} ...", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            entry = {"status": "passed", **part(a, sizes, report["parts"])}
        except Failed as exc:
            entry = {"status": "failed", "error": str(exc), **exc.found}
        except Exception as exc:  # whatever one part hits, the next still runs
            entry = {"status": "failed", "error": f"{type(exc).__name__}: {first_line(exc)}"}
        entry["seconds"] = round(time.perf_counter() - t, 1)
        report["parts"][name] = entry
        report["seconds"] = round(time.perf_counter() - start, 1)
        write_json(out, report)
    _table(report)
    print(f"written: {out}")
    return 0 if all(part["status"] == "passed" for part in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
