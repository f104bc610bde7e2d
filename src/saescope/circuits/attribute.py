"""Attribution graphs (SPEC §9): which features, through which layers, make the next token.

The features of the local replacement model (circuits/local.py) are visited in order of their
running influence on the target logits, a batch of backward passes at a time, until the node
budget is spent; each pass fills one row of direct effects per target. The order, the selection
and the node layout follow circuit-tracer's, so the same transcoders on the same prompt give the
same graph there and here."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import SaescopeError
from ..lm import LanguageModel
from ..sae import SparseAutoencoder
from ..sae.layers import Layers
from ..sae.multilayer import MultiLayerDictionary
from .graph import Graph, influence, normalised
from .local import Trace, trace


@dataclass
class Active:
    """The active features of one prompt (position 0 left out: its MLP outputs stay fixed terms,
    as circuit-tracer keeps the attention sink out of graphs), in (layer, position, latent) order."""

    index: torch.Tensor     # [n, 3] model layer (= dictionary group), position, latent
    values: torch.Tensor    # [n] activations
    encoders: torch.Tensor  # [n, d_in] what each feature's pre-activation reads at its MLP input
    writes: list[torch.Tensor]  # per group: [n_g, n_out, d] activation × decoder, its features in order
    errors: torch.Tensor    # [n_layers, n_pos, d]: each MLP output less the dictionary's output
    pre: torch.Tensor       # [n] pre-activations (encoder · input + b_enc)


def as_layers(transcoders: Layers | MultiLayerDictionary | list[SparseAutoencoder], lm: LanguageModel) -> Layers:
    """A transcoder set or CLT that replaces every MLP of `lm`, or a one-line error."""
    layers = transcoders if isinstance(transcoders, Layers) else Layers(transcoders)
    n = lm.n_layers
    want = [f"mlp_in.{i} → mlp.{i}" for i in range(n)]
    got = [f"{a} → {b}" for a, b in zip(layers.sites_in, layers.sites_out)]
    if layers.kind == "crosscoder" or got != want:
        raise SaescopeError(f"attribution replaces every MLP of {lm.name} ({n} layers): it needs transcoders or a CLT "
                            f"reading mlp_in.L and writing mlp.L at every layer L; got {layers.kind} over "
                            f"{', '.join(got) if len(got) <= 4 else got[0] + ' … ' + got[-1]}")
    d = lm.d_model
    for i in range(n):
        if layers.encoder(i).shape[0] != d or layers.decoder(i).shape[-1] != d:
            raise SaescopeError(f"these transcoders read {layers.encoder(i).shape[0]} and write {layers.decoder(i).shape[-1]} "
                                f"wide activations; {lm.name} has d_model {d}: they are for another model")
    return layers


def prompt_ids(lm: LanguageModel, prompt: str | list[int] | torch.Tensor) -> torch.Tensor:
    """Token ids [n] of a prompt, with the tokenizer's BOS first (graphs leave position 0 out)."""
    if isinstance(prompt, str):
        if lm.tokenizer is None:
            raise SaescopeError(f"{lm.name} has no tokenizer: give the prompt as token ids")
        ids = torch.tensor(lm.tokenizer(prompt, add_special_tokens=True)["input_ids"])
        bos = lm.tokenizer.bos_token_id
        if bos is not None and (len(ids) == 0 or int(ids[0]) != bos):
            ids = torch.cat([torch.tensor([bos]), ids])
    else:
        ids = torch.as_tensor(prompt).reshape(-1).long()
    context = getattr(lm.text_config, "max_position_embeddings", None) or getattr(lm.text_config, "n_positions", None)
    if len(ids) < 2:
        raise SaescopeError("a prompt for attribution needs at least one token after the first")
    if context is not None and len(ids) > context:
        raise SaescopeError(f"the prompt is {len(ids)} tokens; {lm.name}'s context is {context}")
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    if int(ids.max()) >= vocab or int(ids.min()) < 0:
        raise SaescopeError(f"token ids must be within 0…{vocab - 1} for {lm.name}")
    return ids


def _active(layers: Layers, t: Trace) -> Active:
    """The active features, their vectors and the error nodes, from the traced forward's values."""
    n = len(layers.sites_in)
    index, values, encoders, writes, pre, errors = [], [], [], [], [], []
    with torch.no_grad():
        seen_in = [t.mlp_in[i][0].detach().float() for i in range(n)]
        recon = [layers.bias(j) + torch.zeros_like(seen_in[j]) for j in range(n)]
        for i in range(n):
            x = seen_in[i]
            f = layers.code(i, x)
            f[0] = 0
            for j, w in layers.writes(i, f, x).items():
                recon[j] = recon[j] + w
            pos, latent = torch.nonzero(f, as_tuple=True)
            act = f[pos, latent]
            enc = layers.encoder(i)[:, latent].T
            index.append(torch.stack([torch.full_like(pos, i), pos, latent], 1))
            values.append(act)
            encoders.append(enc)
            writes.append(layers.decoder(i)[latent] * act[:, None, None])
            pre.append((enc * x[pos]).sum(1) + layers.encoder_bias(i)[latent])
        for j in range(n):
            e = t.mlp_out[j][0].detach().float() - recon[j]
            e[0] = 0
            errors.append(e)
    return Active(torch.cat(index), torch.cat(values), torch.cat(encoders), writes,
                  torch.stack(errors), torch.cat(pre))


def _targets(lm: LanguageModel, logits: torch.Tensor, tokens: list[int] | None, max_logits: int,
             probability: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Target token ids, their probabilities, and the unembedding directions measured against the
    mean logit: the most likely tokens until their probability reaches `probability`, at most
    `max_logits`, or the `tokens` given."""
    probs = torch.softmax(logits.float(), -1)
    if tokens:
        ids = torch.tensor(tokens)
        if int(ids.max()) >= len(probs) or int(ids.min()) < 0:
            raise SaescopeError(f"target token ids must be within 0…{len(probs) - 1}")
    else:
        top_p, top = probs.topk(min(max_logits, len(probs)))
        ids = top[:int(torch.searchsorted(top_p.cumsum(0), torch.tensor(probability))) + 1]
    unembed = lm.model.get_output_embeddings().weight.detach().float()
    return ids, probs[ids], unembed[ids] - unembed.mean(0)


def attribute(lm: LanguageModel, transcoders, prompt: str | list[int] | torch.Tensor, *,
              targets: list[int] | None = None, max_logits: int = 10, logit_probability: float = 0.95,
              max_feature_nodes: int | None = None, batch_size: int = 64, update_interval: int = 4,
              progress: bool = True, dictionary: str = "") -> Graph:
    """The attribution graph of `prompt`'s next token through `transcoders` (a transcoder per
    layer, skip transcoders, or a CLT), unpruned: every edge among the selected features (at most
    `max_feature_nodes`, the most influential first), the error nodes, the token embeddings and
    the target logits. `batch_size` targets per (vectorised) backward pass."""
    start = time.perf_counter()
    layers = as_layers(transcoders, lm)
    ids = prompt_ids(lm, prompt)
    n, n_pos = lm.n_layers, len(ids)
    t = trace(lm, layers, ids)
    act = _active(layers, t)
    with torch.no_grad():  # the last position's logits from the traced final residual: no second forward
        logits = lm.model.get_output_embeddings()(t.final[0, -1].detach())
        cap = getattr(lm.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    logit_ids, logit_p, logit_vecs = _targets(lm, logits, targets, max_logits, logit_probability)
    n_active, n_logits = len(act.values), len(logit_ids)
    budget = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    n_cols = n_active + (n + 1) * n_pos          # features, errors, tokens: every possible source
    embed = t.embed[0].detach().float()
    # per group and position: the features there and their writes to the group's outputs, flattened
    # so that one product with the gradients at that position gives their edges
    blocks = []
    for i in range(n):
        mine = torch.nonzero(act.index[:, 0] == i).squeeze(1)
        for p in act.index[mine, 1].unique().tolist():
            cols = mine[act.index[mine, 1] == p]
            blocks.append((i, i + act.writes[i].shape[1], p, cols, act.writes[i][cols - mine[0]].flatten(1).T.contiguous()))

    def rows(at_layers: torch.Tensor, at_pos: torch.Tensor, vectors: torch.Tensor, retain: bool) -> torch.Tensor:
        grads, g_embed = t.gradients(at_layers, at_pos, vectors, n, retain)
        b = len(at_layers)
        out = torch.zeros(b, n_cols)
        for i, j, p, cols, w in blocks:  # a feature's edge: its writes to outputs i…j−1 against their gradients
            reached = [grads[layer][:, p] for layer in range(i, j) if layer in grads]
            if reached:  # outputs at or above the highest target get no gradient: their edges stay zero
                out[:, cols] = torch.cat(reached, 1) @ w[:len(reached) * w.shape[0] // (j - i)]
        for layer, g in grads.items():
            lo = n_active + layer * n_pos
            out[:, lo:lo + n_pos] = torch.einsum("bpd,pd->bp", g, act.errors[layer])
        out[:, n_active + n * n_pos:] = torch.einsum("bpd,pd->bp", g_embed, embed)
        return out

    edges = torch.zeros(budget + n_logits, n_cols)
    node_of_row = torch.zeros(budget + n_logits, dtype=torch.long)
    bar = tqdm(total=budget + n_logits, unit="node", desc="attribution", disable=not progress)
    for lo in range(0, n_logits, batch_size):
        hi = min(lo + batch_size, n_logits)
        edges[lo:hi] = rows(torch.full((hi - lo,), n), torch.full((hi - lo,), n_pos - 1), logit_vecs[lo:hi], True)
        node_of_row[lo:hi] = n_cols + torch.arange(lo, hi)
        bar.update(hi - lo)
    filled, visited = n_logits, torch.zeros(n_active, dtype=torch.bool)
    while int(visited.sum()) < budget:
        if budget == n_active:
            pending = torch.arange(n_active)
        else:
            weights = torch.zeros(n_cols + n_logits)
            weights[n_cols:] = logit_p
            ranks = influence(normalised(edges[:filled]), weights, 128, rows=node_of_row[:filled])[:n_active]
            order = ranks.argsort(descending=True)
            pending = order[~visited[order]][:min(update_interval * batch_size, budget - int(visited.sum()))]
            # the same queue in layer order: a batch's backward pass runs only below its highest target
            pending = pending[act.index[pending, 0].argsort(stable=True)]
        for lo in range(0, len(pending), batch_size):
            chunk = pending[lo:lo + batch_size]
            last = int(visited.sum()) + len(chunk) >= budget
            edges[filled:filled + len(chunk)] = rows(act.index[chunk, 0], act.index[chunk, 1], act.encoders[chunk], not last)
            node_of_row[filled:filled + len(chunk)] = chunk
            visited[chunk] = True
            filled += len(chunk)
            bar.update(len(chunk))
    bar.close()

    selected = torch.nonzero(visited).squeeze(1)
    keep_cols = torch.cat([selected, torch.arange(n_active, n_cols)])
    ordered = edges[node_of_row.argsort()][:, keep_cols]    # features by index, then logits
    size = len(keep_cols) + n_logits
    adjacency = torch.zeros(size, size)
    adjacency[:budget, :len(keep_cols)] = ordered[:budget]
    adjacency[-n_logits:, :len(keep_cols)] = ordered[budget:]
    tok = lm.tokenizer
    decode = (lambda i: tok.decode([int(i)])) if tok is not None else str
    return Graph(prompt=prompt if isinstance(prompt, str) else "".join(decode(i) for i in ids),
                 tokens=ids, token_strings=[decode(i) for i in ids], features=act.index[selected],
                 activations=act.values[selected], logit_tokens=logit_ids, logit_strings=[decode(i) for i in logit_ids],
                 logit_probabilities=logit_p, adjacency=adjacency, n_layers=n, model=lm.name, dictionary=dictionary,
                 n_active=n_active, extra={"pre_activations": act.pre[selected], "seconds": time.perf_counter() - start,
                                           "error_vectors": act.errors})
