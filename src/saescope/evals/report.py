"""Evaluation results as files: JSON records and a markdown table."""

from __future__ import annotations

from pathlib import Path


from ..config import CorpusConfig
from ..data import ActivationStore, token_tensor
from ..data.corpus import shares_documents
from ..errors import SaescopeError
from ..data.store import STORE_FILE
from ..files import atomic_write, write_records
from ..lm import load_model
from ..sae.export import transcoder_sets
from ..sae.formats import find_saes, gemmascope2_dir, load_dictionary, load_sae, save_dictionary, save_sae, unfit
from ..sae.multilayer import MultiLayerDictionary
from .metrics import evaluate
from .replacement import evaluate_replacement

TABLE_KEYS = ("l0", "fvu", "fvu_without_massive_dims", "delta_loss", "ce_loss_recovered", "kl", "dead_fraction",
              "dead_fraction_training", "dense_fraction")
WITH_SE = ("delta_loss", "ce_loss_recovered", "kl")  # shown with their per-sequence standard errors


def evaluate_paths(paths: list[str], model, corpus: CorpusConfig, tokens: int, out: str | Path, *,
                   batch_size: int = 1, device: str = "cpu", dtype: str = "float32", site: str | None = None,
                   kind: str | None = None, allow_overlap: bool = False, progress: bool = True) -> list[dict]:
    """Load the dictionaries and the model (a name, path or LanguageModel), evaluate on held-out
    rows, write JSON and markdown. Single-layer SAEs and transcoders are spliced one at a time
    (`out`); cross-layer transcoders, crosscoders and each set of per-layer transcoders (the
    same entry at several layers) also as the replacement model (`replacement_path(out)`). `site`
    and `kind` are load_sae's, for files that do not say them. Held-out text that shares documents
    with a dictionary's training text is refused unless `allow_overlap`."""
    found = find_saes(paths)
    loaded = {name: load_dictionary(p, site=site, kind=kind) for name, p in found.items()}
    if not allow_overlap:
        check_held_out(loaded, corpus)
    saes = {k: v for k, v in loaded.items() if not isinstance(v, MultiLayerDictionary)}
    lm = load_model(model, device=device, dtype=dtype)
    rows = token_tensor(lm, corpus, tokens)
    records = evaluate({k: v.to(lm.device) for k, v in saes.items()}, lm, rows, batch_size=batch_size,
                       progress=progress) if saes else {}
    result = [{**rec, "path": str(found[name])} for name, rec in records.items()]
    write_results(result, Path(out))
    layered = {k: v.to(lm.device) for k, v in loaded.items() if isinstance(v, MultiLayerDictionary)}
    layered.update({name: [saes[n].to(lm.device) for n in members] for name, members in transcoder_sets(saes).items()})
    where = replacement_path(out)
    if layered:
        replaced = evaluate_replacement(layered, lm, rows, batch_size=batch_size, progress=progress)
        write_records(where, [{**rec, "path": str(found.get(name, ""))} for name, rec in replaced.items()])
        atomic_write(where.with_suffix(".md"), replacement_table(list(replaced.values())).encode())
    else:  # an earlier evaluation's, of other dictionaries
        where.unlink(missing_ok=True)
        where.with_suffix(".md").unlink(missing_ok=True)
    return result


def check_held_out(dictionaries: dict, corpus: CorpusConfig) -> None:
    """A one-line refusal if `corpus` reads documents a dictionary was trained on (by the corpus
    settings its training recorded, or those of the store its training config names)."""
    for name, d in dictionaries.items():
        trained = _training_corpus(d.cfg.extra)
        if trained is not None and shares_documents(trained, corpus):
            limit = trained.holdout_fraction if trained.split == "train" else 0
            raise SaescopeError(
                f"{name} was trained on documents this held-out text reads too (trained: {trained.source}, split "
                f"'{trained.split}', holdout_fraction {trained.holdout_fraction}; evaluating: split '{corpus.split}', "
                f"holdout_fraction {corpus.holdout_fraction}): evaluate on --split heldout with --holdout-fraction at "
                f"most {limit}, on other text, or pass --allow-overlap")


def _training_corpus(extra: dict) -> CorpusConfig | None:
    recorded = extra.get("corpus")
    store = (extra.get("training") or {}).get("store")
    if recorded is None and store and (Path(store) / STORE_FILE).is_file():
        recorded = ActivationStore(store).corpus
    try:
        return CorpusConfig(**recorded) if recorded else None
    except ValueError:  # settings of another version: nothing to compare by
        return None


def replacement_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + "_replacement.json")


def replacement_table(records: list[dict]) -> str:
    """Each dictionary: every output replaced at once, and the mean over layers replaced alone."""
    lines = ["| dictionary | kind | layers | L0 per layer | FVU (mean) | delta loss, one at a time (mean) | "
             "delta loss, all replaced | KL, all replaced |", "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['sae']} | {r['kind']} | {len(r['sites_out'])} | {r['l0_per_layer']:.1f} | {r['fvu_mean']:.3f} | "
                     f"{r['delta_loss_one_at_a_time_mean']:.4f} | {r['delta_loss_all_replaced']:.4f} ± "
                     f"{r['delta_loss_all_replaced_se']:.4f} | {r['kl_all_replaced']:.4f} ± {r['kl_all_replaced_se']:.4f} |")
    return "\n".join(lines) + "\n"


def write_results(records: list[dict], out: Path) -> None:
    write_records(out, records)
    atomic_write(out.with_suffix(".md"), markdown_table(records).encode())


def _cell(r: dict, key: str) -> str:
    value = r.get(key)
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4g} ± {r[key + '_se']:.2g}" if key in WITH_SE and key + "_se" in r else f"{value:.4g}"


def markdown_table(records: list[dict]) -> str:
    head = "| SAE | site | d_sae | " + " | ".join(TABLE_KEYS) + " |"
    lines = [head, "|" + "---|" * (3 + len(TABLE_KEYS))]
    for r in records:
        cells = [_cell(r, k) for k in TABLE_KEYS]
        lines.append(f"| {r['sae']} | {r['site']} | {r['d_sae']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def export_released(records: list[dict], root: Path) -> None:
    """Copy each SAE into `root` in Gemma Scope 2's layout, whose config.json says the SAE's kind and
    sites (what that format cannot hold, TopK SAEs and sites it has no folder for, as a SAELens
    folder under saelens/, or native under native/ where SAELens cannot hold it either), and point
    each record at its copy."""
    for r in records:
        sae = load_sae(r["path"])
        if unfit(sae.cfg, "gemmascope2"):
            format = "native" if unfit(sae.cfg, "saelens") else "saelens"
            dest = root / format / r["sae"]
        else:
            format = "gemmascope2"
            dest = gemmascope2_dir(root, sae.cfg, sae.cfg.extra.get("target_l0") or r["l0"])
            if (dest / "config.json").exists() and str(dest) != r.get("released"):
                dest = dest.with_name(dest.name + "_" + r["sae"])  # two SAEs with the same L0 label
        save_sae(sae, dest, format=format)
        r["released"] = str(dest)


def export_multilayer(records: list[dict], root: Path) -> None:
    """Copy each multi-layer dictionary into `root/{clt,crosscoder}/NAME` as Gemma Scope 2's files
    (native where they cannot hold it: TopK latents); a transcoder set stays where its members are."""
    for r in records:
        if r["kind"] == "transcoders":
            continue
        d = load_dictionary(r["path"])
        dest = root / r["kind"] / r["sae"]
        save_dictionary(d, dest, format="native" if d.cfg.arch == "topk" else "gemmascope2")
        r["released"] = str(dest)


def write_report(records: list[dict], out: Path, timings: dict, absorbed: dict | None = None,
                 replaced: list[dict] | None = None) -> Path:
    """report.md (tables, timings, plots), report.json, the PNGs and the released dictionaries."""
    lines = ["# saescope report", ""]
    if records:
        lines += _single_layer_lines(records, out)
    if replaced:
        export_multilayer(replaced, out / "saes")
        write_records(out / "replacement.json", replaced)
        lines += ["## Multi-layer dictionaries and transcoder sets: the replacement model", "",
                  f"Every output a dictionary writes replaced at once (each input read from the replaced forward, "
                  f"so errors compound), beside each layer replaced alone, on {replaced[0]['n_tokens']} held-out "
                  "tokens; delta loss in nats with per-sequence standard errors. Per-layer rows are in replacement.json.", "",
                  replacement_table(replaced),
                  *[f"- `{r['sae']}`: {r['released']}" for r in replaced if "released" in r], ""]
    lines += ["Wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()), "",
              *(_absorption_lines(absorbed) if absorbed else [])]
    if records:
        lines += ["## Where the SAEs are", "", *[f"- `{r['sae']}`: {r['released']}" for r in records], ""]
    atomic_write(out / "report.md", "\n".join(lines).encode())
    return out / "report.md"


def _single_layer_lines(records: list[dict], out: Path) -> list[str]:
    from . import plots

    export_released(records, out / "saes")
    widest = max(r["d_sae"] for r in records)
    plots.pareto(records, out / "pareto.png")
    plots.pareto([r for r in records if r["d_sae"] == widest], out / "architectures.png",
                 title=f"architectures at width {widest}: same activations, same token budget")
    plots.frequency_histograms(records, out / "firing_frequency.png")
    plots.by_position(records, out / "by_position.png")
    write_records(out / "report.json", records)
    first = records[0]
    return [
        f"{len(records)} SAEs, evaluated on {first['n_tokens']} held-out tokens ({first['n_scored']} scored: "
        "BOS, EOS and padding excluded). Delta loss is the next-token cross-entropy with the reconstruction "
        "spliced in, minus the clean one (nats); CE recovered is relative to zero-ablation.", "",
        markdown_table(records),
        f"Clean CE loss {first['ce_loss_clean']:.4f}; zero-ablation CE loss {first['ce_loss_zero_ablation']:.4f}. "
        f"Massive dimensions left out of `fvu_without_massive_dims`: {first['massive_dims']}.", "",
        "## Pareto: delta loss and FVU against L0", "", "![pareto](pareto.png)", "",
        "## Architectures on the same activations and token budget", "", "![architectures](architectures.png)", "",
        "## Firing frequencies", "", "![firing frequency](firing_frequency.png)", "",
        "## Reconstruction loss by token position", "", "![by position](by_position.png)", "",
    ]


def _absorption_lines(a: dict) -> list[str]:
    if "skipped" in a:
        return ["## Feature absorption (first letters)", "", f"Not measured: {a['skipped']}.", ""]
    worst = sorted(a["letters"].items(), key=lambda kv: -kv[1]["absorbed"] / max(kv[1]["test_words"], 1))[:5]
    return [
        "## Feature absorption (first letters)", "",
        f"`{a['sae']}` (L0 {a['l0']:.1f}): full absorption rate **{a['absorption_rate']:.3f}**, absorption "
        f"fraction **{a['absorption_fraction']:.3f}**, over {a['n_words']} whole-word tokens; the first-letter "
        f"probe is right on {a['probe_accuracy']:.1%} of held-out words. A word the probe gets right is fully "
        "absorbed when the letter's main latents stay silent and the latent projecting most onto the probe "
        f"direction (decoder cosine > {a['cos_threshold']}) makes up at least {a['share']:.0%} of the "
        "activation's projection; the fraction is the part of that projection the main latents leave and up "
        f"to three other aligned latents (cosine > {a['fraction_cos_threshold']}) supply (SAEBench's two scores).", "",
        "Most absorbed letters: " + ", ".join(
            f"{c} ({v['absorbed']}/{v['test_words']})" for c, v in worst), "",
    ]
