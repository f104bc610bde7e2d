"""The local replacement model of one prompt (SPEC §9), run forward once with gradients so that
backward passes give direct effects.

On this prompt, with every attention pattern and every normalisation's scale frozen at its value,
and each MLP's output cut from its input (only a skip transcoder's x·A still passes gradient), the
residual stream is a linear function of the token embeddings and the MLP outputs; the forward
values are the model's own. An MLP output then splits into the dictionary's writes and an error
node that holds the rest, so the gradient of a target (a feature's pre-activation, a logit) at an
MLP output, dotted with a source's write, is the source's direct effect on the target: one
backward pass per target, many targets vectorised over one forward."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

from ..errors import SaescopeError
from ..lm import LanguageModel
from ..lm import norms
from ..lm.model import _get
from ..lm.sites import _attach
from ..sae.layers import Layers
from ..site import Site

FROZEN = "saescope_frozen_pattern"


class Constants:
    """What the frozen model holds fixed, per module: attention patterns and norm scales. Empty
    while recording (the values of this forward are kept), filled while replaying (the values of
    an earlier forward are used, so the model stays the prompt's linear map at other inputs)."""

    def __init__(self):
        self.values: dict[int, torch.Tensor] = {}
        self.replay = False

    def fix(self, module: torch.nn.Module, value: torch.Tensor) -> torch.Tensor:
        key = id(module)
        if self.replay:
            if key not in self.values:
                raise SaescopeError(f"no frozen value of {type(module).__name__} to replay: record the prompt first")
            return self.values[key]
        self.values[key] = value.detach()
        return self.values[key]


_ACTIVE: list[Constants] = []


def _frozen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **_):
    """Eager attention whose pattern is a constant: the output is linear in the values."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
    scores = (query @ key.transpose(2, 3)) * (module.head_dim ** -0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[..., :key.shape[-2]]
    pattern = _ACTIVE[-1].fix(module, torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype))
    return (pattern @ value).transpose(1, 2).contiguous(), pattern


AttentionInterface.register(FROZEN, _frozen_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(FROZEN, eager_mask)


def _freeze_norm(module, args, output):
    """The norm's output with its per-token scale a constant: while recording, the module's own
    value with gradient (x − mean) · scale · weight (checked against the module's output, so a
    norm whose math differs is refused rather than giving wrong edges); while replaying, that
    linear map of the new input."""
    x = norms.centred(module, args[0])
    bias = norms.bias(module)
    constants = _ACTIVE[-1]
    if constants.replay:
        return (x * constants.fix(module, x) + bias).to(output.dtype)
    factor = norms.inverse_scale(module, x.detach())
    gain = norms.gain(module)
    if gain is not None:
        factor = factor * gain
    out = output.detach()
    if not torch.allclose((x.detach() * factor + bias), out.float(), rtol=1e-3, atol=1e-3 * float(out.abs().max()) + 1e-6):
        raise SaescopeError(f"cannot freeze the scale of {type(module).__name__}: its output is not the normalised "
                            "input times its weight, so the local replacement model would be wrong")
    constants.fix(module, factor)
    return out + ((x - x.detach()) * factor).to(output.dtype)


def _detach_inputs(_module, args, kwargs):
    return tuple(a.detach() if torch.is_tensor(a) else a for a in args), {
        k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}


@contextlib.contextmanager
def frozen(lm: LanguageModel, constants: Constants | None = None, attention_only: bool = False):
    """The model with attention patterns and norm scales frozen and MLPs cut from their inputs, and
    no parameter gradients; restored on exit. With `constants` recorded by an earlier forward
    (`Constants()` filled inside a first `frozen`), the patterns and scales are those, whatever
    the input: the prompt's linear model. `attention_only`: the patterns alone (interventions
    that keep where each token looks, the rest of the model live)."""
    model = lm.model
    constants = constants if constants is not None else Constants()
    before = model.config._attn_implementation
    grads = [p.requires_grad for p in model.parameters()]
    handles = []
    _ACTIVE.append(constants)
    try:
        model.set_attn_implementation(FROZEN)
        for p in model.parameters():
            p.requires_grad_(False)
        for module in () if attention_only else model.modules():
            if norms.norm_kind(module) is not None:
                handles.append(module.register_forward_hook(_freeze_norm))
        for block in () if attention_only else lm.layers:
            handles.append(_get(block, lm.block_map.ffn).register_forward_pre_hook(_detach_inputs, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.set_attn_implementation(before)
        _ACTIVE.pop()
        constants.replay = bool(constants.values)


class _Stop(Exception):
    pass


@dataclass
class Trace:
    """The forward pass of the prompt: per model layer, the MLP input (where a
    feature's encoder reads) and the MLP output leaf (where writes land), the token embeddings
    and the final normed residual (where logits read)."""

    mlp_in: dict[int, torch.Tensor]
    mlp_out: dict[int, torch.Tensor]
    embed: torch.Tensor
    final: torch.Tensor

    def gradients(self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor, n_layers: int,
                  retain: bool = True) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """One batched backward pass for targets b = 0…: each reads `vectors[b]` at model layer
        `layers[b]`'s MLP input (`n_layers`: the final residual, for logits), position
        `positions[b]`. Returns the gradients [targets, n, d] at every MLP output below the highest
        target and at the embeddings. The targets share the one forward: autograd runs the backward
        once per target, vectorised (is_grads_batched), not the model once per target."""
        top, b = int(layers.max()), len(layers)
        outputs, grads = [], []
        for layer in layers.unique().tolist():
            at = layers == layer
            where = self.final if layer == n_layers else self.mlp_in[layer]
            g = where.new_zeros(b, *where.shape)
            g[torch.nonzero(at).squeeze(1), 0, positions[at]] = vectors[at].to(g.dtype)
            outputs.append(where)
            grads.append(g)
        below = [layer for layer in sorted(self.mlp_out) if layer < top]
        got = torch.autograd.grad(outputs, [self.mlp_out[layer] for layer in below] + [self.embed], grads,
                                  retain_graph=retain, allow_unused=True, is_grads_batched=True)
        zero = self.embed.new_zeros(b, *self.embed.shape[1:])
        return ({layer: zero if g is None else g[:, 0] for layer, g in zip(below, got[:-1])},
                zero if got[-1] is None else got[-1][:, 0])


def trace(lm: LanguageModel, layers: Layers, ids: torch.Tensor, constants: Constants | None = None) -> Trace:
    """Run the local replacement model on ids [n] (a skip's x·A stays live); `constants`, when
    given, records its patterns and scales."""
    mlp_in, mlp_out, held = {}, {}, {}
    by_out = {lo: i for i, lo in enumerate(layers.layers_out)}

    def read_in(layer):
        def fn(v):
            mlp_in[layer] = v
        return fn

    def replace_out(layer):
        def fn(v):
            leaf = v.detach().requires_grad_(True)
            mlp_out[layer] = leaf
            i = by_out.get(layer)
            skip = layers.skip(i) if i is not None else None
            if skip is None:
                return leaf
            through = mlp_in[layers.layers_in[i]] @ skip.to(v.dtype)
            return leaf + through - through.detach()
        return fn

    def read_embed(_module, _args, out):
        held["embed"] = out.detach().requires_grad_(True)
        return held["embed"]

    def read_final(_module, args):
        held["final"] = args[0]
        raise _Stop

    model = lm.model
    with frozen(lm, constants):  # its norm hooks first: the sites below read the frozen values
        handles = [model.get_input_embeddings().register_forward_hook(read_embed),
                   model.get_output_embeddings().register_forward_pre_hook(read_final)]
        try:
            for layer in range(lm.n_layers):
                handles.append(_attach(lm, Site("mlp_in", layer), read_in(layer)))
                handles.append(_attach(lm, Site("mlp", layer), replace_out(layer)))
            with torch.enable_grad(), contextlib.suppress(_Stop):
                model(input_ids=ids.reshape(1, -1).to(lm.device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
    if "final" not in held:
        raise SaescopeError(f"{lm.name}: the output embedding was never reached; cannot read the final residual")
    return Trace(mlp_in, mlp_out, held["embed"], held["final"])
