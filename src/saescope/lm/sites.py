"""Sites (SPEC §1), reading many of them in one forward stopped after the deepest layer, and
splicing a function into one of them."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..errors import SaescopeError
from ..site import KINDS, Site, parse_sites
from . import norms
from .model import LanguageModel, _get

def available_sites(lm: LanguageModel) -> list[str]:
    kinds = [k for k in KINDS if k != "resid_mid" or not lm.parallel_residual]
    return [str(Site(k, layer)) for layer in range(lm.n_layers) for k in kinds]


def _attach(lm: LanguageModel, site: Site, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Call `fn` on the value at `site`; a tensor it returns replaces that value in the forward.
    Returns a handle whose remove() detaches it."""
    block = lm.layers[site.layer]
    if site.kind == "attn":
        def pre_hook(_module, args, kwargs):
            positional = len(args) > 0
            value = args[0] if positional else kwargs["input"]
            new = fn(value)
            if new is None:
                return None
            if positional:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "input": new}

        return _get(block, lm.block_map.attn).register_forward_pre_hook(pre_hook, with_kwargs=True)
    if site.kind == "resid_mid":
        return _attach_resid_mid(lm, site, fn)
    if site.kind == "ln2":
        norm = _get(block, lm.block_map.mlp_in)

        def ln2_hook(module, args, output):
            value = norms.normalised(module, args[0])
            new = fn(value.to(output.dtype))
            if new is None:
                return None
            gain = norms.gain(module)
            delta = new.float() - value
            return output + (delta * gain if gain is not None else delta).to(output.dtype)

        return norm.register_forward_hook(ln2_hook)

    module = block if site.kind == "resid" else _get(block, getattr(lm.block_map, site.kind))
    return module.register_forward_hook(_output_hook(fn))


def _output_hook(fn):
    def hook(_module, _args, output):
        is_tuple = isinstance(output, tuple)  # transformers 4.x blocks return tuples, 5.x tensors
        new = fn(output[0] if is_tuple else output)
        if new is None:
            return None
        return (new, *output[1:]) if is_tuple else new

    return hook


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for h in self.handles:
            h.remove()


def _attach_resid_mid(lm: LanguageModel, site: Site, fn):
    """The residual stream between the sublayers is the pre-MLP norm's input; a replaced value must
    also reach the residual add after the MLP, so the block's output moves by the same change."""
    if lm.parallel_residual:
        raise SaescopeError(f"site {site}: {lm.name} adds attention and MLP to the residual in parallel, so it has "
                            "no residual stream between them")
    change: list[torch.Tensor] = []

    def pre_hook(_module, args):
        new = fn(args[0])
        if new is None:
            return None
        change.append(new - args[0])
        return (new, *args[1:])

    def add_change(value: torch.Tensor) -> torch.Tensor | None:
        return value + change.pop() if change else None

    block = lm.layers[site.layer]
    return _Handles(_get(block, lm.block_map.mlp_in).register_forward_pre_hook(pre_hook),
                    block.register_forward_hook(_output_hook(add_change)))


class _StopForward(Exception):
    pass


def _raise_stop(*_):
    raise _StopForward


def capture(lm, input_ids: torch.Tensor, sites, *, attention_mask: torch.Tensor | None = None,
            stop: bool = True) -> dict[str, torch.Tensor]:
    """Read every site in one forward pass, stopped after the deepest requested layer (no logits).

    Returns {canonical site string ("resid.6"): tensor [batch, seq, width]} on the model's device."""
    from .loading import load_model

    lm = load_model(lm)
    parsed = [s.check(lm) for s in parse_sites(sites)]
    input_ids = _as_ids(input_ids, lm)
    out: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for site in parsed:
            handles.append(_attach(lm, site, lambda v, key=str(site): out.__setitem__(key, v.detach())))
        if stop:
            handles.append(lm.layers[max(s.layer for s in parsed)].register_forward_hook(_raise_stop))
        with torch.no_grad(), contextlib.suppress(_StopForward):
            lm.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {str(s): out[str(s)] for s in parsed}


def forward_until(lm: LanguageModel, input_ids: torch.Tensor, layer: int) -> None:
    """The bare model forward through block `layer` and no further (the harvest's speed reference)."""
    handle = lm.layers[layer].register_forward_hook(_raise_stop)
    try:
        with torch.no_grad(), contextlib.suppress(_StopForward):
            lm.model(input_ids=_as_ids(input_ids, lm), use_cache=False)
    finally:
        handle.remove()


@contextlib.contextmanager
def splice(lm, site, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Inside the block, every forward of `lm` has the value at `site` replaced by `fn(value)`."""
    from .loading import load_model

    lm = load_model(lm)
    site = Site.parse(site).check(lm)

    def replace(value: torch.Tensor) -> torch.Tensor:
        new = fn(value)
        if not isinstance(new, torch.Tensor) or new.shape != value.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise SaescopeError(f"splice at {site}: function returned {got}, expected shape {tuple(value.shape)}")
        return new.to(value.dtype)

    handle = _attach(lm, site, replace)
    try:
        yield lm
    finally:
        handle.remove()


@contextlib.contextmanager
def block_outputs(lm: LanguageModel, layers: int):
    """Inside, each forward's outputs of blocks 0…layers−1 are recorded into the list yielded (what
    `skipping` replays)."""
    outputs: list = [None] * layers
    handles = [lm.layers[i].register_forward_hook(lambda _m, _a, out, i=i: outputs.__setitem__(i, out))
               for i in range(layers)]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def skipping(lm: LanguageModel, outputs: list):
    """Inside, a forward of the same token ids skips blocks 0…len(outputs)−1: each returns its
    recorded output. A value spliced at layer L then costs blocks L… and the head, not the whole
    model: nothing before block L depends on it."""
    blocks = list(lm.layers[:len(outputs)])
    own = [block.__dict__.get("forward") for block in blocks]  # e.g. accelerate's offloading wrapper
    for block, out in zip(blocks, outputs):
        block.forward = lambda *_a, _out=out, **_k: _out  # the instance's: its hooks and attributes stay
    try:
        yield lm
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def _as_ids(input_ids, lm: LanguageModel) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise SaescopeError(f"input_ids must be an integer tensor [batch, seq], got {ids.dtype} {tuple(ids.shape)}")
    return ids.to(lm.device, torch.long)
