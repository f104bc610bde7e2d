"""Transcoders and cross-layer transcoders side by side at equal L0 and token budget on Gemma 3 270M.

One layer (default): a plain transcoder and a skip transcoder (SPEC §8: ŷ = f·W_dec + b_dec + x·A)
of layer --layer's MLP, trained on the same batches of one store, evaluated on the same held-out
text. With --all-layers: a cross-layer transcoder over all 18 layers (latents at layer l read
mlp_in.l and write mlp.l … mlp.17) beside a set of plain and a set of skip transcoders, one per
layer, and a second CLT started from the plain set (SPEC §8's initialisation), each family trained
alone on the same store (so its tokens/s is its own) and evaluated as the replacement model
(evals/replacement.py): every MLP replaced at once, and each alone.

    python bench/multilayer.py [--layer 6] [--width 4096] [--tokens 250K] [--l0 40]
                               [--eval-tokens 16K] [--out runs/multilayer]
    python bench/multilayer.py --all-layers [--width 1024] [--tokens 100K] [--l0 20] [--eval-tokens 4K]
    (or `make bench-multilayer`)

Why: Gemma Scope 2 found the skip strictly beneficial and released CLTs beside per-layer
transcoders; this checks both on our trainer, per token of training, with what each costs. Every
dictionary is trained by the default recipe at target L0 --l0 per layer (BatchTopK, saved as
JumpReLU) on a store of the docstring corpus of bench/quality.py, and evaluated on that corpus's
held-out documents: FVU of the MLP outputs, and the delta LM loss and KL of the model with the MLPs
replaced (per-sequence standard errors). Prints one table; writes multilayer[-all].md, .json and
.png. Trained dictionaries and the store are kept under --out: a rerun adds only what is missing."""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from common import token_count

VARIANTS = {"transcoder": False, "skip transcoder": True}


def train_one(name: str, specs: list, a, store: Path) -> tuple[list[Path], float]:
    """The folders a family's entries train into, and its training tokens/s, trained unless there."""
    from saescope.config import TrainConfig
    from saescope.data import ActivationStore
    from saescope.train import train

    folder = a.out / name.replace(" ", "-")
    seconds = folder / "seconds"
    if not seconds.is_file():
        cfg = TrainConfig(store=str(store), saes=specs, tokens=a.train_tokens, batch_size=4096, checkpoint_every=0,
                          log_every=10)
        start = time.perf_counter()
        train(cfg, folder, source=ActivationStore(store))
        seconds.write_text(f"{time.perf_counter() - start:.1f}")
    return sorted((folder / "saes").iterdir()), a.train_tokens / float(seconds.read_text())


def one_layer(a, corpus: Path) -> tuple[list[dict], str]:
    from saescope import CorpusConfig, HarvestConfig, harvest, load_model, load_sae
    from saescope.config import SAESpec
    from saescope.data.harvest import token_tensor
    from saescope.evals import evaluate

    store = a.out / f"store-{a.layer}-{a.tokens}"
    harvest(HarvestConfig(sites=[f"mlp_in.{a.layer}", f"mlp.{a.layer}"], tokens=a.tokens,
                          corpus=CorpusConfig(source=str(corpus))), store)
    trained = {name: train_one(name, [SAESpec(sites=[f"mlp_in.{a.layer}"], transcoder=True, skip=skip, widths=[a.width],
                                              target_l0=[a.l0])], a, store)
               for name, skip in VARIANTS.items()}
    lm = load_model("gemma-3-270m-q4km")
    rows = token_tensor(lm, CorpusConfig(source=str(corpus), split="heldout"), token_count(a.eval_tokens))
    results = evaluate({name: load_sae(paths[0]) for name, (paths, _) in trained.items()}, lm, rows, batch_size=2)
    table = [{"variant": name, "l0": r["l0"], "fvu": r["fvu"], "delta_loss": r["delta_loss"], "delta_loss_se": r["delta_loss_se"],
              "kl": r["kl"], "kl_se": r["kl_se"], "tokens_per_s": trained[name][1]} for name, r in results.items()]
    lines = [f"Gemma 3 270M, mlp_in.{a.layer} → mlp.{a.layer}, width {a.width}, target L0 {a.l0}, {a.train_tokens:,} training "
             f"tokens, {rows.numel():,} held-out tokens", "",
             "| transcoder | L0 | FVU | Δ loss | KL | training tokens/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['delta_loss']:.4f} ± {r['delta_loss_se']:.4f} | "
              f"{r['kl']:.4f} ± {r['kl_se']:.4f} | {r['tokens_per_s']:,.0f} |" for r in table]
    return table, "\n".join(lines)


def all_layers(a, corpus: Path) -> tuple[list[dict], str]:
    """Four families over every layer, each evaluated as the replacement model."""
    from saescope import CorpusConfig, HarvestConfig, harvest, load_dictionary, load_model
    from saescope.config import SAESpec
    from saescope.data.harvest import token_tensor
    from saescope.evals.replacement import evaluate_replacement

    lm = load_model("gemma-3-270m-q4km")
    n = lm.n_layers
    sites = [f"mlp_in.{i}" for i in range(n)]
    store = a.out / f"store-all-{a.tokens}"
    harvest(HarvestConfig(sites=sites + [f"mlp.{i}" for i in range(n)], tokens=a.tokens, dtype="bfloat16",
                          corpus=CorpusConfig(source=str(corpus))), store)
    families = {
        "CLT": [SAESpec(sites=sites, clt=True, widths=[a.width], target_l0=[a.l0])],
        "transcoders": [SAESpec(sites=sites, transcoder=True, widths=[a.width], target_l0=[a.l0])],
        "skip transcoders": [SAESpec(sites=sites, transcoder=True, skip=True, widths=[a.width], target_l0=[a.l0])],
    }
    trained = {name: train_one(f"all-{name}", specs, a, store) for name, specs in families.items()}
    # SPEC §8's start: the CLT begins as the transcoder set just trained (its tokens/s counts its own training only)
    start = sorted(trained["transcoders"][0], key=lambda p: int(p.name.split("-")[0].split(".")[1]))
    trained["CLT from transcoders"] = train_one("all-CLT-from-transcoders", [SAESpec(
        sites=sites, clt=True, widths=[a.width], target_l0=[a.l0], init_from=[str(p) for p in start])], a, store)
    gc.collect()  # the trainings' shuffle buffers (GBs at 36 sites): the first evaluation ran out of memory beside them
    rows = token_tensor(lm, CorpusConfig(source=str(corpus), split="heldout"), token_count(a.eval_tokens))
    loaded = {name: [load_dictionary(p) for p in paths] for name, (paths, _) in trained.items()}
    results = evaluate_replacement({name: d[0] if name.startswith("CLT") else d for name, d in loaded.items()}, lm, rows,
                                   batch_size=1, layers_alone=a.layers_alone)
    table = [{"variant": name, "l0": r["l0_per_layer"], "fvu": r["fvu_mean"], "delta_loss_one": r["delta_loss_one_at_a_time_mean"],
              "delta_loss": r["delta_loss_all_replaced"], "delta_loss_se": r["delta_loss_all_replaced_se"],
              "kl": r["kl_all_replaced"], "kl_se": r["kl_all_replaced_se"], "tokens_per_s": trained[name][1],
              "layers": r["layers"]} for name, r in results.items()]
    lines = [f"Gemma 3 270M, mlp_in.L → mlp.L at all {n} layers, width {a.width} per layer, target L0 {a.l0} per layer, "
             f"{a.train_tokens:,} training tokens, {rows.numel():,} held-out tokens", "",
             "| dictionary | L0 per layer | FVU (mean of layers) | Δ loss, one layer (mean) | Δ loss, all replaced | "
             "KL, all replaced | training tokens/s |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['variant']} | {r['l0']:.1f} | {r['fvu']:.4f} | {r['delta_loss_one']:.4f} | {r['delta_loss']:.4f} ± "
              f"{r['delta_loss_se']:.4f} | {r['kl']:.4f} ± {r['kl_se']:.4f} | {r['tokens_per_s']:,.0f} |" for r in table]
    return table, "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--all-layers", action="store_true", help="a CLT and transcoder sets over every layer")
    p.add_argument("--layer", type=int, default=6)
    p.add_argument("--width", type=int, default=None, help="latents (per layer); default 4096, 1024 with --all-layers")
    p.add_argument("--tokens", default=None, help="training tokens (the store holds as many); default 250K, 100K with --all-layers")
    p.add_argument("--train-tokens", default=None, help="training tokens, at most --tokens (default: all of them)")
    p.add_argument("--l0", type=int, default=None, help="the target L0 (per layer); default 40, 20 with --all-layers")
    p.add_argument("--eval-tokens", default=None, help="default 16K, 4K with --all-layers")
    p.add_argument("--out", default="runs/multilayer")
    p.add_argument("--no-layers-alone", dest="layers_alone", action="store_false",
                   help="--all-layers: leave out each layer replaced alone (a model forward per layer and dictionary)")
    a = p.parse_args()
    defaults = (1024, "100K", 20, "4K") if a.all_layers else (4096, "250K", 40, "16K")
    a.width, a.tokens, a.l0, a.eval_tokens = (v if v is not None else d for v, d in
                                              zip((a.width, a.tokens, a.l0, a.eval_tokens), defaults))
    a.out, a.tokens = Path(a.out), token_count(a.tokens)
    a.train_tokens = min(a.tokens, token_count(a.train_tokens)) if a.train_tokens else a.tokens
    from quality_data import docstring_corpus

    corpus = docstring_corpus(a.out / "corpus" / "docstrings.jsonl")
    table, text = (all_layers if a.all_layers else one_layer)(a, corpus)
    print(text)
    name = "multilayer-all" if a.all_layers else "multilayer"
    (a.out / f"{name}.md").write_text(text + "\n")
    (a.out / f"{name}.json").write_text(json.dumps(table, indent=1))
    plot(table, a.out / f"{name}.png", all_layers=a.all_layers)
    return 0


def plot(table: list[dict], out: Path, all_layers: bool = False) -> None:
    """FVU and delta loss by dictionary; with every layer, FVU and the one-layer delta loss by layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if all_layers else 2, figsize=(12 if all_layers else 8, 3.2))
    names = [r["variant"] for r in table]
    if all_layers:
        for r in table:
            layers = range(len(r["layers"]))
            axes[0].plot(layers, [x["fvu"] for x in r["layers"]], marker=".", label=r["variant"])
            axes[1].plot(layers, [x["delta_loss"] for x in r["layers"]], marker=".", label=r["variant"])
        axes[0].set(xlabel="layer", ylabel="FVU of the MLP output")
        axes[1].set(xlabel="layer", ylabel="delta loss, that layer alone (nats)")
        axes[0].legend(fontsize=7)
        axes[2].bar(names, [r["delta_loss"] for r in table], yerr=[r["delta_loss_se"] for r in table], capsize=4)
        axes[2].set_ylabel("delta loss, every MLP replaced (nats)")
    else:
        axes[0].bar(names, [r["fvu"] for r in table])
        axes[0].set_ylabel("FVU of the MLP output")
        axes[1].bar(names, [r["delta_loss"] for r in table], yerr=[r["delta_loss_se"] for r in table], capsize=4)
        axes[1].set_ylabel("delta LM loss (nats)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
