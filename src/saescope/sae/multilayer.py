"""Multi-layer dictionaries (SPEC §8): cross-layer transcoders (CLTs) and weakly causal
crosscoders, as one structure. Latents come in groups, one per input site; group i reads input
site i and writes output sites i, i+1, …, n−1. A CLT reads `mlp_in.l` and writes `mlp.l` onwards;
a crosscoder reads and writes the same residual sites. Causality is structural: group i holds
decoder blocks for outputs i… only, so no parameter exists that could write an earlier layer.

Group i is a single-layer dictionary of its own (a JumpReLU, TopK or BatchTopK transcoder from
input i to the concatenation of outputs i…), so encoding, the fast training paths (a sparse code
decodes only its fired latents' rows, fast.py) and the decoder-norm step are theirs: a latent's
decoder row is its writes to every later layer together, unit-norm as one vector. The groups are
coupled only by the sum each output takes of their writes, and by one b_dec per output.

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
from . import build_sae
from .base import SAEConfig, SparseAutoencoder
from .fast import Workspace
from .objectives import Objective, capped_rows, row_errors

KINDS = {"clt": ("mlp_in", "mlp"), "crosscoder": ("resid", "resid")}
GROUP_ARCHS = ("jumprelu", "topk", "batchtopk")


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
    arch: str = "jumprelu"             # each group's: jumprelu (the released form), topk or batchtopk
    k: int | None = None               # topk / batchtopk: latents per token in each group
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
        if self.arch not in GROUP_ARCHS:
            raise SaescopeError(f"a {self.kind}'s latents are one of {', '.join(GROUP_ARCHS)}, not '{self.arch}'")
        if min(self.d_in, self.d_out, self.d_sae) <= 0:
            raise SaescopeError(f"a {self.kind} needs positive d_in, d_out and d_sae, got {self.d_in}, {self.d_out}, {self.d_sae}")

    @property
    def n_layers(self) -> int:
        return len(self.sites_in)

    def to_dict(self) -> dict:
        return asdict(self)

    def group(self, i: int) -> SAEConfig:
        """Group i as a single-layer dictionary: site_in[i] → the concatenation of sites_out[i:]."""
        return SAEConfig(arch=self.arch, d_in=self.d_in, d_sae=self.d_sae, d_out=(self.n_layers - i) * self.d_out,
                         site=self.sites_in[i], target_site=self.sites_out[i], model=self.model, k=self.k,
                         bandwidth=self.bandwidth)


class MultiLayerDictionary(nn.Module):
    """`groups[i]`: group i's latents (W_enc [d_in, m], W_dec [m, (n − i)·d_out]: its writes to
    outputs i…n−1, side by side), with its own b_dec held at zero; outputs share `b_dec` [n, d_out].
    The stacked views `W_enc` [n, d_in, m], `b_enc`, `theta` [n, m] and `W_dec` (block i
    [m, n − i, d_out]) are Gemma Scope 2's layout."""

    def __init__(self, cfg: MultiLayerConfig):
        super().__init__()
        self.cfg = cfg
        self.groups = nn.ModuleList([build_sae(cfg.group(i)) for i in range(cfg.n_layers)])
        for g in self.groups:
            g.b_dec.requires_grad_(False)
            # AuxK revives a dead latent on its own layer's residual: through its whole row (every
            # later layer) a CLT's k_aux = d/2 entries a token would cost more than the step
            g.aux_columns = cfg.d_out
        self.b_dec = nn.Parameter(torch.zeros(cfg.n_layers, cfg.d_out))
        self.register_buffer("scale_in", torch.ones(cfg.n_layers))    # C of each input site: group i sees x_i / C_i
        self.register_buffer("scale_out", torch.ones(cfg.n_layers))   # C of each output site: ŷ_j is C_j × the decode
        self.shard = None  # while training with its latents split over ranks: a train.distributed.LatentShard

    # --- Gemma Scope 2's view of the weights -----------------------------------------------------
    @property
    def W_enc(self) -> torch.Tensor:
        return torch.stack([g.W_enc for g in self.groups])

    @property
    def b_enc(self) -> torch.Tensor:
        return torch.stack([g.b_enc for g in self.groups])

    @property
    def theta(self) -> torch.Tensor:
        return torch.stack([g.threshold for g in self.groups])

    @property
    def W_dec(self) -> list[torch.Tensor]:
        return [g.W_dec.view(self.cfg.d_sae, -1, self.cfg.d_out) for g in self.groups]

    @torch.no_grad()
    def set_group(self, i: int, *, w_enc: torch.Tensor, b_enc: torch.Tensor, w_dec: torch.Tensor,
                  threshold: torch.Tensor | None = None) -> None:
        """Group i's weights from Gemma Scope 2's layout (w_dec [m, n − i, d_out])."""
        g = self.groups[i]
        g.W_enc.copy_(w_enc)
        g.b_enc.copy_(b_enc)
        g.W_dec.copy_(w_dec.reshape(g.W_dec.shape))
        if threshold is not None:
            g.set_threshold(threshold)

    @property
    def folded(self) -> bool:
        return bool((self.scale_in == 1).all() and (self.scale_out == 1).all())

    def _inputs(self, acts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        missing = [s for s in self.cfg.sites_in if s not in acts]
        if missing:
            raise SaescopeError(f"this {self.cfg.kind} reads {', '.join(self.cfg.sites_in)}; missing {', '.join(missing)}")
        return [acts[s] for s in self.cfg.sites_in]

    # --- inference -----------------------------------------------------------------------------
    def encode(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each input site's latent activations, {site_in: [..., m]} from raw activations {site: [..., d_in]}."""
        return {s: self.encode_group(i, x) for i, (s, x) in enumerate(zip(self.cfg.sites_in, self._inputs(acts)))}

    def encode_group(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """Group i's latent activations [..., m] from raw input site i's activations."""
        g = self.groups[i]
        return g._activate(g.pre_acts(x.to(g.W_enc.dtype) / self.scale_in[i]))

    def writes(self, i: int, f: torch.Tensor) -> torch.Tensor:
        """Group i's raw writes [..., n − i, d_out] to outputs i…n−1, from its codes f [..., m]."""
        return (f @ self.groups[i].W_dec).unflatten(-1, (self.cfg.n_layers - i, -1)) * self.scale_out[i:, None]

    def output_bias(self) -> torch.Tensor:
        """Each output's raw bias [n, d_out]: what it holds when no latent fires."""
        return self.b_dec * self.scale_out[:, None]

    def decode(self, codes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each output site's raw reconstruction {site_out: [..., d_out]}: output j sums the writes of
        groups 0…j, so a latent never reaches a site before its own."""
        f = codes[self.cfg.sites_in[0]]
        y = self.output_bias().expand(*f.shape[:-1], self.cfg.n_layers, self.cfg.d_out)
        for i, site in enumerate(self.cfg.sites_in):
            y = y + nn.functional.pad(self.writes(i, codes[site]), (0, 0, i, 0))
        return {site: y[..., j, :] for j, site in enumerate(self.cfg.sites_out)}

    def forward(self, acts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(acts))

    # --- training ------------------------------------------------------------------------------
    def set_objective(self, objective: Objective) -> None:
        """Every group trains under `objective` (a target L0 is each layer's)."""
        for g in self.groups:
            g.objective = objective

    def training_loss(self, xs: list[torch.Tensor], ys: list[torch.Tensor], sparsity_coeff, dead: torch.Tensor | None = None,
                      path: str = "auto", variances: list[torch.Tensor] | None = None,
                      workspaces: list[Workspace] | None = None) -> dict[str, torch.Tensor]:
        """The loss on normalised inputs `xs` and targets `ys` (one per site, in order): every output's
        squared error, each over its own batch variance when `variances` are given (loss "fvu"),
        plus each group's sparsity cost and dead-latent loss (on its own output's residual),
        each over that output's variance. `dead` [n·m]; "fired" [n·m]; "l0" is the mean
        over groups (per layer), "mse" the sum over outputs. `workspaces`: one per group, lent as
        a single-layer step's (every group's graph is alive until the backward)."""
        n, batch = self.cfg.n_layers, xs[0].shape[0]
        var = variances or [xs[0].new_ones(())] * n
        workspaces = workspaces or [Workspace() for _ in self.groups]
        code = self._shard_code if self.shard is not None else (lambda g, x, d, p, w: g.training_code(x, d, p, w, None))
        codes = [code(g, x, None if dead is None else dead.view(n, -1)[i], path, w)
                 for i, (g, x, w) in enumerate(zip(self.groups, xs, workspaces))]
        writes = self.b_dec.new_zeros(batch, n, self.cfg.d_out)
        for i, (g, (enc, _)) in enumerate(zip(self.groups, codes)):
            writes[:, i:] += enc.decode(g.W_dec).view(batch, n - i, -1)
        y_hat = self.b_dec + (writes if self.shard is None else self.shard.summed(writes))
        loss, mse = 0.0, 0.0
        norm_cap = self.groups[0].objective.norm_cap
        for j, y in enumerate(ys):
            err = row_errors(y_hat[:, j], y)
            term = (err * capped_rows(y, norm_cap)).mean() if norm_cap else err.mean()
            loss, mse = loss + term / var[j], mse + err.mean().detach()
        touched, aux = [], []
        for i, (g, (enc, aux_fn)) in enumerate(zip(self.groups, codes)):
            reported = {}
            loss = loss + g.penalty(enc, sparsity_coeff, reported) / var[i]
            if aux_fn is not None:
                loss = loss + g.aux_term(aux_fn, ys[i] - y_hat[:, i].detach(), enc, reported) / var[i]
                aux.append(reported["aux"])
            touched.append(reported.get("touched", enc.fired))
        out = {"loss": loss, "mse": mse, "l0": torch.stack([enc.l0.detach() for enc, _ in codes]).mean(),
               "fired": torch.cat([enc.fired for enc, _ in codes]), "touched": torch.cat(touched)}
        return {**out, "aux": sum(aux)} if aux else out

    def encoder_weights(self) -> list[nn.Parameter]:
        return [g.W_enc for g in self.groups]

    def _shard_code(self, g: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None, path: str,
                    workspace: Workspace):
        """Group g's training code when its latents are split over ranks (`shard`), with its
        dead-latent loss: the same code as one process's. A JumpReLU's thresholds are per latent,
        so each rank codes its own slice; TopK and BatchTopK choose among every rank's latents,
        and AuxK among every rank's dead ones, on the gathered pre-activations, each rank then
        keeping its slice's entries. Firing counts and the decodes of the dead are summed over
        the ranks, so every loss term is the whole group's."""
        if path == "reference":
            raise SaescopeError("a dictionary whose latents are split over ranks trains on the fast paths; set kernels "
                                "to auto, dense or sparse")
        s, obj = self.shard, g.objective
        lo, hi = s.bounds(self.full_width)
        pre = g._fast_pre(x, workspace)
        aux = g.aux_weight > 0
        full = s.gather_latents(pre.detach()) if aux or g.cfg.arch != "jumprelu" else None
        aux_code = g._aux_code(full, s.gather_latents(dead)) if aux and dead is not None else None
        aux_code = aux_code.latents(lo, hi) if aux_code is not None else None
        if g.cfg.arch == "jumprelu":
            enc = g._threshold_encoded(x, g.threshold, path, workspace, pre)
        else:
            enc = g._sparse_encoded(x, g._choose(full).latents(lo, hi), None)
        enc.count = s.summed(enc.count)
        if obj.per_token:
            enc.tokens = s.summed(enc.tokens)
        return enc, (lambda residual: g._aux_loss(x, aux_code, residual, whole=s.summed)) if aux else None

    @property
    def full_width(self) -> int:
        """Latents per group over every rank (cfg.d_sae is this rank's slice when sharded)."""
        return self.cfg.d_sae * (self.shard.world if self.shard is not None else 1)

    @torch.no_grad()
    def sliced(self, shard) -> "MultiLayerDictionary":
        """This rank's slice of every group's latents, as a dictionary that trains as `shard`'s part."""
        lo, hi = shard.bounds(self.cfg.d_sae)
        out = MultiLayerDictionary(replace(self.cfg, d_sae=hi - lo)).to(self.b_dec.device)
        out.shard = shard
        out.load_state_dict(out.slice_state(self.state_dict()))
        out.set_objective(self.groups[0].objective)
        return out

    @torch.no_grad()
    def gathered(self) -> "MultiLayerDictionary":
        """The whole dictionary from every rank's slice (a collective: every rank calls it)."""
        s = self.shard
        out = MultiLayerDictionary(replace(self.cfg, d_sae=self.full_width)).to(self.b_dec.device)
        out.load_state_dict({k: v if axis is None else s.gather_latents(v, dim=axis) for k, v, axis in self.latent_axes()})
        out.set_objective(self.groups[0].objective)
        return out

    def slice_state(self, whole: dict) -> dict:
        """This rank's slice of the whole dictionary's state `whole`."""
        lo, hi = self.shard.bounds(self.full_width)
        axes = {k: axis for k, _, axis in self.latent_axes()}
        return {k: v if axes[k] is None else v[lo:hi] if axes[k] == 0 else v[..., lo:hi] for k, v in whole.items()}

    def latent_axes(self) -> list[tuple[str, torch.Tensor, int | None]]:
        """Each state entry with the axis its latents run along (None: the same on every rank)."""
        axes = {"W_enc": -1, "b_enc": 0, "theta": 0, "W_dec": 0}
        return [(k, v, axes.get(k.rsplit(".", 1)[-1]) if k.startswith("groups.") else None)
                for k, v in self.state_dict().items()]

    @torch.no_grad()
    def init_from(self, saes: list[SparseAutoencoder], duplicate_cos: float = 0.9) -> list[int]:
        """Start each group from the single-layer dictionary of its layer (SPEC §8: Gemma Scope 2's
        multi-layer models began as their single-layer Matryoshka SAEs): its leading latents in
        order (a Matryoshka prefix carries the general ones), each writing only its own layer, so
        that every output starts as that dictionary's reconstruction; groups stay random past the
        latents a dictionary has. A crosscoder's residual carries a feature on to later layers, so
        there a later layer's latent whose encoder reads an earlier one's decoder direction (cosine
        above `duplicate_cos`) is skipped. Call after the scales are set; returns the latents taken
        per group. Each latent is rescaled to a unit decoder row, which leaves a JumpReLU's code
        unchanged up to that factor (TopK's ranking may move: it starts near, not at, the dictionary)."""
        cfg, taken, placed = self.cfg, [], []
        if len(saes) != cfg.n_layers:
            raise SaescopeError(f"a {cfg.kind} over {cfg.n_layers} layers starts from {cfg.n_layers} dictionaries, got {len(saes)}")
        for i, (g, sae) in enumerate(zip(self.groups, saes)):
            want = (cfg.sites_in[i], cfg.sites_out[i])
            got = (sae.cfg.site, sae.cfg.target_site or sae.cfg.site)
            if got != want or sae.cfg.skip or (sae.cfg.d_in, sae.cfg.width_out) != (cfg.d_in, cfg.d_out):
                raise SaescopeError(f"group {i} of this {cfg.kind} maps {want[0]} → {want[1]} ({cfg.d_in} → {cfg.d_out}); "
                                    f"the dictionary given for it maps {got[0]} → {got[1]} ({sae.cfg.d_in} → {sae.cfg.width_out})"
                                    + (" with a skip, which a multi-layer dictionary has no place for" if sae.cfg.skip else ""))
            f = sae.fold()
            order = torch.arange(f.cfg.d_sae)
            if cfg.kind == "crosscoder" and placed:
                earlier = torch.nn.functional.normalize(torch.cat(placed), dim=1)
                reads = torch.nn.functional.normalize(f.W_enc.T, dim=1) @ earlier.T
                order = order[reads.max(1).values <= duplicate_cos]
            order = order[:cfg.d_sae]
            k = len(order)
            norm = f.W_dec[order].norm(dim=1).clamp_min(1e-12)
            a = self.scale_out[i] / norm  # codes f / a: unit decoder rows, the same output
            g.W_enc[:, :k] = f.W_enc[:, order] * self.scale_in[i] / a
            g.b_enc[:k] = f.b_enc[order] / a
            if g.cfg.arch == "jumprelu":
                g.theta[:k] = f.threshold[order] / a
            block = g.W_dec.view(cfg.d_sae, cfg.n_layers - i, cfg.d_out)
            block[:k] = 0
            block[:k, 0] = f.W_dec[order] / norm[:, None]
            self.b_dec[i] = f.b_dec / self.scale_out[i]
            placed.append(f.W_dec[order])
            taken.append(k)
        return taken

    def set_l0(self, values: list[float]) -> None:
        """Each group's L0 from this step on: TopK's and BatchTopK's k, or the target of a
        JumpReLU's quadratic penalty (a target decaying from the starting dictionaries' L0)."""
        for g, v in zip(self.groups, values):
            if g.cfg.arch in ("topk", "batchtopk"):
                g.cfg.k = max(1, round(v))
            elif g.objective.target_l0 is not None:
                g.objective = replace(g.objective, target_l0=float(v))

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        for g in self.groups:
            g.init_weights(generator)
        self.b_dec.zero_()

    def _by_group(self, rows: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Latent indices over every group ([n·m], ascending, as `nonzero` gives "touched"), as
        each group's own: cut at the group bounds with one host read, not one mask per group."""
        n, m = self.cfg.n_layers, self.cfg.d_sae
        if rows is None:
            return [None] * n
        cuts = torch.searchsorted(rows, torch.arange(1, n, device=rows.device) * m).cpu()
        return [part - i * m for i, part in enumerate(rows.tensor_split(cuts))]

    @torch.no_grad()
    def remove_parallel_grad(self, rows: torch.Tensor | None = None) -> None:
        for g, own in zip(self.groups, self._by_group(rows)):
            g.remove_parallel_grad(own)

    @torch.no_grad()
    def apply_constraints(self, rows: torch.Tensor | None = None) -> None:
        for g, own in zip(self.groups, self._by_group(rows)):
            g.apply_constraints(own)

    @torch.no_grad()
    def unit_decoder_rows(self) -> None:
        for g in self.groups:
            g.unit_decoder_rows()

    # --- folding -------------------------------------------------------------------------------
    @torch.no_grad()
    def fold(self) -> "MultiLayerDictionary":
        """A copy in the released form (raw activations in, scales 1) with identical outputs and codes."""
        out = copy.deepcopy(self)
        n = self.cfg.n_layers
        for i, g in enumerate(out.groups):
            g.W_enc.div_(self.scale_in[i])
            g.W_dec.view(self.cfg.d_sae, n - i, -1).mul_(self.scale_out[i:][None, :, None])
        out.b_dec.mul_(self.scale_out[:, None])
        out.scale_in.fill_(1.0)
        out.scale_out.fill_(1.0)
        out.cfg = replace(self.cfg)
        return out

    @torch.no_grad()
    def layer_view(self, i: int) -> SparseAutoencoder:
        """Group i's latents as a transcoder of its own layer, folded: the same codes from the same
        input, the decoder its writes to its own output. What the explorer shows of a CLT latent
        (examples, its own-layer logits and neighbours); its writes to later layers are not in it."""
        f = self if self.folded else self.fold()
        g, cfg = f.groups[i], self.cfg
        view = build_sae(SAEConfig(arch=cfg.arch, d_in=cfg.d_in, d_sae=cfg.d_sae, d_out=cfg.d_out, site=cfg.sites_in[i],
                                   target_site=cfg.sites_out[i], model=cfg.model, k=cfg.k, bandwidth=cfg.bandwidth,
                                   extra={"layer_of": cfg.kind}))
        view.W_enc.copy_(g.W_enc)
        view.b_enc.copy_(g.b_enc)
        view.W_dec.copy_(f.W_dec[i][:, 0])
        view.b_dec.copy_(f.b_dec[i])
        if cfg.arch == "jumprelu":
            view.set_threshold(g.threshold)
        return view

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.kind}, {c.arch}, {c.n_layers} layers ({c.sites_in[0]} … {c.sites_in[-1]}), d_sae={c.d_sae} per layer"
