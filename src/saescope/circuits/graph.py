"""An attribution graph (SPEC §9): nodes, their direct-effect adjacency, influence, pruning and
the replacement and completeness scores.

Node order, as circuit-tracer keeps it so that matrices compare entry for entry: the selected
features (by layer, position, latent), the error nodes (layer-major, one per layer and position),
the token embeddings, then the target logits. `adjacency[t, s]` is the direct effect of source s
on target t (rows are targets)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SaescopeError


@dataclass
class Graph:
    prompt: str
    tokens: torch.Tensor              # [n_pos] token ids
    token_strings: list[str]
    features: torch.Tensor            # [n_features, 3]: model layer, position, latent of each selected feature
    activations: torch.Tensor         # [n_features]
    logit_tokens: torch.Tensor        # [n_logits] vocabulary ids of the target logits
    logit_strings: list[str]
    logit_probabilities: torch.Tensor  # [n_logits]
    adjacency: torch.Tensor           # [n_nodes, n_nodes], rows = targets
    n_layers: int
    model: str = ""
    dictionary: str = ""              # what the features belong to (a scan, in circuit-tracer's words)
    n_active: int = 0                 # every active feature on the prompt, selected or not
    extra: dict = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.adjacency.shape[0], dtype=self.adjacency.dtype)
        w[self.logit_start:] = self.logit_probabilities.to(w.dtype)
        return w


def normalised(adjacency: torch.Tensor) -> torch.Tensor:
    """Each target's incoming absolute weights as shares of their sum."""
    a = adjacency.abs()
    return a / a.sum(1, keepdim=True).clamp_min(1e-10)


def influence(a: torch.Tensor, weights: torch.Tensor, max_steps: int = 1000,
              rows: torch.Tensor | None = None) -> torch.Tensor:
    """weights · (A + A² + …): every node's influence on the weighted targets along paths of any
    length. A graph's edges run from earlier to later nodes only, so the series ends. `rows`: A
    holds only some targets, row r being node rows[r] (the rows attribution has filled so far);
    nodes past A's columns have no sources."""
    def times(v: torch.Tensor) -> torch.Tensor:
        if rows is None:
            return v @ a
        out = torch.zeros_like(v)
        out[:a.shape[1]] = v[rows] @ a
        return out

    step = times(weights)
    total = step.clone()
    for _ in range(max_steps):
        if not step.any():
            return total
        step = times(step)
        total += step
    raise SaescopeError(f"influence did not converge in {max_steps} steps: the graph has a cycle")


def node_influence(graph: Graph) -> torch.Tensor:
    return influence(normalised(graph.adjacency), graph.logit_weights())


def _keep_share(scores: torch.Tensor, share: float) -> torch.Tensor:
    """The score at which the largest scores first hold `share` of the total."""
    ordered = scores.sort(descending=True).values
    cumulative = ordered.cumsum(0) / ordered.sum().clamp_min(1e-30)
    return ordered[min(int(torch.searchsorted(cumulative, torch.tensor(share, dtype=cumulative.dtype))), len(ordered) - 1)]


@dataclass
class Pruned:
    nodes: torch.Tensor      # [n_nodes] kept
    edges: torch.Tensor      # [n_nodes, n_nodes] kept
    cumulative: torch.Tensor  # [n_nodes] each node's cumulative influence share in influence order


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    """The smallest node set holding `node_threshold` of the logits' influence (tokens and logits
    always kept), then the smallest edge set among them holding `edge_threshold` of the edge
    influence; features and errors left without an outgoing edge, and features without an
    incoming one, go, until nothing changes."""
    for name, t in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= t <= 1.0:
            raise SaescopeError(f"{name} must be within [0, 1], got {t}")
    w = graph.logit_weights()
    scores = influence(normalised(graph.adjacency), w)
    nodes = scores >= _keep_share(scores, node_threshold)
    nodes[graph.token_start:] = True
    a = graph.adjacency.clone()
    a[~nodes] = 0
    a[:, ~nodes] = 0
    na = normalised(a)
    edge_scores = na * (influence(na, w) + w)[:, None]
    edges = edge_scores >= _keep_share(edge_scores.flatten(), edge_threshold)
    sources, features = slice(0, graph.token_start), slice(0, graph.n_features)

    def refine():
        nodes[sources] &= edges[:, sources].any(0)
        nodes[features] &= edges[features].any(1)

    before = nodes.clone()
    refine()
    while not torch.equal(nodes, before):
        before = nodes.clone()
        edges[~nodes] = False
        edges[:, ~nodes] = False
        refine()
    order = scores.argsort(descending=True)
    cumulative = torch.empty_like(scores)
    cumulative[order] = scores[order].cumsum(0) / scores.sum().clamp_min(1e-30)
    return Pruned(nodes, edges, cumulative)


def scores(graph: Graph) -> tuple[float, float]:
    """(replacement, completeness). Replacement: of the influence the tokens and errors have on
    the logits, the tokens' share (the rest runs through errors). Completeness: each node's
    non-error share of its inputs, weighted by the node's influence on the logits (logits
    counted with their weights)."""
    w = graph.logit_weights()
    na = normalised(graph.adjacency)
    inf = influence(na, w)
    errors = slice(graph.error_start, graph.token_start)
    tokens = float(inf[graph.token_start:graph.logit_start].sum())
    err = float(inf[errors].sum())
    replacement = tokens / (tokens + err) if tokens + err > 0 else float("nan")
    weight = inf + w
    complete = float(((1 - na[:, errors].sum(1)) * weight).sum() / weight.sum())
    return replacement, complete
