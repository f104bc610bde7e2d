"""Transcoders side by side at equal L0 and token budget on Gemma 3 270M: a plain transcoder and a
skip transcoder (SPEC §8: ŷ = f·W_dec + b_dec + x·A) of one layer's MLP, trained on the same
batches of one store, evaluated on the same held-out text.

    python bench/multilayer.py [--layer 6] [--width 4096] [--tokens 250K] [--l0 40]
                               [--eval-tokens 16K] [--out runs/multilayer]
    (or `make bench-multilayer`)

Why: Gemma Scope 2 found the skip strictly beneficial; this checks it on our trainer, per token of
training, with what it costs. Each transcoder is trained alone (so its tokens/s is its own) by the
default recipe at target L0 --l0 (BatchTopK, saved as JumpReLU) on a store of `mlp_in.L` and
`mlp.L` from the docstring corpus of bench/quality.py, and evaluated on that corpus's held-out
documents: FVU of the MLP output, and the delta LM loss and KL of the model with the MLP replaced
(per-sequence standard errors). Prints one table; writes multilayer.md, multilayer.json and
multilayer.png. Trained transcoders and the store are kept under --out: a rerun adds only what is
missing."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import token_count

VARIANTS = {"transcoder": False, "skip transcoder": True}


def train_one(name: str, skip: bool, a, store: Path) -> tuple[Path, float]:
    """The transcoder's folder and training tokens/s, trained unless it is there."""
    from saescope.config import SAESpec, TrainConfig
    from saescope.data import ActivationStore
    from saescope.train import train

    folder = a.out / name.replace(" ", "-")
    seconds = folder / "seconds"
    if not seconds.is_file():
        spec = SAESpec(sites=[f"mlp_in.{a.layer}"], transcoder=True, skip=skip, widths=[a.width], target_l0=[a.l0])
        cfg = TrainConfig(store=str(store), saes=[spec], tokens=a.tokens, batch_size=4096, checkpoint_every=0, log_every=10)
        start = time.perf_counter()
        train(cfg, folder, source=ActivationStore(store))
        seconds.write_text(f"{time.perf_counter() - start:.1f}")
    return next((folder / "saes").iterdir()), a.tokens / float(seconds.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--tokens", default="250K", help="training tokens (the store holds as many)")
    p.add_argument("--l0", type=int, default=40, help="the target L0 of every transcoder")
    p.add_argument("--eval-tokens", default="16K")
    p.add_argument("--out", default="runs/multilayer")
    a = p.parse_args()
    a.out, a.tokens = Path(a.out), token_count(a.tokens)
    from quality_data import docstring_corpus
    from saescope import CorpusConfig, HarvestConfig, harvest, load_model, load_sae
    from saescope.data.harvest import token_tensor
    from saescope.evals import evaluate

    corpus = docstring_corpus(a.out / "corpus" / "docstrings.jsonl")
    store = a.out / f"store-{a.layer}-{a.tokens}"
    harvest(HarvestConfig(sites=[f"mlp_in.{a.layer}", f"mlp.{a.layer}"], tokens=a.tokens,
                          corpus=CorpusConfig(source=str(corpus))), store)
    trained = {name: train_one(name, skip, a, store) for name, skip in VARIANTS.items()}
    lm = load_model("gemma-3-270m")
    rows = token_tensor(lm, CorpusConfig(source=str(corpus), split="heldout"), token_count(a.eval_tokens))
    results = evaluate({name: load_sae(path) for name, (path, _) in trained.items()}, lm, rows, batch_size=2)
    table = [{"variant": name, "l0": r["l0"], "fvu": r["fvu"], "delta_loss": r["delta_loss"], "delta_loss_se": r["delta_loss_se"],
              "kl": r["kl"], "kl_se": r["kl_se"], "tokens_per_s": trained[name][1]} for name, r in results.items()]
    lines = [f"Gemma 3 270M, mlp_in.{a.layer} → mlp.{a.layer}, width {a.width}, target L0 {a.l0}, {a.tokens:,} training "
             f"tokens, {rows.numel():,} held-out tokens", "",
             "| transcoder | L0 | FVU | Δ loss | KL | training tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['delta_loss']:.4f} ± {r['delta_loss_se']:.4f} | "
              f"{r['kl']:.4f} ± {r['kl_se']:.4f} | {r['tokens_per_s']:,.0f} |" for r in table]
    text = "\n".join(lines)
    print(text)
    (a.out / "multilayer.md").write_text(text + "\n")
    (a.out / "multilayer.json").write_text(json.dumps(table, indent=1))
    plot(table, a.out / "multilayer.png")
    return 0


def plot(table: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    names = [r["variant"] for r in table]
    axes[0].bar(names, [r["fvu"] for r in table])
    axes[0].set_ylabel("FVU of the MLP output")
    axes[1].bar(names, [r["delta_loss"] for r in table], yerr=[r["delta_loss_se"] for r in table], capsize=4)
    axes[1].set_ylabel("delta LM loss (nats)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
