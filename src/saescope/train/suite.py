"""The suite a training config asks for: one named record per SAE, in a fixed order that every
rank, checkpoint and metrics log agrees on."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import SAESpec, TrainConfig
from ..errors import SaescopeError
from ..sae.formats import width_label
from ..sae.multilayer import KINDS
from ..site import Site, layers_label


@dataclass(frozen=True)
class Planned:
    """One SAE of the suite, before it exists."""

    name: str
    spec: SAESpec
    site: str            # what it reads
    target: str          # what it reconstructs (the site itself, or mlp.L for a transcoder)
    width: int
    value: float         # λ, k or the target L0, by the spec's kind
    inputs: tuple[str, ...] = ()   # a multi-layer dictionary's sites (`site` is the first), in layer order
    outputs: tuple[str, ...] = ()  # and what each writes (`target` is the first)

    @property
    def arch(self) -> str:
        """What is trained: the spec's kind, or BatchTopK for a JumpReLU trained as one (saved as JumpReLU)."""
        return "batchtopk" if self.converted else self.spec.arch

    @property
    def converted(self) -> bool:
        return self.spec.train_as == "batchtopk"

    @property
    def controlled(self) -> bool:
        """Target-L0 mode: λ follows L0 to the target (the quadratic penalty has the target in the loss)."""
        return bool(self.spec.target_l0) and self.spec.sparsity != "quadratic" and not self.converted

    @property
    def target_l0(self) -> float | None:
        return float(self.value) if self.spec.target_l0 else None

    @property
    def coeff(self) -> float:
        """λ after warm-up: the value itself on a ladder, the first listed λ around a target (under
        the controller only its start); none for TopK and BatchTopK."""
        if self.arch not in ("jumprelu", "relu"):
            return 0.0
        return self.spec.lambdas[0] if self.spec.target_l0 else float(self.value)

    @property
    def k(self) -> int | None:
        return int(self.value) if self.arch in ("topk", "batchtopk") else None

    @property
    def multi(self) -> bool:
        return bool(self.inputs)

    @property
    def sites(self) -> frozenset[str]:
        return frozenset((self.site, self.target, *self.inputs, *self.outputs))


def member_name(spec: SAESpec, site: str, width: int, value: float | int) -> str:
    suffix = {"clt": "-clt", "crosscoder": "-xc"}.get(spec.multi_layer, "-tc" if spec.transcoder else "")
    kind = spec.arch + suffix
    if spec.arch in ("topk", "batchtopk"):
        tag = f"k{value}"
    elif spec.target_l0:
        tag = f"l0_{value:g}"
    else:
        tag = f"lam{value:g}"
    options = [("skip", spec.skip), ("init", bool(spec.init_from)), ("logtheta", spec.arch == "jumprelu" and spec.theta_param == "log"),
               ("bzeros", spec.b_dec_init == "zeros"),
               (spec.sparsity, not spec.is_default("sparsity")),
               ("tok", spec.sparsity == "quadratic" and spec.quadratic_form == "token"),
               ("freq", spec.frequency_penalty > 0), ("mat", bool(spec.matryoshka)), ("aux", spec.dead_aux > 0),
               ("iste", spec.input_ste), (spec.threshold_init[0] + "init", not spec.is_default("threshold_init")),
               (f"cap{spec.norm_cap:g}", not spec.is_default("norm_cap")), ("btk", spec.train_as == "batchtopk")]
    return f"{site}-{kind}-{width_label(width)}-{tag}" + "".join(f"-{o}" for o, on in options if on)


def expand(cfg: TrainConfig) -> list[Planned]:
    """Every site × width × (λ, k or target L0) of every `[[saes]]` entry."""
    out = []
    for spec in cfg.saes:
        values = spec.ks if spec.arch in ("topk", "batchtopk") else (spec.target_l0 or spec.lambdas)
        if spec.target_l0 and spec.arch != "jumprelu":
            raise SaescopeError(f"target_l0 is for jumprelu SAEs; {spec.arch} sets sparsity with ks or lambdas")
        if spec.multi_layer:
            inputs = tuple(spec.sites)
            outputs = tuple(str(Site(KINDS[spec.multi_layer][1], Site.parse(s).layer)) for s in inputs)
            for width in spec.widths:
                for value in values:
                    out.append(Planned(member_name(spec, layers_label(inputs), width, value), spec, inputs[0], outputs[0],
                                       width, value, inputs, outputs))
            continue
        for site in spec.sites:
            target = site
            if spec.transcoder:
                target = str(Site.parse(site).transcoder_target())
            for width in spec.widths:
                for value in values:
                    out.append(Planned(member_name(spec, site, width, value), spec, site, target, width, value))
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise SaescopeError("the suite lists the same SAE twice: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    return out


def sites_read(plan: list[Planned]) -> list[str]:
    """The input and target sites a part of the suite reads."""
    return sorted(set().union(*(p.sites for p in plan)))
