"""BatchTopK → JumpReLU (Gemma Scope 2 released its BatchTopK-trained dictionaries as JumpReLU):
one threshold per latent, from training activations, so that the dictionary ships in the
JumpReLU formats and encodes each token on its own (BatchTopK's cut depends on the batch).

Latent i gets the θ_i at which it fires on exactly as many of the given tokens as BatchTopK
kept it on (over the same batches): the midpoint between its n_i-th and (n_i + 1)-th largest
pre-activation. Each latent's firing frequency is therefore reproduced exactly; an individual
token's code can differ only where BatchTopK's cut for that batch fell between the two. The
peers' conversions use one threshold shared by every latent (SAELens, dictionary_learning)."""

from __future__ import annotations

import torch

from dataclasses import replace

from .base import SAEConfig
from .jumprelu import JumpReLUSAE
from .multilayer import MultiLayerDictionary
from .topk import BatchTopKSAE


TOP_ELEMENTS = 2**25  # the largest-values buffer's size (128 MiB in float32)


def _midpoints(top: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """θ per column of `top` (its largest values, descending): halfway between the n-th and
    (n + 1)-th largest, n = kept; a latent never kept sits at its largest, so it never fires."""
    top = torch.cat([top, top[-1:] - 1.0])  # a latent kept on every row: pad below its smallest value
    n = kept.clamp_max(top.shape[0] - 1)  # columns kept more often than `top` holds are the caller's
    above = top.gather(0, (n - 1).clamp_min(0)[None]).squeeze(0)
    below = top.gather(0, n[None]).squeeze(0)
    return torch.where(kept > 0, (above + below) / 2, top[0])


@torch.no_grad()
def batchtopk_to_jumprelu(sae: BatchTopKSAE, x: torch.Tensor, batch_size: int = 4096) -> JumpReLUSAE:
    """A JumpReLU SAE with `sae`'s weights and per-latent thresholds from raw activations x
    [N, d_in] (training activations, taken in batches of `batch_size` as in training)."""
    if sae.cfg.arch != "batchtopk":
        raise ValueError(f"batchtopk_to_jumprelu converts BatchTopK SAEs, not {sae.cfg.arch}")
    chunks = [x[i:i + batch_size] for i in range(0, len(x), batch_size)]

    def pre_acts(chunk):
        return sae.pre_acts(chunk.to(sae.W_enc.device).float() / sae.norm_scalar)

    kept = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.W_enc.device)
    for chunk in chunks:  # how often BatchTopK keeps each latent
        pre = pre_acts(chunk).relu()
        n = min(sae.cfg.k * pre.shape[0], pre.numel())
        vals, idx = pre.reshape(-1).topk(n)
        kept += torch.bincount(idx[vals > 0] % sae.cfg.d_sae, minlength=sae.cfg.d_sae)
    # each latent's `depth` largest pre-activations, [depth, m], with depth bounded so that the
    # buffer stays small at any width; the few latents kept more often keep all their values
    depth = min(int(kept.max()) + 1, max(2, TOP_ELEMENTS // sae.cfg.d_sae))
    deep = (kept >= depth).nonzero().squeeze(1)
    top, columns = None, []
    for chunk in chunks:
        pre = pre_acts(chunk)
        columns.append(pre[:, deep])
        both = pre if top is None else torch.cat([top, pre])
        top = both.topk(min(depth, both.shape[0]), dim=0).values
    theta = _midpoints(top, kept)
    if deep.numel():
        theta[deep] = _midpoints(torch.cat(columns).sort(dim=0, descending=True).values, kept[deep])
    out = JumpReLUSAE(SAEConfig(**{**sae.cfg.to_dict(), "arch": "jumprelu", "k": None}))
    out = out.to(sae.W_enc.device)
    for name in ("W_enc", "W_dec", "b_enc", "b_dec", "norm_scalar", "pre_encoder_bias") + (("W_skip",) if sae.cfg.skip else ()):
        getattr(out, name).copy_(getattr(sae, name))
    out.set_threshold(theta.clamp_min(torch.finfo(theta.dtype).tiny))
    out.cfg.extra = {**sae.cfg.extra, "converted_from": {"arch": "batchtopk", "k": sae.cfg.k, "tokens": len(x)}}
    return out


@torch.no_grad()
def fit_groups(d: MultiLayerDictionary, xs: list[torch.Tensor], *, convert: bool, batch_size: int = 4096) -> MultiLayerDictionary:
    """A BatchTopK multi-layer dictionary's inference thresholds from raw inputs xs (one per input
    site): each group's shared cut (`fit_threshold`), or with `convert` each group converted to
    JumpReLU as above (each group's BatchTopK kept k·batch of its own layer's entries)."""
    xs = [x.to(d.scale_in.device).float() / c for x, c in zip(xs, d.scale_in.tolist())]
    if not convert:
        for g, x in zip(d.groups, xs):
            g.fit_threshold(x)
        return d
    out = MultiLayerDictionary(replace(d.cfg, arch="jumprelu", k=None)).to(d.scale_in.device)
    out.load_state_dict({k: v for k, v in d.state_dict().items() if "shared_threshold" not in k}, strict=False)
    for i, (g, x) in enumerate(zip(d.groups, xs)):
        converted = batchtopk_to_jumprelu(g, x, batch_size=batch_size)
        out.groups[i].set_threshold(converted.threshold)
    out.cfg.extra = {**d.cfg.extra, "converted_from": {"arch": "batchtopk", "k": d.cfg.k, "tokens": len(xs[0])}}
    return out
