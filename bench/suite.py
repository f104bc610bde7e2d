"""The speed table: training steps at every shape, by every path and beside the peers, and the
harvest against the bare forward, in one run on one machine.

    python bench/suite.py [--d-in 640,2304] [--d-sae 4096,16384,65536] [--batch 4096] [--threads T]
                          [--target-s S] [--peers PYTHON] [--only PATHS] [--no-harvest]
                          [--out runs/bench-suite.json]

Each step runs in its own process (`train_step.py`, or `peers.py` under --peers, a Python that has
`eai-sparsify` and `sae-lens` installed beside saescope), so peak memory is that step's own. Every
line carries the machine's float32 matmul rate measured on the same shape in the same process, and
the figures that count are ratios to it, since these machines are noisy: `roofline` is the step's
dense-equivalent FLOPs (12·B·d·m) per second over that rate, so a sparse step can exceed 1.
Paths: `reference` is SPEC §2 written plainly (the speed before the fast paths), `dense` the fused
dense step, `auto` what training uses (sparse once few latents fire; here L0 ≈ k = 32); `bf16`
lines multiply in bfloat16 (float32 master weights) and are measured against the bfloat16 rate."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = [("jumprelu", "reference", "float32"), ("jumprelu", "dense", "float32"), ("jumprelu", "auto", "float32"),
        ("jumprelu", "auto", "bfloat16"), ("topk", "reference", "float32"), ("topk", "auto", "float32"),
        ("topk", "auto", "bfloat16")]
PEERS = [("sparsify", "topk"), ("sae_lens", "jumprelu")]


def _run(cmd: list[str]) -> dict | None:
    print("$", " ".join(cmd), file=sys.stderr, flush=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        print(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matmul_gflops(python: str, batch: int, d_in: int, d_sae: int, threads: int | None) -> float:
    """The matmul rate for a peer's line, measured by our own script's helper in the peer's Python."""
    code = (f"import sys, torch; sys.path.insert(0, {str(HERE)!r}); "
            + (f"torch.set_num_threads({threads}); " if threads else "")
            + f"from train_step import matmul_gflops; print(matmul_gflops({batch}, {d_in}, {d_sae}))")
    return float(subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-in", default="640,2304")
    p.add_argument("--d-sae", default="4096,16384,65536")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--target-s", type=float, default=5.0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--peers", default=None, help="a Python with eai-sparsify and sae-lens installed")
    p.add_argument("--only", default=None, help="comma-separated paths to run (e.g. dense,auto); peers need --peers")
    p.add_argument("--no-harvest", action="store_true")
    p.add_argument("--out", default="runs/bench-suite.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: print one table from earlier --out files (later lines replace earlier ones)")
    a = p.parse_args()
    if a.merge:
        return _merge(a.merge)

    common = ["--batch", str(a.batch), "--k", str(a.k), "--target-s", str(a.target_s), "--warmup", str(a.warmup)]
    if a.threads:
        common += ["--threads", str(a.threads)]
    lines = []
    for d_in in map(int, a.d_in.split(",")):
        for d_sae in map(int, a.d_sae.split(",")):
            shape = ["--d-in", str(d_in), "--d-sae", str(d_sae)] + common
            for arch, kernels, precision in RUNS:
                if a.only and kernels not in a.only.split(","):
                    continue
                line = _run([sys.executable, str(HERE / "train_step.py"), "--arch", arch, "--kernels", kernels,
                             "--precision", precision] + shape)
                if line:
                    lines.append(line)
            for library, arch in PEERS if a.peers else ():
                line = _run([a.peers, str(HERE / "peers.py"), "--library", library] + shape)
                if line:
                    line["matmul_gflops"] = _matmul_gflops(a.peers, a.batch, d_in, d_sae, a.threads)
                    line["dense_roofline_fraction"] = (12 * a.batch * d_in * d_sae / line["sec_per_step_median"] / 1e9
                                                       / line["matmul_gflops"])
                    lines.append(line)
    harvest = None
    if not a.no_harvest:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        hout = str(Path(a.out).with_name("bench-harvest.json"))
        cmd = [sys.executable, str(HERE / "harvest.py"), "--tokens", "16384", "--out", hout]
        print("$", " ".join(cmd), file=sys.stderr, flush=True)
        if subprocess.run(cmd + (["--threads", str(a.threads)] if a.threads else []), capture_output=True).returncode == 0:
            harvest = json.loads(Path(hout).read_text())
    _print_table(lines, harvest)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"steps": lines, "harvest": harvest}, indent=1))
    print(f"written: {a.out}")
    return 0


def _label(kernels: str, precision: str) -> str:
    return kernels + (" bf16" if precision == "bfloat16" else "")


def _who(line: dict) -> str:
    return line["library"] if line["library"] != "saescope" else _label(line["kernels"], line.get("precision", "float32"))


# the table's row order within a shape: our paths as RUNS lists them, then the peers
ORDER = {key: i for i, key in enumerate([(arch, _label(kernels, precision)) for arch, kernels, precision in RUNS]
                                        + [(arch, library) for library, arch in PEERS])}


def _merge(paths: list[str]) -> int:
    rows, harvest = {}, None
    for path in paths:
        done = json.loads(Path(path).read_text())
        for line in done["steps"]:
            rows[line["d_in"], line["d_sae"], line["arch"], _who(line)] = line
        harvest = done["harvest"] or harvest
    lines = sorted(rows.values(), key=lambda l: (l["d_in"], l["d_sae"], ORDER[l["arch"], _who(l)]))
    _print_table(lines, harvest)
    return 0


def _print_table(lines: list[dict], harvest: dict | None) -> None:
    batch, k = (lines[0]["batch"], lines[0]["k"]) if lines else (0, 0)
    print(f"training step, batch {batch}, on the CPU, L0 ≈ {k}; "
          f"roofline = 12·B·d·m FLOPs/s over the measured matmul rate")
    head = ("d_in", "d_sae", "arch", "who / path", "L0", "tokens/s", "matmul GF/s", "roofline", "x reference", "peak MiB")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    ref = {(l["d_in"], l["d_sae"], l["arch"]): l["tokens_per_s"] for l in lines if l.get("kernels") == "reference"}
    for l in lines:
        base = ref.get((l["d_in"], l["d_sae"], l["arch"]))
        print(f"| {l['d_in']} | {l['d_sae']} | {l['arch']} | {_who(l)} | {l['l0']:.1f} | {l['tokens_per_s']:.0f} | "
              f"{l['matmul_gflops']:.0f} | {l['dense_roofline_fraction']:.2f} | "
              f"{l['tokens_per_s'] / base if base else float('nan'):.2f} | {l['peak_rss_mib']:.0f} |")
    if harvest:
        print(f"harvest: {harvest['harvest_tokens_per_s']:.0f} tokens/s against the bare forward's "
              f"{harvest['bare_tokens_per_s']:.0f} ({harvest['ratio']:.2f} x bare; target 0.9), "
              f"{harvest['tokens']} tokens, {','.join(harvest['sites'])}")


if __name__ == "__main__":
    sys.exit(main())
