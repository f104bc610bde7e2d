"""Multi-layer dictionaries (SPEC §8): cross-layer transcoders (CLTs) and weakly causal
crosscoders, as one structure. Latents come in groups, one per input site; group i reads input
site i and writes output sites i, i+1, …, n−1. A CLT reads `mlp_in.l` and writes `mlp.l` onwards;
a crosscoder reads and writes the same residual sites. Causality is structural: group i holds
decoder blocks for outputs i… only, so no parameter exists that could write an earlier layer.

Each site is normalised on its own (a scalar per input and per output site, as single-layer SAEs
have one); `fold()` moves them into the weights. Codes are those of the normalised inputs, so they
are the same before and after folding."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..errors import SaescopeError
from ..site import Site

KINDS = {"clt": ("mlp_in", "mlp"), "crosscoder": ("resid", "resid")}


@dataclass
class MultiLayerConfig:
    """Shape, kind and provenance of one multi-layer dictionary."""

    kind: str                          # "clt" | "crosscoder"
    sites_in: list[str]                # one per latent group, in layer order
    sites_out: list[str]               # group i writes sites_out[i:]
    d_in: int = 0
    d_out: int = 0
    d_sae: int = 0                     # latents per group
    model: str | None = None
    bandwidth: float = 0.001           # ε of the JumpReLU rectangle kernel
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SaescopeError(f"unknown multi-layer dictionary kind '{self.kind}'; available: {', '.join(KINDS)}")
        self.sites_in, self.sites_out = [str(Site.parse(s)) for s in self.sites_in], [str(Site.parse(s)) for s in self.sites_out]
        if not self.sites_in or len(self.sites_in) != len(self.sites_out):
            raise SaescopeError(f"a {self.kind} needs one output site per input site, got {len(self.sites_in)} and "
                                f"{len(self.sites_out)}")
        kind_in, kind_out = KINDS[self.kind]
        ins, outs = [Site.parse(s) for s in self.sites_in], [Site.parse(s) for s in self.sites_out]
        if any(s.kind != kind_in for s in ins) or any(s.kind != kind_out for s in outs):
            raise SaescopeError(f"a {self.kind} reads {kind_in}.L and writes {kind_out}.L, got "
                                f"{', '.join(self.sites_in)} → {', '.join(self.sites_out)}")
        if [s.layer for s in ins] != [s.layer for s in outs]:
            raise SaescopeError(f"a {self.kind}'s group i reads and writes the same layer, got "
                                f"{', '.join(self.sites_in)} → {', '.join(self.sites_out)}")
        layers = [s.layer for s in ins]
        if layers != sorted(set(layers)):
            raise SaescopeError(f"a {self.kind}'s sites must be distinct layers in increasing order, got {', '.join(self.sites_in)}")
        if min(self.d_in, self.d_out, self.d_sae) <= 0:
            raise SaescopeError(f"a {self.kind} needs positive d_in, d_out and d_sae, got {self.d_in}, {self.d_out}, {self.d_sae}")

    @property
    def n_layers(self) -> int:
        return len(self.sites_in)

    def to_dict(self) -> dict:
        return asdict(self)


class MultiLayerDictionary(nn.Module):
    """JumpReLU latents in groups: W_enc [n, d_in, m], b_enc and θ [n, m], W_dec a list whose
    block i is [m, n − i, d_out] (group i's writes to outputs i…n−1), b_dec [n, d_out]."""

    def __init__(self, cfg: MultiLayerConfig):
        super().__init__()
        self.cfg = cfg
        n, m = cfg.n_layers, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(n, cfg.d_in, m))
        self.b_enc = nn.Parameter(torch.zeros(n, m))
        self.theta = nn.Parameter(torch.full((n, m), 0.001))
        self.W_dec = nn.ParameterList([nn.Parameter(torch.zeros(m, n - i, cfg.d_out)) for i in range(n)])
        self.b_dec = nn.Parameter(torch.zeros(n, cfg.d_out))
        self.register_buffer("scale_in", torch.ones(n))    # C of each input site: group i sees x_i / C_i
        self.register_buffer("scale_out", torch.ones(n))   # C of each output site: ŷ_j is C_j × the decode

    @property
    def folded(self) -> bool:
        return bool((self.scale_in == 1).all() and (self.scale_out == 1).all())

    def _inputs(self, acts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        missing = [s for s in self.cfg.sites_in if s not in acts]
        if missing:
            raise SaescopeError(f"this {self.cfg.kind} reads {', '.join(self.cfg.sites_in)}; missing {', '.join(missing)}")
        return [acts[s] for s in self.cfg.sites_in]

    def encode(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each input site's latent activations, {site_in: [..., m]} from raw activations {site: [..., d_in]}."""
        out = {}
        for i, x in enumerate(self._inputs(acts)):
            pre = (x / self.scale_in[i]) @ self.W_enc[i] + self.b_enc[i]
            out[self.cfg.sites_in[i]] = pre * (pre > self.theta[i]).to(pre.dtype)
        return out

    def decode(self, codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each output site's raw reconstruction {site_out: [..., d_out]}: output j sums the writes of
        groups 0…j, so a latent never reaches a site before its own."""
        f = [codes[s] for s in self.cfg.sites_in]
        out = {}
        for j, site in enumerate(self.cfg.sites_out):
            y = self.b_dec[j]
            for i in range(j + 1):
                y = y + f[i] @ self.W_dec[i][:, j - i]
            out[site] = y * self.scale_out[j]
        return out

    def forward(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(acts))

    @torch.no_grad()
    def fold(self) -> "MultiLayerDictionary":
        """A copy in the released form (raw activations in, scales 1) with identical outputs and codes."""
        out = copy.deepcopy(self)
        out.W_enc.div_(self.scale_in[:, None, None])
        for i, block in enumerate(out.W_dec):
            block.mul_(self.scale_out[i:][None, :, None])
        out.b_dec.mul_(self.scale_out[:, None])
        out.scale_in.fill_(1.0)
        out.scale_out.fill_(1.0)
        out.cfg = replace(self.cfg)
        return out

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.kind}, {c.n_layers} layers ({c.sites_in[0]} … {c.sites_in[-1]}), d_sae={c.d_sae} per layer"
