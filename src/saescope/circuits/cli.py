"""`saescope circuit`: a graph from the command line, written where the frontends read it."""

from __future__ import annotations

from pathlib import Path

from ..errors import SaescopeError
from ..lm import load_model
from ..sae.export import replacement_units
from ..sae.multilayer import MultiLayerDictionary
from ..site import layers_label
from .attribute import attribute
from .files import feature_files, save_graph, write_graph_files
from .graph import prune, scores


def pick_unit(folder: str, name: str | None):
    """The CLT or transcoder set of `folder` to trace through, by name when there are several."""
    units = replacement_units(folder)
    if name is not None:
        if name not in units:
            raise SaescopeError(f"no CLT or transcoder set named {name!r} in {folder}; there: {', '.join(units)}")
        return name, units[name]
    if len(units) > 1:
        raise SaescopeError(f"{folder} holds {len(units)} CLTs and transcoder sets ({', '.join(units)}): choose one with --set")
    return next(iter(units.items()))


def target_ids(lm, text: str | None) -> list[int] | None:
    if not text:
        return None
    ids = []
    for token in text.split(","):
        got = lm.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(got) != 1:
            raise SaescopeError(f"target {token!r} is {len(got)} tokens for {lm.name}; a target is one token")
        ids.append(got[0])
    return ids


def circuit_command(args) -> str:
    out = Path(args.out)
    if out.suffix != ".json":
        raise SaescopeError(f"--out {out}: the graph is written as JSON; name a .json file")
    name, unit = pick_unit(args.transcoders, args.set)
    lm = load_model(args.model, device=args.device)
    graph = attribute(lm, unit, args.prompt, targets=target_ids(lm, args.targets), max_logits=args.max_logits,
                      logit_probability=args.logit_probability, max_feature_nodes=args.max_feature_nodes,
                      batch_size=args.batch_size, progress=not args.quiet, dictionary=name)
    labels = None
    if args.features:  # a set "<its layers>-<rest>" holds transcoders named "mlp_in.L-<rest>" in a run's database
        sites = unit.cfg.sites_in if isinstance(unit, MultiLayerDictionary) else [sae.cfg.site for sae in unit]
        rest = name.removeprefix(layers_label(tuple(sites)) + "-")
        labels = feature_files(graph, args.features, lambda layer: f"mlp_in.{layer}-{rest}", out.parent / "features", name)
    path = write_graph_files(graph, out.parent, out.stem, args.node_threshold, args.edge_threshold, labels)
    save_graph(graph, out.with_suffix(".safetensors"))
    kept = prune(graph, args.node_threshold, args.edge_threshold)
    replacement, completeness = scores(graph)
    return (f"graph {path}: {graph.n_features} of {graph.n_active} active features attributed, "
            f"{int(kept.nodes[:graph.n_features].sum())} kept; {graph.n_logits} target logits "
            f"({', '.join(repr(t) for t in graph.logit_strings)}); replacement score {replacement:.3f}, "
            f"completeness {completeness:.3f}; {graph.extra['seconds']:.1f} s")
