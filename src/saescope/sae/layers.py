"""A dictionary seen as layers of a replacement model: a cross-layer transcoder, a crosscoder, or
a set of per-layer transcoders, each as "group i reads input i and writes outputs i, i+1, …".

The replacement evaluation and circuit tracing both walk a model layer by layer and need, at each
input, the codes and their writes to this and later outputs; attribution also needs each latent's
encoder and decoder vectors. The dictionaries are held folded (raw activations in and out, no
normalisation scalar), so those vectors are plain rows and columns of the weights."""

from __future__ import annotations

import torch

from ..errors import SaescopeError
from ..site import Site
from .base import SparseAutoencoder
from .multilayer import MultiLayerDictionary


class Layers:
    """Group i: `code(i, x)`, its `writes(i, f)` to outputs ({index: raw [..., d]}), each output's
    `bias(j)`; `encoder(i)` [d_in, F] and `encoder_bias(i)` (a latent's pre-activation is
    x·encoder + encoder_bias), `decoder(i)` [F, n_out, d] (outputs i, i+1, …), `skip(i)`."""

    def __init__(self, d: MultiLayerDictionary | list[SparseAutoencoder]):
        if isinstance(d, MultiLayerDictionary):
            self.d = d.fold()
            self.sites_in, self.sites_out, self.width = d.cfg.sites_in, d.cfg.sites_out, d.cfg.d_sae
            self.kind = d.cfg.kind
        else:
            if not d:
                raise SaescopeError("no transcoders given")
            self.d = [sae.fold() for sae in sorted(d, key=lambda sae: Site.parse(sae.cfg.site).layer)]
            self.sites_in = [s.cfg.site for s in self.d]
            self.sites_out = [s.cfg.target_site or s.cfg.site for s in self.d]
            self.width = max(s.cfg.d_sae for s in self.d)
            self.kind = "transcoders"
        self.layers_in = [Site.parse(s).layer for s in self.sites_in]
        self.layers_out = [Site.parse(s).layer for s in self.sites_out]

    @property
    def multi(self) -> bool:
        return isinstance(self.d, MultiLayerDictionary)

    def code(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self.d.encode_group(i, x) if self.multi else self.d[i].encode(x)

    def writes(self, i: int, f: torch.Tensor, x: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Group i's raw writes from codes f; with its input x, a skip transcoder's x·A is added to
        its own output (the dictionary's whole output there, less the bias)."""
        if self.multi:
            w = self.d.writes(i, f)
            return {i + k: w[..., k, :] for k in range(w.shape[-2])}
        sae = self.d[i]
        return {i: f @ sae.W_dec + (0.0 if x is None else sae.skip_output(x))}

    def code_and_writes(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        f = self.code(i, x)
        return f, self.writes(i, f, x)

    def bias(self, j: int) -> torch.Tensor | float:
        return self.d.output_bias()[j] if self.multi else self.d[j].b_dec

    def encoder(self, i: int) -> torch.Tensor:
        return self.d.groups[i].W_enc if self.multi else self.d[i].W_enc

    def encoder_bias(self, i: int) -> torch.Tensor:
        return self.d.groups[i].b_enc if self.multi else self.d[i].b_enc

    def decoder(self, i: int) -> torch.Tensor:
        return self.d.W_dec[i] if self.multi else self.d[i].W_dec[:, None, :]

    def skip(self, i: int) -> torch.Tensor | None:
        """Group i's skip matrix A (x·A, d_in × d_out) onto its own output, or None."""
        if self.multi:
            return None
        return self.d[i].W_skip if self.d[i].cfg.skip else None
