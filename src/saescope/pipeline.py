"""`saescope run`: corpus → harvest → train a suite → evaluate → report → feature database, each
stage skipped when its output is already complete, so a rerun after an interruption picks up where
it stopped."""

from __future__ import annotations

import functools
import time
from pathlib import Path

from pydantic import Field

from .config import CorpusConfig, HarvestConfig, SAESpec, TrainConfig, _Config, config_from_file
from .data import harvest
from .errors import SaescopeError
from .files import read_json, read_records, write_json

STAGES = ("harvest", "train", "eval", "absorption", "report", "explore")


def _default_train() -> TrainConfig:
    """A small suite that fits the 20-minute budget on a 2-core CPU with its 16k-token evaluation
    (where each SAE costs a pass through the model's 262k-token head): JumpReLU at two target L0s
    (trained as BatchTopK, the default for a target), TopK at the same L0s, BatchTopK and ReLU-L1,
    at one width, all on the same activations with the default recipe."""
    common = dict(sites=["resid.6"])
    return TrainConfig(
        saes=[SAESpec(widths=[2048], target_l0=[16, 48], **common),
              SAESpec(arch="topk", widths=[2048], ks=[16, 48], **common),
              SAESpec(arch="batchtopk", widths=[2048], ks=[32], **common),
              SAESpec(arch="relu", widths=[2048], lambdas=[3e-2], **common)],
        tokens=150 * 2048, batch_size=2048, checkpoint_every=25, log_every=10)


class EvalConfig(_Config):
    tokens: int = Field(16_384, gt=0, description="held-out tokens for every SAE's metrics (64 rows of 256: "
                                                  "per-sequence error bars need many rows)")
    seq_len: int = Field(256, ge=2, description="row length of the held-out text")
    batch_size: int = Field(2, gt=0)
    absorption: bool = Field(True, description="first-letter absorption on one SAE of the suite")
    absorption_words_per_letter: int = Field(60, gt=1)


class ExploreConfig(_Config):
    enabled: bool = Field(True, description="build the explorer's feature database (features.db) for `saescope serve`")
    tokens: int = Field(32_768, gt=0, description="held-out tokens the per-latent examples and statistics are read from")
    seq_len: int = Field(128, ge=2, description="row length of that text (examples show ±12 tokens of it)")
    batch_size: int = Field(8, gt=0)


class RunConfig(_Config):
    """The whole pipeline; the defaults are the embedded Gemma 3 270M on the built-in corpus."""

    harvest: HarvestConfig = Field(default_factory=lambda: HarvestConfig(sites=["resid.6"], tokens=204_800))
    train: TrainConfig = Field(default_factory=_default_train)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    explore: ExploreConfig = Field(default_factory=ExploreConfig)


def load_config(path: str | Path | None) -> RunConfig:
    """The run configuration in a .toml or .json file (the defaults when None)."""
    return RunConfig() if path is None else config_from_file(RunConfig, path)


def run(cfg: RunConfig, out: str | Path, *, progress: bool = True) -> dict | None:
    """Run every stage into `out`; returns the report's records and where things are. Under
    torchrun every rank trains (cfg.train.parallel says how) and rank 0 alone harvests before and
    evaluates after; the other ranks return None once the SAEs are written."""
    from .train.distributed import joined

    with joined(cfg.train.parallel, cfg.train.device) as ranks:
        return _stages(cfg, Path(out), ranks, progress)


def _stages(cfg: RunConfig, out: Path, ranks, progress: bool) -> dict | None:
    from .evals.report import evaluate_paths, replacement_path, write_report
    from .explore.build import build_dir
    from .lm import load_model
    from .train import train

    @functools.cache
    def model():  # loaded once, by the first stage that needs it
        return load_model(cfg.harvest.model, device=cfg.harvest.device, dtype=cfg.harvest.model_dtype)

    out.mkdir(parents=True, exist_ok=True)
    timing_path = out / "timings.json"
    timings = read_json(timing_path) if timing_path.is_file() else {}

    def stage(name: str, done: bool, fn):
        if done:
            return
        t = time.perf_counter()
        fn()
        timings[name] = round(time.perf_counter() - t, 1)
        if ranks.lead:
            write_json(timing_path, timings)

    store_dir, train_dir, eval_path = out / "activations", out / "train", out / "eval.json"
    if ranks.lead:
        stage("harvest", _complete(store_dir / "store.json"), lambda: harvest(
            cfg.harvest, store_dir, lm=model(), progress=progress, min_shards=ranks.world))  # a shard for each rank
    ranks.barrier(patient=True)  # the others wait for the store
    train_cfg = cfg.train.model_copy(update={"store": str(store_dir)})
    stage("train", _trained(train_dir, train_cfg), lambda: _train(train, train_cfg, train_dir, progress, ranks.lead))
    if not ranks.lead:
        return None
    corpus = CorpusConfig(**{**cfg.harvest.corpus.model_dump(), "split": "heldout", "seq_len": cfg.eval.seq_len})
    stage("eval", eval_path.is_file(), lambda: evaluate_paths(
        [str(train_dir / "saes")], model(), corpus, cfg.eval.tokens, eval_path,
        batch_size=cfg.eval.batch_size, device=cfg.harvest.device, progress=progress))
    records = read_records(eval_path)
    replaced = read_records(replacement_path(eval_path)) if replacement_path(eval_path).is_file() else None
    absorption_path = out / "absorption.json"
    stage("absorption", absorption_path.is_file() or not cfg.eval.absorption or not records,
          lambda: _absorption(records, cfg, absorption_path, model()))
    absorbed = read_json(absorption_path) if absorption_path.is_file() else None
    stage("report", False, lambda: write_report(records, out, timings, absorbed, replaced))
    explore_corpus = corpus.model_copy(update={"seq_len": cfg.explore.seq_len})
    explored = cfg.explore.enabled and bool(records)  # the explorer shows single-layer dictionaries
    stage("explore", (out / "features.db").is_file() or not explored, lambda: build_dir(
        out, explore_corpus, cfg.explore.tokens, model=model(), batch_size=cfg.explore.batch_size, progress=progress))
    return {"report": out / "report.md", "records": records, "replacement": replaced, "timings": timings,
            "features": out / "features.db" if explored else None}


def _complete(record: Path) -> bool:
    return record.is_file() and bool(read_json(record).get("complete"))


def _trained(out: Path, cfg: TrainConfig) -> bool:
    done = out / "done.json"
    if not done.is_file():
        return False
    if read_json(done).get("config") != cfg.model_dump(mode="json"):
        raise SaescopeError(f"{out} holds SAEs trained with another configuration; use another --out")
    return True


def _train(train, cfg: TrainConfig, out: Path, progress: bool, lead: bool) -> None:
    paths = train(cfg, out, progress=progress)
    if lead:
        write_json(out / "done.json", {"saes": [str(p) for p in paths], "config": cfg.model_dump(mode="json")})


def _absorption(records: list[dict], cfg: RunConfig, path: Path, lm) -> None:
    """Absorption for the widest JumpReLU SAE whose L0 is closest to 30 (one SAE: the probe and
    the word activations cost a forward pass over a few thousand short prompts)."""
    from .evals.absorption import absorption
    from .sae.formats import load_sae

    candidates = [r for r in records if r["arch"] == "jumprelu" and not r.get("target_site")] or records
    widest = max(r["d_sae"] for r in candidates)
    chosen = min((r for r in candidates if r["d_sae"] == widest), key=lambda r: abs(r["l0"] - 30))
    try:
        result = absorption(load_sae(chosen["path"]).to(lm.device), lm, chosen["site"],
                            max_per_letter=cfg.eval.absorption_words_per_letter)
    except SaescopeError as exc:  # e.g. a tokenizer without enough whole-word tokens: say so in the report
        result = {"skipped": str(exc)}
    write_json(path, {"sae": chosen["sae"], "l0": chosen["l0"], **result})
