"""The single `saescope` command; subcommands mirror the pipeline's stages. Parses and calls, no more."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from .errors import SaescopeError


def _corpus_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=None, help="'python-docs' (built-in, default), a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG]")
    g.add_argument("--text-field", default=None, help="text column of .jsonl/.parquet/datasets (default: text)")
    g.add_argument("--hf-split", default=None, help="split of a hf: dataset (default: train)")
    g.add_argument("--split", default=None, choices=["train", "heldout", "all"], help="documents to read (default: train)")
    g.add_argument("--holdout-fraction", type=float, default=None, help="share of documents held out (default: 0.05)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per packed row (default: 1024)")
    g.add_argument("--seed", type=int, default=None, help="document shuffle seed (default: 0)")


def _heldout_args(p: argparse.ArgumentParser, *, model: str | None, tokens: int, batch: int) -> None:
    """Options of the stages that run a model over held-out text (eval, explore build)."""
    p.add_argument("--model", default=model, help="the model" + ("" if model else " (default: the run's own)"))
    p.add_argument("--tokens", type=int, default=tokens, help="held-out tokens to read")
    p.add_argument("--batch-size", type=int, default=batch, help="sequences per forward")
    p.add_argument("--device", default="cpu")
    _model_dtype_arg(p)
    _corpus_args(p)


def _model_dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's weights (SAEs read its activations in their own float32)")


def _corpus_values(args) -> dict:
    names = {"corpus": "source", "text_field": "text_field", "hf_split": "hf_split", "split": "split",
             "holdout_fraction": "holdout_fraction", "seq_len": "seq_len", "seed": "seed"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saescope", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    h = sub.add_parser("harvest", help="run a model over a corpus and store activations at sites")
    h.add_argument("--model", default="gemma-3-270m-q4km", help="gemma-3-270m-q4km (embedded: Q4_K_M GGUF, dequantised), google/gemma-3-270m (Google's, from a local Hugging Face cache), a hub id, a folder or a .gguf file")
    h.add_argument("--sites", default="resid.6", help="comma-separated, e.g. resid.6,attn.6,mlp.6,mlp_in.6")
    h.add_argument("--tokens", type=int, default=100_000, help="tokens to run through the model")
    h.add_argument("--out", required=True, help="store folder (rerun with the same settings to resume)")
    h.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass")
    h.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    h.add_argument("--shard-mb", type=float, default=128.0, help="target shard size in MiB")
    h.add_argument("--device", default="cpu")
    _model_dtype_arg(h)
    _corpus_args(h)

    t = sub.add_parser("train", help="train a suite of SAEs / transcoders from a store or a streaming harvest",
                       description="Flags override the --config file; any SAE flag replaces the file's [[saes]] with one family.")
    t.add_argument("--config", default=None, help="a .toml or .json TrainConfig (see README)")
    t.add_argument("--out", required=True, help="output folder; a rerun resumes from its checkpoint")
    t.add_argument("--store", default=None, help="activation store folder")
    t.add_argument("--model", default=None, help="stream from this model instead of a store (no disk)")
    t.add_argument("--harvest-tokens", type=int, default=None, help="with --model: tokens to harvest (default: --tokens)")
    g = t.add_argument_group("the SAE family (sites × widths × λ / k / target L0)")
    g.add_argument("--sites", default=None, help="comma-separated input sites, e.g. resid.6,resid.12")
    g.add_argument("--arch", default=None, choices=["jumprelu", "topk", "batchtopk", "relu"])
    g.add_argument("--widths", default=None, help="comma-separated, e.g. 4096,16384")
    g.add_argument("--lambdas", default=None, help="comma-separated sparsity coefficients")
    g.add_argument("--ks", default=None, help="comma-separated k for topk / batchtopk")
    g.add_argument("--target-l0", default=None, help="comma-separated L0 targets (jumprelu; trained as BatchTopK at "
                                                     "k = the target unless --train-as jumprelu or a JumpReLU option is given)")
    g.add_argument("--train-as", default=None, choices=["jumprelu", "batchtopk"],
                   help="with --target-l0: train JumpReLU itself (quadratic penalty), or BatchTopK saved as JumpReLU")
    g.add_argument("--transcoder", action="store_true", default=None, help="read mlp_in.L (or ln2.L, before the norm's scale), predict mlp.L")
    g.add_argument("--skip", action="store_true", default=None, help="transcoders: train an affine skip x·A beside the dictionary")
    g.add_argument("--clt", action="store_true", default=None,
                   help="one cross-layer transcoder over the --sites (mlp_in.L): latents write their layer's MLP output and later ones")
    g.add_argument("--crosscoder", action="store_true", default=None,
                   help="one weakly causal crosscoder over the --sites (resid.L): latents write their layer and later ones")
    g.add_argument("--theta-param", default=None, choices=["theta", "log"])
    g.add_argument("--b-dec-init", default=None, choices=["zeros", "mean"])
    o = t.add_argument_group("the objective (README: Objectives)")
    o.add_argument("--sparsity", default=None, choices=["l0", "quadratic", "tanh"],
                   help="jumprelu: λ·L0 (the default without --target-l0), λ·(L0 − L0*)²/(2·L0*) around each "
                        "--target-l0 (the default when trained as jumprelu), or λ·Σ tanh(s·f)")
    o.add_argument("--quadratic-form", default=None, choices=["batch", "token"])
    o.add_argument("--tanh-scale", type=float, default=None, help="s in tanh(s·f)")
    o.add_argument("--frequency-penalty", type=float, default=None, help="weight on latents firing more often than the threshold")
    o.add_argument("--frequency-threshold", type=float, default=None, help="firing share above which a latent pays (default 0.1)")
    o.add_argument("--matryoshka", default=None, help="comma-separated prefix widths, each reconstructing alone")
    o.add_argument("--matryoshka-weights", default=None, help="comma-separated, one per prefix and the whole")
    o.add_argument("--dead-aux", type=float, default=None, help="jumprelu: weight of the AuxK-style loss on dead latents")
    o.add_argument("--input-ste", action="store_true", default=None, help="jumprelu: the kernel's gradient reaches the input")
    o.add_argument("--norm-cap", type=float, default=None,
                   help="rows above this × the median centred norm weigh in the loss as if at it "
                        "(default 5; batchtopk, and a target L0 trained as it, 1; 0: off)")
    o.add_argument("--threshold-init", default=None, choices=["constant", "quantile"],
                   help="quantile (the default with --target-l0): θ from the first batch so that L0 starts at the target")
    h2 = t.add_argument_group("recipe")
    for flag, kind, text in (("--tokens", int, "training tokens"), ("--batch-size", int, "activations per step"),
                             ("--lr", float, "learning rate (default 5e-3 under signum, 7e-5 under adam)"), ("--seed", int, "data and init seed"),
                             ("--checkpoint-every", int, "steps between checkpoints"),
                             ("--log-every", int, "steps between metrics lines"), ("--device", str, "cpu, cuda, ...")):
        h2.add_argument(flag, type=kind, default=None, help=text)
    h2.add_argument("--optimizer", default=None, choices=["adam", "signum"],
                    help="signum (the default): the gradient's sign under schedule-free averaging (sparsify's), or adam (the paper)")
    h2.add_argument("--momentum", type=float, default=None, help="signum: the schedule-free interpolation (default 0.95)")
    h2.add_argument("--lr-scale", default=None, choices=["none", "width"], help="width (the default): lr × (2^14 / width)^0.5 per SAE")
    h2.add_argument("--loss", default=None, choices=["mse", "fvu"], help="fvu (the default): the objective over the batch's variance")
    h2.add_argument("--precision", default=None, choices=["float32", "bfloat16", "tf32"],
                    help="the products' dtype (bfloat16 keeps float32 master weights; tf32: CUDA only)")
    h2.add_argument("--kernels", default=None, choices=["auto", "dense", "sparse", "reference"],
                    help="training-step path (default auto: sparse once few latents fire)")
    h2.add_argument("--backend", default=None, choices=["torch", "jax"],
                    help="jax: JumpReLU SAEs and transcoders stepped in JAX (pip install 'saescope[jax]')")
    d = t.add_argument_group("under torchrun (see README: Scaling out)")
    d.add_argument("--parallel", default=None, choices=["data", "sae"],
                   help="data: each rank trains every SAE on its share of each batch; sae: the SAEs are spread over the ranks")
    d.add_argument("--data-parts", type=int, default=None,
                   help="parts each batch is made of (default: the number of ranks; a resume may use any divisor)")
    d.add_argument("--dist-timeout", type=float, default=None, help="seconds a collective may wait before the job ends (default 600)")

    e = sub.add_parser("eval", help="evaluate SAEs / transcoders on held-out tokens (L0, FVU, delta loss, KL, ...)")
    e.add_argument("--sae", action="append", required=True,
                   help="an SAE folder or params.npz (any format), or a folder of SAE folders; repeatable")
    e.add_argument("--site", default=None, help="the site, for SAE files that do not say where they read")
    e.add_argument("--kind", default=None, choices=["sae", "transcoder"],
                   help="for SAE files that do not say (a params.npz outside its release's folders)")
    e.add_argument("--allow-overlap", action="store_true",
                   help="evaluate on text that shares documents with the dictionaries' training text")
    e.add_argument("--out", required=True, help="JSON file for the results (a markdown table goes beside it)")
    _heldout_args(e, model="gemma-3-270m-q4km", tokens=16_384, batch=2)

    x = sub.add_parser("explore", help="the feature explorer's database")
    xs = x.add_subparsers(dest="explore_command", metavar="ACTION", required=True)
    xb = xs.add_parser("build", help="per-latent examples, quantile samples, histograms, logits and neighbours (SQLite)")
    xb.add_argument("dir", help="a `saescope run` output folder, or a folder of SAEs (then give --model)")
    xb.add_argument("--out", default=None, help="database file (default: DIR/features.db)")
    _heldout_args(xb, model=None, tokens=32_768, batch=8)
    xn = xs.add_parser("neuronpedia", help="write the feature database in Neuronpedia's upload format (jsonl.gz batches)")
    xn.add_argument("dir", help="a folder holding features.db")
    xn.add_argument("--out", required=True, help="export folder (gets MODEL/SOURCE/… inside)")
    xn.add_argument("--model-id", default=None, help="Neuronpedia's model id (default: the database's model name)")
    xn.add_argument("--source-set", default="saescope", help="source set name, e.g. myname-res-2k")
    xn.add_argument("--creator", default="saescope user", help="creator name shown on Neuronpedia")
    xn.add_argument("--release-id", default=None)
    xn.add_argument("--release-title", default=None)
    xn.add_argument("--url", default="", help="paper or project URL")
    xn.add_argument("--hf-repo", default=None, help="HuggingFace repo where the SAE folders are published")
    xn.add_argument("--explanations", default=None,
                    help='JSON file {"SAE id": {"latent": "explanation"}} (default: top-token descriptions)')
    xn.add_argument("--batch-size", type=int, default=128, help="latents per jsonl.gz batch")

    sv = sub.add_parser("serve", help="the explorer's pages and JSON API over a feature database (loopback by default)")
    sv.add_argument("dir", help="a folder holding features.db (from `saescope explore build`)")
    sv.add_argument("--host", default="127.0.0.1", help="interface to bind (default: loopback only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--model", default=None, help="the model for live text and steering (default: the run's own)")
    sv.add_argument("--device", default="cpu")
    _model_dtype_arg(sv)
    sv.add_argument("--transcoders", default=None,
                    help="a CLT or transcoder set (as `saescope circuit` takes) to make attribution graphs and "
                         "intervene from the pages; graphs live in DIR/graphs")
    sv.add_argument("--set", default=None, help="which CLT or transcoder set, when --transcoders holds several")

    r = sub.add_parser("run", help="the whole pipeline on one configuration (default: the embedded Gemma 3 270M)")
    r.add_argument("--config", default=None, help="a .toml or .json run configuration")
    r.add_argument("--out", required=True, help="output folder; a rerun skips finished stages")

    ex = sub.add_parser("export", help="write a run's dictionaries in Gemma Scope 2's, SAELens's or circuit-tracer's layout")
    ex.add_argument("dir", help="a `saescope run` or `saescope train` output folder, a folder of dictionaries, or one")
    ex.add_argument("--format", required=True, choices=["gemmascope2", "saelens", "circuit-tracer"],
                    help="gemmascope2: KIND/layer_L_width_W_l0_K[_affine]/ folders (clt/, crosscoder/ for multi-layer "
                         "dictionaries); saelens: one folder per SAE; circuit-tracer: one folder per cross-layer "
                         "transcoder and per transcoder set over layers 0…L−1")
    ex.add_argument("--out", required=True, help="the folder to write into")

    c = sub.add_parser("circuit", help="the attribution graph of a prompt's next token through transcoders or a CLT")
    c.add_argument("--transcoders", required=True,
                   help="a cross-layer transcoder, a run or folder holding a transcoder set (one entry's transcoders at "
                        "every layer), or a circuit-tracer folder")
    c.add_argument("--set", default=None, help="which CLT or transcoder set, when the folder holds several")
    c.add_argument("--prompt", required=True)
    c.add_argument("--out", required=True,
                   help="the graph's JSON (circuit-tracer's and Neuronpedia's schema); graph-metadata.json and the "
                        "unpruned graph (.safetensors) go beside it")
    c.add_argument("--model", default="gemma-3-270m-q4km")
    c.add_argument("--targets", default=None,
                   help="comma-separated next tokens to explain (default: the most likely, up to --logit-probability)")
    c.add_argument("--max-logits", type=int, default=10)
    c.add_argument("--logit-probability", type=float, default=0.95)
    c.add_argument("--max-feature-nodes", type=int, default=4096, help="the node budget (memory grows with it)")
    c.add_argument("--batch-size", type=int, default=64, help="targets per backward pass")
    c.add_argument("--node-threshold", type=float, default=0.8)
    c.add_argument("--edge-threshold", type=float, default=0.98)
    c.add_argument("--features", default=None,
                   help="a feature database (saescope explore build) of the transcoders: each node's page goes to "
                        "features/<set>/<index>.json beside the graph and its top tokens label the node")
    c.add_argument("--device", default="cpu")
    _model_dtype_arg(c)

    s = sub.add_parser("sites", help="list a model's sites and their widths")
    s.add_argument("--model", default="gemma-3-270m-q4km")

    i = sub.add_parser("info", help="summarise an activation store")
    i.add_argument("path")

    v = sub.add_parser("verify", help="check a store, SAEs, a checkpoint, a feature database or a whole run folder")
    v.add_argument("paths", nargs="+", metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `saescope ... | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet or not _lead() else logging.INFO, format="%(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    if args.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return _dispatch(args)
    except SaescopeError as exc:
        world = os.environ.get("WORLD_SIZE", "1")
        where = f"rank {os.environ.get('RANK')} of {world}: " if world != "1" else ""
        print(f"saescope: error: {where}{exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk or a lost mount, where no stage gave a better message
        print(f"saescope: error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("saescope: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    from .config import CorpusConfig, HarvestConfig, validated

    if args.command == "harvest":
        from .data import harvest

        corpus = validated(CorpusConfig, **_corpus_values(args))
        cfg = validated(HarvestConfig, model=args.model, sites=args.sites, tokens=args.tokens, batch_size=args.batch_size,
                        dtype=args.dtype, model_dtype=args.model_dtype, shard_mb=args.shard_mb, device=args.device,
                        corpus=corpus)
        store = harvest(cfg, args.out, progress=not args.quiet)
        print(store.summary())
    elif args.command == "train":
        from .train import train

        paths = train(_train_config(args), args.out, progress=not args.quiet)
        if _lead():
            print(f"{len(paths)} SAEs in {Path(args.out) / 'saes'}; metrics in {Path(args.out) / 'metrics.jsonl'}")
    elif args.command == "eval":
        from .evals.report import evaluate_paths, replacement_path

        corpus = validated(CorpusConfig, **{"split": "heldout", **_corpus_values(args)})
        records = evaluate_paths(args.sae, args.model, corpus, args.tokens, args.out, batch_size=args.batch_size,
                                 device=args.device, dtype=args.model_dtype, site=args.site, kind=args.kind,
                                 allow_overlap=args.allow_overlap,
                                 progress=not args.quiet)
        print(Path(args.out).with_suffix(".md").read_text())
        replaced = replacement_path(args.out)
        if replaced.is_file():
            print(replaced.with_suffix(".md").read_text())
        print(f"{len(records)} SAEs evaluated; results in {args.out}" +
              (f", the replacement model in {replaced}" if replaced.is_file() else ""))
    elif args.command == "circuit":
        from .circuits.cli import circuit_command

        print(circuit_command(args))
    elif args.command == "explore" and args.explore_command == "neuronpedia":
        from .explore.neuronpedia import export_neuronpedia

        explanations = None
        if args.explanations:
            from .files import read_json

            explanations = {sae: {int(i): text for i, text in by_latent.items()}
                            for sae, by_latent in read_json(Path(args.explanations)).items()}
        info = export_neuronpedia(Path(args.dir) / "features.db", args.out, model_id=args.model_id,
                                  source_set=args.source_set, creator_name=args.creator, release_id=args.release_id,
                                  release_title=args.release_title, url=args.url, hf_repo_id=args.hf_repo,
                                  explanations=explanations, batch_size=args.batch_size, progress=not args.quiet)
        print(f"Neuronpedia export {info['out']}: {len(info['sources'])} sources, {info['features']} features, "
              f"{info['activations']} activations, {info['explanations']} explanations")
    elif args.command == "explore":
        from .explore.build import build_dir

        corpus = validated(CorpusConfig, **{"split": "heldout", "seq_len": 128, **_corpus_values(args)})
        info = build_dir(args.dir, corpus, args.tokens, model=args.model, out=args.out, batch_size=args.batch_size,
                         device=args.device, dtype=args.model_dtype, progress=not args.quiet)
        print(f"feature database {info['path']}: {info['saes']} SAEs, {info['tokens']} tokens, "
              f"{info['bytes'] / 2**20:.1f} MiB, {info['seconds']:.0f} s")
    elif args.command == "serve":
        import uvicorn

        from .explore import connect
        from .explore.server import create_app
        from .lm import load_model

        db = Path(args.dir) / "features.db"
        if not db.is_file():
            raise SaescopeError(f"no feature database at {db}; run `saescope explore build {args.dir}` first")
        model = args.model or connect(db, readonly=True).execute("SELECT value FROM meta WHERE key = 'model'").fetchone()[0]
        name, unit = None, None
        if args.transcoders:
            from .sae.export import pick_unit

            name, unit = pick_unit(args.transcoders, args.set)
        uvicorn.run(create_app(db, load_model(model, device=args.device, dtype=args.model_dtype), run_dir=args.dir, transcoders=unit,
                               transcoders_name=name), host=args.host, port=args.port,
                    log_level="warning" if args.quiet else "info")
    elif args.command == "export":
        from .sae.export import export_saes

        written = export_saes(args.dir, args.out, args.format)
        print(f"{len(written)} dictionaries in {args.out} ({args.format})")
    elif args.command == "run":
        from .pipeline import load_config, run

        outputs = run(load_config(args.config), args.out, progress=not args.quiet)
        if outputs is None:  # a torchrun rank other than 0: rank 0 reports
            return 0
        from .evals.report import markdown_table

        print(markdown_table(outputs["records"]))
        print("wall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in outputs["timings"].items()))
        print(f"report: {outputs['report']}")
        if outputs["features"]:
            print(f"explore the features: saescope serve {args.out}")
    elif args.command == "sites":
        from .lm import Site, available_sites, load_model

        lm = load_model(args.model)
        print(f"{lm}; sites KIND.LAYER for layers 0..{lm.n_layers - 1}:")
        for site in (Site.parse(s) for s in available_sites(lm) if s.endswith(".0")):
            print(f"  {site.kind + '.L':<12} width {site.width(lm):>6}  ({site.tl_name.replace('.0.', '.L.')})")
    elif args.command == "info":
        from .data import ActivationStore

        print(ActivationStore(args.path).summary())
    elif args.command == "verify":
        from .verify import verify

        checks = [c for path in args.paths for c in verify(path)]
        for c in checks:
            print(f"{'ok ' if c.ok else 'BAD'}  {c.what}: {c.detail}")
        bad = sum(not c.ok for c in checks)
        print(f"{len(checks) - bad} of {len(checks)} intact" + (f"; {bad} damaged" if bad else ""))
        return 1 if bad else 0
    return 0


def _lead() -> bool:
    """Rank 0 of a torchrun job, or a lone process: the one that prints results."""
    return os.environ.get("RANK", "0") == "0"


def _train_config(args):
    from .config import HarvestConfig, TrainConfig, config_from_file, validated
    from .site import Site

    def numbers(text, kind):
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise SaescopeError(f"cannot read '{text}' as a comma-separated list of {kind.__name__} values") from None

    spec = {k: v for k, v in {
        "sites": args.sites, "arch": args.arch, "transcoder": args.transcoder, "skip": args.skip,
        "clt": args.clt, "crosscoder": args.crosscoder,
        "theta_param": args.theta_param,
        "b_dec_init": args.b_dec_init,
        "widths": args.widths and numbers(args.widths, int), "lambdas": args.lambdas and numbers(args.lambdas, float),
        "ks": args.ks and numbers(args.ks, int), "target_l0": args.target_l0 and numbers(args.target_l0, float),
        "sparsity": args.sparsity, "quadratic_form": args.quadratic_form, "tanh_scale": args.tanh_scale,
        "frequency_penalty": args.frequency_penalty, "frequency_threshold": args.frequency_threshold,
        "matryoshka": args.matryoshka and numbers(args.matryoshka, int),
        "matryoshka_weights": args.matryoshka_weights and numbers(args.matryoshka_weights, float),
        "dead_aux": args.dead_aux, "input_ste": args.input_ste, "threshold_init": args.threshold_init,
        "norm_cap": args.norm_cap, "train_as": args.train_as,
    }.items() if v is not None}
    top = {k: v for k, v in {
        "store": args.store, "tokens": args.tokens, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "checkpoint_every": args.checkpoint_every, "log_every": args.log_every, "device": args.device,
        "precision": args.precision, "kernels": args.kernels, "backend": args.backend, "optimizer": args.optimizer,
        "momentum": args.momentum, "lr_scale": args.lr_scale, "loss": args.loss,
    }.items() if v is not None}
    parallel = {k: v for k, v in {"mode": args.parallel, "data_parts": args.data_parts,
                                  "timeout_s": args.dist_timeout}.items() if v is not None}
    if parallel:
        top["parallel"] = parallel
    if spec:
        top["saes"] = [spec]
    if args.model:
        tokens = args.harvest_tokens or args.tokens or 1_000_000
        top["harvest"] = validated(HarvestConfig, model=args.model, sites=spec.get("sites", "resid.6"), tokens=tokens,
                                   device=args.device or "cpu").model_dump()
        if spec.get("transcoder"):  # a transcoder also reads its target, mlp.L
            top["harvest"]["sites"] += [str(Site("mlp", Site.parse(s).layer)) for s in top["harvest"]["sites"]]
    if args.config:
        return config_from_file(TrainConfig, args.config, **top)
    return validated(TrainConfig, **top)


if __name__ == "__main__":
    sys.exit(main())
