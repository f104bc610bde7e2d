"""Graph files: the pruned graph as the JSON that circuit-tracer's frontend and Neuronpedia read
(SPEC §9), with the `graph-metadata.json` index beside it; and the whole unpruned graph in one
safetensors file, to prune again or serve without recomputing (no pickle)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, field_validator

from ..errors import SaescopeError
from ..files import atomic_write, read_safetensors, safetensors_metadata, write_json, write_safetensors
from .graph import Graph, Pruned, prune

SCHEMA_VERSION = 1
_TENSORS = ("tokens", "features", "activations", "logit_tokens", "logit_probabilities", "adjacency")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GraphNode(_Strict):
    node_id: str
    feature: int
    layer: str
    ctx_idx: int
    feature_type: str
    token_prob: float = 0.0
    is_target_logit: bool = False
    run_idx: int = 0
    reverse_ctx_idx: int = 0
    jsNodeId: str
    clerp: str = ""
    influence: float | None = None
    activation: float | None = None

    @field_validator("feature_type")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in ("cross layer transcoder", "mlp reconstruction error", "embedding", "logit"):
            raise ValueError(f"unknown feature_type {v!r}")
        return v


class GraphLink(_Strict):
    source: str
    target: str
    weight: float


class GraphMetadata(BaseModel):  # frontends add their own keys here
    slug: str
    scan: str
    transcoder_list: list[str]
    prompt_tokens: list[str]
    prompt: str
    node_threshold: float | None = None
    schema_version: int | None = SCHEMA_VERSION


class GraphQParams(_Strict):
    pinnedIds: list[str]
    supernodes: list[list[str]]
    linkType: str
    clickedId: str
    sg_pos: str


class GraphFile(_Strict):
    """The graph JSON's schema (circuit-tracer's frontend models, which Neuronpedia's graphs follow),
    with every link's ends among the nodes."""

    metadata: GraphMetadata
    qParams: GraphQParams
    nodes: list[GraphNode]
    links: list[GraphLink]

    def model_post_init(self, _context) -> None:
        ids = {n.node_id for n in self.nodes}
        if len(ids) != len(self.nodes):
            raise ValueError("node ids repeat")
        dangling = [x for link in self.links for x in (link.source, link.target) if x not in ids]
        if dangling:
            raise ValueError(f"links name nodes that are not there: {dangling[:3]}")


def feature_index(layer: int, latent: int) -> int:
    """One integer per (layer, latent), as the frontend numbers features (Cantor pairing)."""
    return (layer + latent) * (layer + latent + 1) // 2 + latent


def _token(text: str) -> str:
    return text.replace("\n", "⏎").replace("\t", "→").replace("\r", "↵")


def graph_json(graph: Graph, slug: str, node_threshold: float = 0.8, edge_threshold: float = 0.98,
               labels: dict[tuple[int, int], str] | None = None, pruned: Pruned | None = None) -> dict:
    """The pruned graph in the frontend's schema: features "{layer}_{latent}_{pos}", errors
    "0_{layer}_{pos}", embeddings "E_{token}_{pos}", logits "{L+1}_{token}_{pos}"; `labels` gives
    a feature's one-line description (clerp) by (layer, latent); `pruned`, the graph already
    pruned at those thresholds."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", slug):
        raise SaescopeError(f"graph slug {slug!r}: use letters, digits, '.', '_' and '-' only")
    kept = pruned or prune(graph, node_threshold, edge_threshold)
    labels = labels or {}
    nodes: dict[int, dict] = {}
    n, pos_last = graph.n_layers, graph.n_pos - 1
    feature_ids = {f"{layer}_{latent}_{pos}" for layer, pos, latent in graph.features.tolist()}
    for i in torch.nonzero(kept.nodes).squeeze(1).tolist():
        inf = float(kept.cumulative[i])
        if i < graph.error_start:
            layer, pos, latent = graph.features[i].tolist()
            nodes[i] = _node(f"{layer}_{latent}_{pos}", feature_index(layer, latent), str(layer), pos,
                             "cross layer transcoder", f"{layer}_{latent}-0", influence=inf,
                             activation=float(graph.activations[i]), clerp=labels.get((layer, latent), ""))
        elif i < graph.token_start:
            layer, pos = divmod(i - graph.error_start, graph.n_pos)
            node_id = f"0_{layer}_{pos}"  # the schema's id is a layer-0 feature's when that latent is numbered `layer`
            if node_id in feature_ids:
                node_id = f"err_{layer}_{pos}"
            nodes[i] = _node(node_id, -1, str(layer), pos, "mlp reconstruction error", f"{layer}_{pos}-0",
                             influence=inf)
        elif i < graph.logit_start:
            pos = i - graph.token_start
            tok = int(graph.tokens[pos])
            nodes[i] = _node(f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}", influence=inf)
        else:
            q = i - graph.logit_start
            tok, p = int(graph.logit_tokens[q]), float(graph.logit_probabilities[q])
            nodes[i] = _node(f"{n + 1}_{tok}_{pos_last}", tok, str(n + 1), pos_last, "logit", f"L_{tok}-{pos_last}",
                             token_prob=p, is_target_logit=q == 0,
                             clerp=f'Output "{graph.logit_strings[q]}" (p={p:.3f})')
    targets, sources = torch.nonzero(kept.edges, as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[t]["node_id"], "weight": float(graph.adjacency[t, s])}
             for t, s in zip(targets.tolist(), sources.tolist()) if s in nodes and t in nodes]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [v for v in nodes.values() if v["node_id"] in linked or v["feature_type"] in ("embedding", "logit")]
    data = {"metadata": {"slug": slug, "scan": graph.dictionary or graph.model, "transcoder_list": [],
                         "prompt_tokens": [_token(t) for t in graph.token_strings], "prompt": graph.prompt,
                         "node_threshold": node_threshold, "schema_version": SCHEMA_VERSION,
                         "model": graph.model, "edge_threshold": edge_threshold},
            "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
            "nodes": used, "links": links}
    GraphFile.model_validate(data)
    return data


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js_id: str, *,
          influence: float | None = None, activation: float | None = None, token_prob: float = 0.0,
          is_target_logit: bool = False, clerp: str = "") -> dict:
    return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": ctx_idx, "feature_type": feature_type,
            "token_prob": token_prob, "is_target_logit": is_target_logit, "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js_id, "clerp": clerp, "influence": influence, "activation": activation}


def write_graph_files(graph: Graph, out: str | os.PathLike, slug: str, node_threshold: float = 0.8,
                      edge_threshold: float = 0.98, labels: dict[tuple[int, int], str] | None = None,
                      pruned: Pruned | None = None) -> Path:
    """`{slug}.json` under `out` and its entry in `out/graph-metadata.json` (one per slug)."""
    out = Path(out)
    data = graph_json(graph, slug, node_threshold, edge_threshold, labels, pruned)
    path = out / f"{slug}.json"
    atomic_write(path, json.dumps(data).encode())
    index = out / "graph-metadata.json"
    try:
        graphs = json.loads(index.read_text())["graphs"] if index.is_file() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        raise SaescopeError(f"{index} is not a graph index (JSON with a 'graphs' list); move it away") from None
    graphs = [g for g in graphs if g.get("slug") != slug] + [data["metadata"]]
    write_json(index, {"graphs": graphs})
    return path


def save_graph(graph: Graph, path: str | os.PathLike) -> Path:
    """The unpruned graph in one safetensors file; strings and sizes in its metadata."""
    meta = {"format": "saescope-graph", "prompt": graph.prompt, "token_strings": graph.token_strings,
            "logit_strings": graph.logit_strings, "n_layers": graph.n_layers, "model": graph.model,
            "dictionary": graph.dictionary, "n_active": graph.n_active}
    write_safetensors(Path(path), {k: getattr(graph, k) for k in _TENSORS}, {"saescope": json.dumps(meta)})
    return Path(path)


def load_graph(path: str | os.PathLike) -> Graph:
    path = Path(path)
    if not path.is_file():
        raise SaescopeError(f"no graph file at {path}")
    header, tensors = safetensors_metadata(path), read_safetensors(path)
    try:
        meta = json.loads(header["saescope"])
        assert meta["format"] == "saescope-graph"
    except (KeyError, TypeError, AssertionError, json.JSONDecodeError):
        raise SaescopeError(f"{path} is not a saescope graph file") from None
    missing = [k for k in _TENSORS if k not in tensors]
    if missing:
        raise SaescopeError(f"{path} lacks {', '.join(missing)}")
    return Graph(prompt=meta["prompt"], token_strings=meta["token_strings"], logit_strings=meta["logit_strings"],
                 n_layers=meta["n_layers"], model=meta["model"], dictionary=meta["dictionary"],
                 n_active=meta["n_active"], **{k: tensors[k] for k in _TENSORS})
