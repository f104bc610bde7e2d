"""Interventions on a graph's features: set chosen features of the transcoders or CLT to a value
(0 ablates, a multiple of the activation steers) at their prompt positions, and compare the next
token's top logits and the greedy continuation with the unchanged model's.

Each MLP output becomes the model's own plus the dictionary's change, Σ (value − activation) ·
decoder, with the activation read from the live input: downstream features and MLPs respond, and
with no intervention the model is untouched. By default the attention patterns of the prompt stay
the unchanged run's (circuit-tracer's default), so an effect is the features' and not a change of
where tokens look; the continuation runs past the prompt, where no pattern is recorded, so it lets
attention move."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import SaescopeError
from ..lm import LanguageModel, splice
from .attribute import as_layers, prompt_ids
from .local import Constants, frozen


@dataclass(frozen=True)
class Intervention:
    layer: int
    position: int
    latent: int
    value: float = 0.0


def _checked(layers, interventions, n_pos: int) -> list[Intervention]:
    out = []
    for iv in interventions:
        iv = iv if isinstance(iv, Intervention) else Intervention(*iv)
        if not 0 <= iv.layer < len(layers.sites_in):
            raise SaescopeError(f"intervention at layer {iv.layer}: the dictionary has layers 0…{len(layers.sites_in) - 1}")
        if not 0 <= iv.position < n_pos:
            raise SaescopeError(f"intervention at position {iv.position}: the prompt has positions 0…{n_pos - 1}")
        width = layers.encoder(iv.layer).shape[1]
        if not 0 <= iv.latent < width:
            raise SaescopeError(f"intervention on latent {iv.latent} at layer {iv.layer}: it has latents 0…{width - 1}")
        out.append(iv)
    return out


@contextlib.contextmanager
def _steered(lm: LanguageModel, layers, interventions: list[Intervention], seen: list):
    """Hooks adding each intervention's change to the outputs its feature writes; `seen` gets
    (intervention, activation before) on every forward."""
    pending: dict[int, torch.Tensor] = {}

    def read(i):
        def fn(x):
            mine = [iv for iv in interventions if iv.layer == i]
            if i == 0:
                pending.clear()
            if mine:
                f = layers.code(i, x)
                dec = layers.decoder(i)
                for iv in mine:
                    before = f[:, iv.position, iv.latent]
                    seen.append((iv, float(before[0])))
                    change = (iv.value - before)[:, None, None] * dec[iv.latent]  # [batch, n_out, d]
                    for k in range(change.shape[1]):
                        j = i + k
                        add = pending.setdefault(j, torch.zeros_like(x))
                        add[:, iv.position] += change[:, k]
            return x
        return fn

    def write(j):
        def fn(y):
            return y + pending[j].to(y.dtype) if j in pending else y
        return fn

    with contextlib.ExitStack() as stack:
        for i, (s_in, s_out) in enumerate(zip(layers.sites_in, layers.sites_out)):
            stack.enter_context(splice(lm, s_in, read(i)))
            stack.enter_context(splice(lm, s_out, write(i)))
        yield


def _top(lm: LanguageModel, logits: torch.Tensor, k: int) -> list[dict]:
    p = torch.softmax(logits.float(), -1)
    top = p.topk(k)
    decode = lm.tokenizer.decode if lm.tokenizer is not None else (lambda ids: str(ids[0]))
    return [{"token": decode([int(t)]), "id": int(t), "prob": float(q), "logit": float(logits[t])}
            for q, t in zip(top.values, top.indices)]


def _greedy(lm: LanguageModel, ids: torch.Tensor, new_tokens: int) -> list[int]:
    seq = ids[None]
    for _ in range(new_tokens):
        nxt = lm(seq)[0, -1].argmax()
        seq = torch.cat([seq, nxt.view(1, 1).to(seq.device)], 1)
    return seq[0, len(ids):].tolist()


def intervene(lm: LanguageModel, transcoders, prompt, interventions, *, top: int = 10, new_tokens: int = 8,
              freeze_attention: bool = True) -> dict:
    """The unchanged and the intervened model side by side: the next token's `top` logits and a
    greedy continuation of `new_tokens`; `interventions` are Intervention(layer, position, latent,
    value) or such tuples; each one's activation before, in "features"."""
    layers = as_layers(transcoders, lm)
    ids = prompt_ids(lm, prompt)
    chosen = _checked(layers, interventions, len(ids))
    decode = lm.tokenizer.decode if lm.tokenizer is not None else (lambda t: " ".join(map(str, t)))
    patterns = Constants()
    with torch.no_grad():
        with frozen(lm, patterns, attention_only=True) if freeze_attention else contextlib.nullcontext():
            clean = lm(ids[None])[0, -1]
        clean_next = _greedy(lm, ids, new_tokens)
        seen: list = []
        with _steered(lm, layers, chosen, seen):
            with frozen(lm, patterns, attention_only=True) if freeze_attention else contextlib.nullcontext():
                changed = lm(ids[None])[0, -1]
            before = list(seen)
            changed_next = _greedy(lm, ids, new_tokens)
    return {"prompt_tokens": [decode([int(t)]) for t in ids],
            "features": [{"layer": iv.layer, "position": iv.position, "latent": iv.latent, "value": iv.value,
                          "activation": act} for iv, act in before],
            "clean": {"top": _top(lm, clean, top), "continuation": decode(clean_next)},
            "intervened": {"top": _top(lm, changed, top), "continuation": decode(changed_next)},
            "freeze_attention": freeze_attention}
