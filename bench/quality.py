"""Dictionary quality per token of training: saescope's variants side by side with sparsify's TopK and
SAELens's JumpReLU, all on the same batches of one store, evaluated on held-out text.

    python bench/quality.py [--widths 4096,16384] [--budgets 0.25M,1M,4M] [--variants a,b,...]
                            [--peers .venv-peers/bin/python] [--l0 40] [--out runs/quality]
    (or `make bench-quality`)

Why: a trainer is only as good as the dictionaries it makes, and the peers are the baseline. Every
SAE here reads the same store through the same stream (seed, shuffle buffer, batch of 4096), so
differences are the trainers'. The store holds --store-tokens distinct rows of Gemma 3 270M's
`resid.6` (the docstrings of our venv's packages, bench/quality_data.py); a larger budget reads it
again (the `epochs` column). Evaluation: the corpus's own held-out documents and out-of-
distribution prose (Debian's fortunes), --eval-tokens each: delta LM loss with its per-sequence
standard error, FVU (also without Gemma's massive dims), KL, L0, dense latents (> 10% of held-out
tokens), dead latents (training counters: unfired over the last 10% of tokens), first-letter
absorption (SAEBench's full-absorption rate and absorption fraction). Prints one table and writes
quality.md, quality.json and a Pareto plot per budget.

Each variant pins its whole recipe (so the "before" rows reproduce after defaults change), except
`default`, which is `saescope train` as it stands. Trained SAEs and their evaluations are kept
under --out: rerunning adds only what is missing."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import token_count

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SITE = "resid.6"
BATCH = 4096
START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.0f} s] {text}", file=sys.stderr, flush=True)


@dataclass
class Variant:
    """A recipe: TrainConfig settings and one SAESpec's (k / target L0 filled in with --l0)."""

    recipe: dict = field(default_factory=dict)
    spec: dict = field(default_factory=dict)
    peer: str | None = None          # sparsify | sae_lens: trained by bench/quality_peers.py


PAPER = {"optimizer": "adam", "lr": 7e-5, "lr_scale": "none", "loss": "mse"}    # SPEC §2, the defaults until now
ADAM_WIDTH = {"optimizer": "adam", "lr": 2e-4, "lr_scale": "width", "loss": "mse"}  # sparsify's Adam rule
ADAM_WIDTH_HI = {"optimizer": "adam", "lr": 1e-3, "lr_scale": "width", "loss": "mse"}
SIGNUM = {"optimizer": "signum", "lr": 5e-3, "lr_scale": "width", "loss": "fvu"}   # sparsify's default, in our trainer


def _jumprelu(**kw) -> dict:
    return {"arch": "jumprelu", "target_l0": "L0", "train_as": "jumprelu", **kw}


# Gemma Scope 2's quadratic penalty around the target, stiff: under signum only the sign of θ's
# gradient counts, and λ = 0.1 held L0 within 3% of 40 where the linear-penalty default (6e-4)
# let it drift 10% above (λ = 0.01 to 1 all held it)
QUADRATIC = _jumprelu(sparsity="quadratic", threshold_init="quantile", lambdas=[0.1])

VARIANTS: dict[str, Variant] = {
    "default": Variant({}, {"arch": "jumprelu", "target_l0": "L0"}),
    "topk-paper": Variant(PAPER, {"arch": "topk", "ks": "L0"}),
    "topk-adam-width": Variant(ADAM_WIDTH, {"arch": "topk", "ks": "L0"}),
    "topk-adam-width-hi": Variant(ADAM_WIDTH_HI, {"arch": "topk", "ks": "L0"}),
    "topk-signum": Variant(SIGNUM, {"arch": "topk", "ks": "L0"}),
    "batchtopk-signum": Variant(SIGNUM, {"arch": "batchtopk", "ks": "L0"}),
    "jumprelu-paper": Variant(PAPER, _jumprelu()),
    "jumprelu-adam-width": Variant(ADAM_WIDTH, _jumprelu()),
    "jumprelu-adam-width-hi": Variant(ADAM_WIDTH_HI, _jumprelu()),
    "jumprelu-signum-quadratic": Variant(SIGNUM, QUADRATIC),
    "jumprelu-signum-quadratic-aux": Variant(SIGNUM, {**QUADRATIC, "dead_aux": 1 / 32}),
    "jumprelu-signum-freq": Variant(SIGNUM, {**QUADRATIC, "frequency_penalty": 1.0}),
    "jumprelu-signum-matryoshka": Variant(SIGNUM, {**QUADRATIC, "matryoshka": "WIDTH/16,WIDTH/4"}),
    # the default recipe with the norm cap (sae/objectives.py): massive tokens weigh as if at 5× the median norm
    "jumprelu-signum-cap5": Variant(SIGNUM, _jumprelu(sparsity="quadratic", threshold_init="quantile", lambdas=[1.0], norm_cap=5.0)),
    "topk-signum-cap5": Variant(SIGNUM, {"arch": "topk", "ks": "L0", "norm_cap": 5.0}),
    # Gemma Scope 2 shipped BatchTopK-trained dictionaries as JumpReLU: per-latent thresholds from training rows
    "batchtopk-as-jumprelu": Variant(SIGNUM, _jumprelu(train_as="batchtopk", norm_cap=5.0)),
    "batchtopk-as-jumprelu-cap1": Variant(SIGNUM, _jumprelu(train_as="batchtopk", norm_cap=1.0)),
    # the default with one option each (nothing else pinned, so they follow the default)
    "default-matryoshka": Variant({}, {"arch": "jumprelu", "target_l0": "L0", "matryoshka": "WIDTH/16,WIDTH/4"}),
    "default-cap2": Variant({}, {"arch": "jumprelu", "target_l0": "L0", "norm_cap": 2.0}),
    # τ below 10%: the hinge holds a latent near τ on training rows, and held-out counts scatter around it
    "default-freq": Variant({}, {"arch": "jumprelu", "target_l0": "L0", "frequency_penalty": 1.0, "frequency_threshold": 0.08}),
    "sparsify-topk": Variant(peer="sparsify"),
    "saelens-jumprelu": Variant(peer="sae_lens"),
}


def _fill(value, l0: float, width: int):
    if value == "L0":
        return [int(l0)] if isinstance(l0, float) and l0.is_integer() else [l0]
    if isinstance(value, str) and "WIDTH" in value:
        return [width // int(part.split("/")[1]) for part in value.split(",")]
    return value


def train_variant(name: str, v: Variant, a, width: int, budget: int, folder: Path) -> Path:
    """The variant's SAE folder, trained unless it is there."""
    saes = folder / "saes"
    if saes.is_dir() and any(saes.iterdir()):
        return next(saes.iterdir())
    say(f"train {name}, width {width}, {budget:,} tokens")
    if v.peer:
        if not a.peers:
            raise SystemExit(f"{name} trains in the peers' venv: pass --peers .venv-peers/bin/python (make bench-quality)")
        out = saes / name
        subprocess.run([a.peers, str(HERE / "quality_peers.py"), "--library", v.peer, "--store", str(a.store),
                        "--site", SITE, "--width", str(width), "--tokens", str(budget), "--k", str(int(a.l0)),
                        "--target-l0", str(a.l0), "--batch", str(BATCH), "--out", str(out)], check=True)
        return out
    from saescope.config import SAESpec, TrainConfig
    from saescope.data import ActivationStore
    from saescope.train import train

    pinned = {} if name.startswith("default") else {"norm_cap": 0.0}  # the variants from before the cap was a default
    spec = SAESpec(sites=[SITE], widths=[width], **{**pinned, **{k: _fill(x, a.l0, width) for k, x in v.spec.items()}})
    cfg = TrainConfig(store=str(a.store), saes=[spec], tokens=budget, batch_size=BATCH, checkpoint_every=0,
                      log_every=10, **v.recipe)
    start = time.perf_counter()
    [path] = train(cfg, folder, source=ActivationStore(a.store))
    (folder / "seconds").write_text(f"{time.perf_counter() - start:.1f}")
    return path


def evaluate_all(paths: dict[str, Path], a) -> dict[str, dict]:
    """Each SAE's evaluation on both held-out sets (cached beside it as eval-<tokens>.json: a rerun
    with another --eval-tokens evaluates again instead of reading numbers measured on fewer tokens)."""

    def cached(p: Path) -> Path:
        return p.parent.parent / f"eval-{a.eval_tokens}.json"

    from saescope import CorpusConfig, load_model, load_sae
    from saescope.data.harvest import token_tensor
    from saescope.evals import evaluate
    from saescope.evals.absorption import absorption_from_activations, word_activations, word_tokens

    todo = {key: p for key, p in paths.items() if not cached(p).is_file()}
    if todo:
        lm = load_model("gemma-3-270m-q4km")
        sets = {"in": CorpusConfig(source=str(a.corpus), split="heldout"),
                "ood": CorpusConfig(source=str(a.prose), split="all")}
        saes = {key: load_sae(p) for key, p in todo.items()}
        results = {key: {} for key in todo}
        for label, corpus in sets.items():
            rows = token_tensor(lm, corpus, a.eval_tokens)
            say(f"evaluate {len(saes)} SAEs on {rows.numel():,} tokens of {corpus.source} ({corpus.split})")
            for key, r in evaluate(saes, lm, rows, batch_size=2).items():  # 4 rows of 1024: ~21 GB of logits
                results[key][label] = {k: v for k, v in r.items() if k not in ("firing_frequency", "recon_loss_by_position")}
        say("first-letter absorption")
        words = word_tokens(lm.tokenizer)
        x = word_activations(lm, SITE, words)
        for key, sae in saes.items():
            absorbed = absorption_from_activations(sae, x, [c for _, c in words])
            results[key]["absorption"] = absorbed["absorption_rate"]
            results[key]["absorption_fraction"] = absorbed["absorption_fraction"]
            results[key]["train"] = sae.cfg.extra.get("final_metrics", {})
            cached(todo[key]).write_text(json.dumps(results[key]))
    return {key: json.loads(cached(p).read_text()) for key, p in paths.items()}


def train_l0(folder: Path) -> tuple[float, float]:
    """The training L0 over steps 91–100 and over the last logged steps (NaN for the peers)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return math.nan, math.nan
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    at = [r["l0"] for r in lines if r["step"] == 100]
    return (at[0] if at else math.nan), lines[-1]["l0"]


def row(name: str, width: int, budget: int, store_rows: int, r: dict, folder: Path) -> dict:
    i, o = r["in"], r["ood"]
    seconds = (folder / "seconds").read_text() if (folder / "seconds").is_file() else ""
    at_100, at_end = train_l0(folder)
    return {"budget": budget, "width": width, "variant": name, "epochs": round(budget / store_rows, 2),
            "l0": i["l0"], "delta_loss": i["delta_loss"], "delta_loss_se": i["delta_loss_se"],
            "ood_l0": o["l0"], "ood_delta_loss": o["delta_loss"], "ood_delta_loss_se": o["delta_loss_se"],
            "fvu": i["fvu"], "fvu_without_massive_dims": i["fvu_without_massive_dims"], "ood_fvu": o["fvu"],
            "kl": i["kl"], "kl_se": i["kl_se"], "dense_fraction": max(i["dense_fraction"], o["dense_fraction"]),
            "dead_fraction": r["train"].get("dead_fraction", math.nan), "absorption": r["absorption"],
            "absorption_fraction": r.get("absorption_fraction", math.nan),
            "train_seconds": float(seconds) if seconds else r["train"].get("train_seconds", math.nan),
            "train_l0_step_100": at_100, "train_l0_end": at_end}


def markdown(rows: list[dict]) -> str:
    head = ("| budget | width | variant | epochs | L0 | Δ loss (in) | L0 ood | Δ loss (ood) | FVU | FVU w/o massive | "
            "FVU ood | KL | dense | dead (train) | absorption full, fraction | train L0 @100, end | train s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['budget'] / 1e6:g}M | {r['width']} | {r['variant']} | {r['epochs']:g} | {r['l0']:.1f} | "
                     f"{r['delta_loss']:.3f} ± {r['delta_loss_se']:.3f} | {r['ood_l0']:.1f} | "
                     f"{r['ood_delta_loss']:.3f} ± {r['ood_delta_loss_se']:.3f} | {r['fvu']:.3f} | "
                     f"{r['fvu_without_massive_dims']:.3f} | {r['ood_fvu']:.3f} | {r['kl']:.3f} ± {r['kl_se']:.3f} | "
                     f"{r['dense_fraction']:.3f} | {r['dead_fraction']:.3f} | {r['absorption']:.3f}, {r['absorption_fraction']:.3f} | "
                     f"{r['train_l0_step_100']:.0f}, {r['train_l0_end']:.0f} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict], budget: int, out: Path) -> Path:
    """Delta loss against L0 on both held-out sets, each SAE a point with its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    markers = {w: m for w, m in zip(sorted({r["width"] for r in rows}), "os^D")}
    colours = {}
    for r in rows:
        family = r["variant"]
        colours.setdefault(family, f"C{len(colours) % 10}")
        for ax, prefix in zip(axes, ("", "ood_")):
            ax.errorbar(r[f"{prefix}l0"], r[f"{prefix}delta_loss"], yerr=r[f"{prefix}delta_loss_se"], fmt=markers[r["width"]],
                        color=colours[family], capsize=3, label=f"{family} ({r['width']})")
    for ax, title in zip(axes, ("held-out docstrings (in distribution)", "held-out prose (out of distribution)")):
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel("delta LM loss (nats), ± per-sequence SE")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Gemma 3 270M {SITE}, {budget / 1e6:g}M training tokens (lower is better)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="4096")
    p.add_argument("--budgets", default="0.25M,1M")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--l0", type=float, default=40.0, help="TopK's k and JumpReLU's target L0")
    p.add_argument("--store-tokens", default="1M", help="distinct tokens in the store")
    p.add_argument("--eval-tokens", default="16K", help="tokens of each held-out set")
    p.add_argument("--peers", default=None, help="the peers' venv python (sparsify-topk, saelens-jumprelu)")
    p.add_argument("--out", default="runs/quality")
    a = p.parse_args()
    from quality_data import docstring_corpus, prose_corpus
    from saescope import CorpusConfig, HarvestConfig, harvest

    out = Path(a.out)
    a.corpus = docstring_corpus(out / "corpus" / "docstrings.jsonl")
    a.prose = prose_corpus(out / "corpus" / "prose.jsonl")
    a.eval_tokens = token_count(a.eval_tokens)
    store_tokens = token_count(a.store_tokens)
    a.store = out / f"store-{a.store_tokens}"
    store = harvest(HarvestConfig(sites=[SITE], tokens=store_tokens, corpus=CorpusConfig(source=str(a.corpus))), a.store)
    store_rows = store.n_rows(SITE)
    names = [n for n in a.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    rows = []
    for budget in map(token_count, a.budgets.split(",")):
        paths = {}
        for width in map(int, a.widths.split(",")):
            for name in names:
                paths[name, width] = train_variant(name, VARIANTS[name], a, width, budget, out / f"w{width}-t{budget}" / name)
        evals = evaluate_all({f"{n}|{w}": path for (n, w), path in paths.items()}, a)
        these = [row(n, w, budget, store_rows, evals[f"{n}|{w}"], out / f"w{w}-t{budget}" / n) for (n, w) in paths]
        plot(these, budget, out / f"quality-{budget}.png")
        rows += these
    table = markdown(rows)
    print(table)
    (out / "quality.md").write_text(table + "\n")
    (out / "quality.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
