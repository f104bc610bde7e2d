"""Site values (SPEC §1): a kind and a layer, with short and TransformerLens names. Pure values,
shared by the model side and the SAE side."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable

from .errors import SaescopeError

KINDS = ("resid", "attn", "mlp", "mlp_in", "ln2", "resid_mid")
# TransformerLens hook names for the same points. `mlp_in` is the pre-MLP norm's output after its
# learned scale: TransformerLens (fold_ln off) and circuit-tracer call the MLP's input mlp.hook_in.
# `ln2` is that norm's input normalised before the scale (ln2.hook_normalized); TransformerLens's
# hook_mlp_in is the residual stream before the norm, our resid_mid.
_TL_NAMES = {
    "hook_resid_post": "resid",
    "attn.hook_z": "attn",
    "hook_mlp_out": "mlp",
    "mlp.hook_in": "mlp_in",
    "ln2.hook_normalized": "ln2",
    "hook_resid_mid": "resid_mid",
}
_TL_PARSED = {**_TL_NAMES, "hook_mlp_in": "resid_mid"}  # names parsed; the first of a kind is the one written
# what a transcoder may read: the MLP's input after the norm's scale (Gemma Scope 2) or before it (1)
TRANSCODER_INPUTS = ("mlp_in", "ln2")
# Gemma 2 / Gemma 3 module paths for the same points (SPEC §7's table; Gemma Scope 2's config.json
# names its sites so): what a module's output (or, for attn, o_proj's input) holds
_HF_POINTS = {
    "resid": "output",
    "attn": "self_attn.o_proj.input",
    "mlp": "post_feedforward_layernorm.output",
    "mlp_in": "pre_feedforward_layernorm.output",
    "resid_mid": "pre_feedforward_layernorm.input",
}  # ln2 (before the norm's scale) is no module's input or output
_HF = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?P<point>.+)$")
_SHORT = re.compile(r"^(?P<kind>[a-z][a-z_0-9]*)\.(?P<layer>-?\d+)$")
_TL = re.compile(r"^blocks\.(?P<layer>\d+)\.(?P<hook>.+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A point in the model: `kind` in KINDS (SPEC §1 and §7's table), at decoder block `layer`."""

    kind: str
    layer: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise SaescopeError(f"unknown site kind {self.kind!r}; available: {', '.join(KINDS)}")
        if not isinstance(self.layer, int) or self.layer < 0:
            raise SaescopeError(f"site layer must be a non-negative integer, got {self.layer!r}")

    @classmethod
    def parse(cls, value: "str | Site") -> "Site":
        """Accept `resid.6` or TransformerLens names like `blocks.6.attn.hook_z`."""
        if isinstance(value, Site):
            return value
        text = str(value).strip()
        if m := _SHORT.match(text):
            return cls(m["kind"], int(m["layer"]))
        if (m := _TL.match(text)) and m["hook"] in _TL_PARSED:
            return cls(_TL_PARSED[m["hook"]], int(m["layer"]))
        raise SaescopeError(
            f"unknown site {text!r}; use KIND.LAYER with KIND in {', '.join(KINDS)} (e.g. resid.6), "
            f"or blocks.L.{{{', '.join(_TL_NAMES)}}}")

    def __str__(self) -> str:
        return f"{self.kind}.{self.layer}"

    @property
    def tl_name(self) -> str:
        hook = next(h for h, k in _TL_NAMES.items() if k == self.kind)
        return f"blocks.{self.layer}.{hook}"

    @property
    def hf_point(self) -> str:
        """The Gemma 2 / 3 module path of this point, as Gemma Scope 2's files name it."""
        if self.kind not in _HF_POINTS:
            raise SaescopeError(f"site {self} is no module's input or output, so Gemma Scope 2's files cannot name it")
        return f"model.layers.{self.layer}.{_HF_POINTS[self.kind]}"

    @classmethod
    def from_hf_point(cls, text: str) -> "Site | None":
        """The site a Gemma Scope 2 hook point names, or None for a point we have no site for."""
        m = _HF.match(text or "")
        kind = next((k for k, point in _HF_POINTS.items() if m and point == m["point"]), None)
        return cls(kind, int(m["layer"])) if kind else None

    def check(self, lm) -> "Site":
        """Self, if `lm` (a LanguageModel) has this layer."""
        if self.layer >= lm.n_layers:
            raise SaescopeError(f"site {self}: layer {self.layer} out of range; {lm.name} has layers 0..{lm.n_layers - 1}")
        return self

    def width(self, lm) -> int:
        return lm.attn_width if self.kind == "attn" else lm.d_model

    def transcoder_target(self) -> "Site":
        """What a transcoder reading this site predicts: the MLP's output at its layer."""
        if self.kind not in TRANSCODER_INPUTS:
            raise SaescopeError(f"a transcoder reads mlp_in.L or ln2.L, not {self}")
        return Site("mlp", self.layer)


def parse_sites(sites: "str | Site | Iterable[str | Site]") -> list[Site]:
    """A comma-separated string or a list of sites, parsed and de-duplicated in order."""
    if isinstance(sites, (str, Site)):
        sites = [s for s in str(sites).split(",") if s.strip()] if isinstance(sites, str) else [sites]
    try:
        sites = list(sites)
    except TypeError:
        sites = None
    if sites is None or not all(isinstance(s, (str, Site)) for s in sites):
        raise SaescopeError(f"sites must be a comma-separated string or a list of site names, got {sites!r}")
    out = []
    for s in sites:
        site = Site.parse(s)
        if site not in out:
            out.append(site)
    if not out:
        raise SaescopeError("no sites given")
    return out


def layers_label(sites: tuple[str, ...]) -> str:
    """Sites of one kind as a name: mlp_in.0-17 for a run of layers, resid.5_9_12_15 otherwise."""
    parsed = [Site.parse(s) for s in sites]
    layers = [s.layer for s in parsed]
    if len(layers) > 2 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{parsed[0].kind}.{layers[0]}-{layers[-1]}"
    return f"{parsed[0].kind}." + "_".join(map(str, layers))
