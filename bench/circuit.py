"""Our attribution graphs against circuit-tracer's, on the same transcoders and prompts.

A transcoder set trained here over all 18 MLPs of Gemma 3 270M (bench/multilayer.py's, or a small
one trained now) is exported in circuit-tracer's layout; circuit-tracer 0.5.0 (its own venv,
--peer-python: it pins transformers ≤ 4.57) loads that export and the model from a local Hugging
Face cache made from our model files, and each side makes each prompt's graph in its own process
(so peak memory is its own). Printed per prompt: the overlap of the nodes both keep after pruning
(80% nodes, 98% edges), the agreement of the edge weights among the nodes both keep (relative
error, rank correlation), both replacement and completeness scores, wall time and peak memory.
Writes circuit.md, circuit.json and circuit.png (our edge weights against theirs) under --out.

    python bench/circuit.py [--transcoders DIR] [--peer-python .venv-circuit/bin/python]
                            [--max-feature-nodes N] [--batch-size 64] [--out runs/circuit]
    (or `make bench-circuit`, which makes the venv)
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = [
    '"""Return the number of items in the list that are greater than the given',
    'def read_config(path):\n    """Load the settings from a JSON file and return them as a',
    '"""Raise ValueError if the argument is negative; otherwise return its square',
    '"""Open the file at the given path and return a list of its lines without the trailing',
]


def hf_cache(home: Path) -> Path:
    """Our Gemma 3 270M as a Hugging Face cache entry google/gemma-3-270m that transformers 4.57
    reads offline: the tied embedding stored under its own name, the file's format set."""
    from safetensors.torch import load_file, save_file

    from saescope.lm.loading import DEFAULT_MODEL, cache_root, load_model

    load_model(DEFAULT_MODEL)  # dequantised into the cache on first use
    src = cache_root() / DEFAULT_MODEL
    snap = home / "hub" / "models--google--gemma-3-270m" / "snapshots" / "local"
    if (snap / "model.safetensors").is_file():
        return home
    snap.mkdir(parents=True, exist_ok=True)
    (snap.parent.parent / "refs").mkdir(exist_ok=True)
    (snap.parent.parent / "refs" / "main").write_text("local")
    config = json.loads((src / "config.json").read_text())
    config["architectures"] = ["Gemma3ForCausalLM"]
    (snap / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (snap / name).write_bytes((src / name).read_bytes())
    tensors = load_file(src / "model.safetensors")
    if "model.embed_tokens.weight" not in tensors:
        tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, snap / "model.safetensors", metadata={"format": "pt"})
    return home


def transcoder_set(a) -> Path:
    """The trained set's folder; without one, a small set trained now (width 1024, 100k tokens)."""
    if a.transcoders:
        return Path(a.transcoders)
    kept = Path("runs/multilayer/all-transcoders")
    if (kept / "saes").is_dir():
        return kept
    from multilayer import train_one
    from quality_data import docstring_corpus

    from saescope import CorpusConfig, HarvestConfig, harvest
    from saescope.config import SAESpec

    sites = [f"mlp_in.{i}" for i in range(18)]
    store = a.out / "store-100000"
    corpus = docstring_corpus(a.out / "corpus" / "docstrings.jsonl")
    harvest(HarvestConfig(sites=sites + [f"mlp.{i}" for i in range(18)], tokens=100_000, dtype="bfloat16",
                          corpus=CorpusConfig(source=str(corpus))), store)
    a.train_tokens = 100_000
    spec = SAESpec(sites=sites, transcoder=True, widths=[1024], target_l0=[20])
    train_one("transcoders", [spec], a, store)
    return a.out / "transcoders"


def ours(a) -> int:
    """Our side, in its own process: one JSON line per prompt, each graph saved beside --graphs."""
    from saescope import attribute, load_model, prune, save_graph, scores
    from saescope.sae.export import pick_unit

    name, unit = pick_unit(a.transcoders, None)
    lm = load_model("gemma-3-270m-q4km")
    for k, prompt in enumerate(json.loads(Path(a.prompts).read_text())):
        start = time.perf_counter()
        graph = attribute(lm, unit, prompt, batch_size=a.batch_size, max_feature_nodes=a.max_feature_nodes,
                          progress=False, dictionary=name)
        seconds = time.perf_counter() - start
        save_graph(graph, f"{a.graphs}-{k}.safetensors")
        replacement, completeness = scores(graph)
        print(json.dumps({"prompt": prompt, "seconds": seconds, "replacement": replacement, "completeness": completeness,
                          "n_active": graph.n_active, "kept": prune(graph).nodes.tolist(),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    return 0


def _keys(features: torch.Tensor, n_layers: int, n_pos: int, logits: torch.Tensor) -> list[tuple]:
    """Every node of a graph in circuit-tracer's order, as a key both sides share."""
    return ([("feature", *map(int, f)) for f in features] + [("error", layer, p) for layer in range(n_layers) for p in range(n_pos)]
            + [("token", p) for p in range(n_pos)] + [("logit", int(t)) for t in logits])


def _rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's: Pearson's of the ranks."""
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([rx, ry]))[0, 1])


def compare(mine, theirs: dict, kept_mine: list[bool]) -> dict:
    """Node overlap after pruning and edge agreement among the nodes both keep."""
    n_layers, n_pos = mine.n_layers, mine.n_pos
    km = _keys(mine.features, n_layers, n_pos, mine.logit_tokens)
    kt = _keys(theirs["features"], n_layers, n_pos, theirs["logit_tokens"])
    keep_m = {k for k, on in zip(km, kept_mine) if on}
    keep_t = {k for k, on in zip(kt, theirs["kept"].tolist()) if on}
    both = sorted(keep_m & keep_t)
    im, it = {k: i for i, k in enumerate(km)}, {k: i for i, k in enumerate(kt)}
    rows_m, rows_t = torch.tensor([im[k] for k in both]), torch.tensor([it[k] for k in both])
    wm = mine.adjacency[rows_m][:, rows_m].flatten().double()
    wt = theirs["adjacency"][rows_t][:, rows_t].flatten().double()
    on = (wm != 0) | (wt != 0)
    wm, wt = wm[on], wt[on]
    big = wt.abs() > 1e-3 * wt.abs().max()
    rel = ((wm - wt).abs() / wt.abs())[big]
    same_targets = torch.equal(mine.logit_tokens, theirs["logit_tokens"])
    return {"same_targets": same_targets,
            "target_prob_max_diff": float((mine.logit_probabilities - theirs["logit_probabilities"]).abs().max())
            if same_targets else float("nan"), "kept_ours": len(keep_m), "kept_theirs": len(keep_t), "kept_both": len(both),
            "overlap": len(both) / max(len(keep_m | keep_t), 1), "edges": int(on.sum()),
            "edge_rel_error_median": float(rel.median()) if len(rel) else float("nan"),
            "edge_rel_error_max": float(rel.max()) if len(rel) else float("nan"),
            "edge_abs_error_max_over_max_weight": float((wm - wt).abs().max() / wt.abs().max()) if len(wt) else float("nan"),
            "edge_rank_correlation": _rank_correlation(wm, wt) if len(wt) > 2 else float("nan"),
            "weights": (wm.tolist(), wt.tolist())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transcoders", default=None, help="a run or folder holding a transcoder set over all 18 layers")
    p.add_argument("--peer-python", default=".venv-circuit/bin/python")
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default="runs/circuit")
    p.add_argument("--ours", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts", default=None, help=argparse.SUPPRESS)
    p.add_argument("--graphs", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.ours:
        return ours(a)
    a.out = Path(a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    folder = transcoder_set(a)
    from saescope.circuits.files import load_graph
    from saescope.files import read_safetensors
    from saescope.sae.export import export_saes

    export = a.out / "circuit-tracer"
    (exported,) = [x for x in export_saes(folder, export, "circuit-tracer")]
    prompts = a.out / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    budget = [] if a.max_feature_nodes is None else ["--max-feature-nodes", str(a.max_feature_nodes)]
    common = [*budget, "--batch-size", str(a.batch_size), "--prompts", str(prompts)]
    theirs = subprocess.run([a.peer_python, str(Path(__file__).with_name("circuit_peer.py")), "--transcoders", str(exported),
                             "--hf-home", str(hf_cache(a.out / "hf-home")), "--out", str(a.out / "theirs"), *common],
                            check=True, capture_output=True, text=True).stdout
    mine = subprocess.run([sys.executable, __file__, "--ours", "--transcoders", str(exported), "--graphs",
                           str(a.out / "ours"), *common], check=True, capture_output=True, text=True).stdout
    rows = []
    results = ([line for line in out.splitlines() if line.startswith("{")] for out in (mine, theirs))  # TL prints too
    for k, (m, t) in enumerate(zip(*results)):
        m, t = json.loads(m), json.loads(t)
        cmp = compare(load_graph(a.out / f"ours-{k}.safetensors"), read_safetensors(a.out / f"theirs-{k}.safetensors"), m["kept"])
        rows.append({"prompt": m["prompt"], "ours": {x: m[x] for x in m if x != "kept"}, "theirs": t, **cmp})
    lines = [f"Gemma 3 270M, transcoder set {folder} (circuit-tracer layout {exported.name}), float32, this CPU; "
             f"node budget {a.max_feature_nodes or 'all active'}, {a.batch_size} targets per backward pass", "",
             "| prompt | targets (max prob. diff) | active (ours / theirs) | kept (ours / theirs / both) | node overlap | edge rel. error median / max "
             "| edge rank corr. | replacement (ours / theirs) | completeness (ours / theirs) | seconds (ours / theirs) "
             "| speed-up | peak RSS MiB (ours / theirs) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        o, t = r["ours"], r["theirs"]
        same = f"same ({r['target_prob_max_diff']:.0e})" if r["same_targets"] else "differ"
        lines.append(f"| {r['prompt'][:24]!r}… | {same} | {o['n_active']} / {t['n_active']} | {r['kept_ours']} / {r['kept_theirs']} / "
                     f"{r['kept_both']} | {r['overlap']:.3f} | {r['edge_rel_error_median']:.1e} / {r['edge_rel_error_max']:.1e} "
                     f"| {r['edge_rank_correlation']:.5f} | {o['replacement']:.4f} / {t['replacement']:.4f} | "
                     f"{o['completeness']:.4f} / {t['completeness']:.4f} | {o['seconds']:.1f} / {t['seconds']:.1f} | "
                     f"{t['seconds'] / o['seconds']:.2f}× | {o['peak_rss_mb']:,.0f} / {t['peak_rss_mb']:,.0f} |")
    text = "\n".join(lines)
    print(text)
    (a.out / "circuit.md").write_text(text + "\n")
    (a.out / "circuit.json").write_text(json.dumps([{k: v for k, v in r.items() if k != "weights"} for r in rows], indent=1))
    plot(rows, a.out / "circuit.png")
    return 0


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.6), squeeze=False)
    for ax, r in zip(axes[0], rows):
        wm, wt = r["weights"]
        ax.scatter(wt, wm, s=3)
        lim = max(map(abs, wt + wm), default=1.0)
        ax.plot([-lim, lim], [-lim, lim], lw=0.5, color="gray")
        ax.set(xlabel="circuit-tracer edge weight", ylabel="saescope edge weight", title=f"{r['prompt'][:28]!r}…")
        ax.title.set_fontsize(7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
