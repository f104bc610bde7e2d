"""`saescope circuit`: a graph from the command line, written where the frontends read it."""

from __future__ import annotations

from pathlib import Path

from ..errors import SaescopeError
from ..explore.graphs import feature_files
from ..lm import load_model
from ..sae.export import member, pick_unit
from .attribute import attribute
from .files import save_graph, write_graph_files
from .graph import prune, scores


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
    lm = load_model(args.model, device=args.device, dtype=args.model_dtype)
    graph = attribute(lm, unit, args.prompt, targets=target_ids(lm, args.targets), max_logits=args.max_logits,
                      logit_probability=args.logit_probability, max_feature_nodes=args.max_feature_nodes,
                      batch_size=args.batch_size, progress=not args.quiet, dictionary=name)
    labels = None
    if args.features:
        labels = feature_files(graph, args.features, lambda layer: member(name, [f"mlp_in.{i}" for i in range(lm.n_layers)], layer),
                               out.parent / "features", name)
    kept = prune(graph, args.node_threshold, args.edge_threshold)
    path = write_graph_files(graph, out.parent, out.stem, args.node_threshold, args.edge_threshold, labels, kept)
    save_graph(graph, out.with_suffix(".safetensors"))
    replacement, completeness = scores(graph)
    return (f"graph {path}: {graph.n_features} of {graph.n_active} active features attributed, "
            f"{int(kept.nodes[:graph.n_features].sum())} kept; {graph.n_logits} target logits "
            f"({', '.join(repr(t) for t in graph.logit_strings)}); replacement score {replacement:.3f}, "
            f"completeness {completeness:.3f}; {graph.extra['seconds']:.1f} s")
