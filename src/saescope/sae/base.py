"""What every dictionary shares: parameters, the normalisation scalar, decoding, folding, and the
decoder-row constraint. Subclasses say how latents are chosen (`_activate`) and what sparsity costs.

Every SAE takes *raw* activations. An unfolded SAE (as trained) holds the scalar C and a
pre-encoder bias and computes C·f(x/C); `fold()` moves C and the pre-encoder bias into the
weights (SPEC §2) and gives the released form with identical outputs."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from .fast import Code, DenseEncode, SparseEncode, Workspace, above, max_density, pre_activations
from .objectives import Encoded, Objective, reconstruction, squared_error

ARCHS = ("jumprelu", "topk", "batchtopk", "relu")
AUXK_COEFF = 1 / 32  # weight of the AuxK loss (Gao et al. 2024)
# How a training step computes: "auto" picks the sparse step when few enough entries fire (see
# fast.py), "dense" and "sparse" force one fast path, "reference" is SPEC §2 written plainly.
PATHS = ("auto", "dense", "sparse", "reference")


@dataclass
class SAEConfig:
    """Shape, kind and provenance of one SAE or transcoder."""

    arch: str = "jumprelu"
    d_in: int = 0
    d_sae: int = 0
    d_out: int | None = None            # transcoders: the target's width (default d_in)
    site: str | None = None             # where it reads, e.g. "resid.6" or "mlp_in.6"
    target_site: str | None = None      # transcoders: what it predicts, e.g. "mlp.6"
    model: str | None = None
    k: int | None = None                # topk / batchtopk
    theta_param: str = "theta"          # jumprelu: train θ directly ("theta") or log θ ("log")
    bandwidth: float = 0.001            # ε of the rectangle kernel
    skip: bool = False                  # transcoders: an affine skip x·A beside the dictionary (SPEC §8)
    extra: dict = field(default_factory=dict)  # provenance: training config, metrics, ...

    def __post_init__(self):
        from ..errors import SaescopeError

        if self.arch not in ARCHS:
            raise SaescopeError(f"unknown SAE architecture '{self.arch}'; available: {', '.join(ARCHS)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SaescopeError(f"SAE needs positive d_in and d_sae, got {self.d_in} and {self.d_sae}")
        if self.arch in ("topk", "batchtopk") and not (self.k and 0 < self.k <= self.d_sae):
            raise SaescopeError(f"{self.arch} SAE needs k in 1..{self.d_sae}, got {self.k}")
        if self.theta_param not in ("theta", "log"):
            raise SaescopeError(f"theta_param must be 'theta' or 'log', got '{self.theta_param}'")
        if self.skip and self.target_site is None:
            raise SaescopeError("a skip connection is for transcoders (an SAE's skip would copy its input): set target_site")

    @property
    def transcoder(self) -> bool:
        return self.target_site is not None

    @property
    def width_out(self) -> int:
        return self.d_out or self.d_in

    def to_dict(self) -> dict:
        return asdict(self)


class SparseAutoencoder(nn.Module):
    """Parameters W_enc (d_in × m), b_enc (m), W_dec (m × d_out), b_dec (d_out) as in SPEC §3."""

    PER_LATENT_SCALE = False  # a latent's code scales with its own encoder column alone (no cross-latent choice)

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        m, d_in, d_out = cfg.d_sae, cfg.d_in, cfg.width_out
        # W_enc is d_in × m, stored latent-major (the transpose of a contiguous m × d_in): the
        # sparse step's encoder gradient comes out as one row per latent, and in this layout it is
        # the parameter's own, so no step copies it into place.
        self.W_enc = nn.Parameter(torch.zeros(m, d_in).t())
        self.b_enc = nn.Parameter(torch.zeros(m))
        self.W_dec = nn.Parameter(torch.zeros(m, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:  # d_in × d_out, applied as x @ W_skip (SPEC §8's orientation); zero at the start
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))
        self.register_buffer("norm_scalar", torch.tensor(1.0))     # C: the SAE sees x / C
        self.register_buffer("pre_encoder_bias", torch.tensor(False))
        self.objective = Objective()  # what training minimises beyond reconstruction (objectives.py)

    # --- the two forms -------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of *normalised* input (training form)."""
        if self.pre_encoder_bias:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations of raw input x [..., d_in] → [..., d_sae], in the SAE's dtype whatever
        the model's (a bfloat16 model's activations are read in the SAE's float32)."""
        c = self.norm_scalar
        return self._activate(self.pre_acts(x.to(self.W_enc.dtype) / c)) * c

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """Raw reconstruction from raw latents [..., d_sae] → [..., d_out]."""
        return f @ self.W_dec + self.b_dec * self.norm_scalar

    def skip_output(self, x: torch.Tensor) -> torch.Tensor | float:
        """A skip transcoder's x·A for raw (or normalised: the map is linear and C cancels) input;
        0 without a skip. The output is decode(encode(x)) + skip_output(x)."""
        return x.to(self.W_skip.dtype) @ self.W_skip if self.cfg.skip else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x)) + self.skip_output(x)

    def _decoder_base(self, x: torch.Tensor) -> torch.Tensor:
        """What the training step's reconstruction adds to the latents' decode: b_dec, plus the
        skip of the normalised input x."""
        return self.b_dec + self.skip_output(x) if self.cfg.skip else self.b_dec

    def encoder_weights(self) -> list[nn.Parameter]:
        """The encoder matrices, stored latent-major (an optimizer steps their contiguous transposes)."""
        return [self.W_enc]

    # --- training ------------------------------------------------------------------------------
    def training_loss(self, x: torch.Tensor, target: torch.Tensor, sparsity_coeff: float,
                      dead: torch.Tensor | None = None, path: str = "auto",
                      workspace: Workspace | None = None, pre: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Loss on normalised input and target: {"loss", "mse", "l0", "fired" ([m] bool), ...};
        "touched" ([m] bool, when present; else "fired") marks the decoder rows the step's gradient reaches.
        `dead` marks latents that have not fired for a while (used by AuxK); `path` is one of PATHS;
        a `workspace` lends reused buffers (its last graph must have run backward); `pre` gives the
        fast paths graph-free pre-activations computed by the caller (a group's shared product)."""
        enc, aux = self.training_code(x, dead, path, workspace, pre)
        loss, mse, x_hat = reconstruction(enc, self.W_dec, self._decoder_base(x), target, self.objective)
        out = {"mse": mse, "l0": enc.l0.detach(), "fired": enc.fired}
        loss = loss + self.penalty(enc, sparsity_coeff, out)
        if aux is not None:
            loss = loss + self.aux_term(aux, target - x_hat.detach(), enc, out)
        return {"loss": loss, **out}

    def training_code(self, x: torch.Tensor, dead: torch.Tensor | None, path: str, workspace: Workspace | None,
                      pre: torch.Tensor | None) -> tuple[Encoded, Callable | None]:
        """The training step's code of normalised x by `path`, and its dead-latent loss as a
        function of the residual error (None without one): `aux(residual)` gives (the loss, the
        latents it decoded or None where every decoder row gets a gradient anyway). A multi-layer
        dictionary decodes the codes of its groups together (multilayer.py)."""
        raise NotImplementedError

    def penalty(self, enc: Encoded, sparsity_coeff, out: dict) -> torch.Tensor | float:
        """What sparsity costs this architecture (what it reports of it goes into `out`)."""
        raise NotImplementedError

    aux_weight = 0.0  # the dead-latent loss's weight

    def aux_term(self, aux: Callable, residual: torch.Tensor, enc: Encoded, out: dict) -> torch.Tensor:
        """The weighted dead-latent loss on `residual`; its value and reach go into `out`."""
        term, fired = aux(residual)
        if fired is not None:
            out["touched"] = enc.fired | fired
        out["aux"] = term.detach()
        return self.aux_weight * term

    # --- the fast paths (fast.py) ----------------------------------------------------------------
    @property
    def _b_pre(self) -> torch.Tensor | None:
        return self.b_dec if self.pre_encoder_bias else None

    def _fast_pre(self, x: torch.Tensor, workspace: Workspace | None) -> torch.Tensor:
        return pre_activations(x, self._b_pre, self.W_enc, self.b_enc, workspace)

    def _sparse_pays(self, entries: int, batch: int, path: str) -> bool:
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(PATHS)}, got '{path}'")
        return path == "sparse" or (path == "auto" and entries <= max_density(self.W_enc.device) * batch * self.cfg.d_sae)

    def _sparse_encoded(self, x: torch.Tensor, code: Code, theta: torch.Tensor | None) -> Encoded:
        """A code's values and firing counts (SparseEncode)."""
        obj = self.objective
        vals, count, tokens, latents = SparseEncode.apply(x, self._b_pre, self.W_enc, self.b_enc, theta, code,
                                                          self.cfg.bandwidth, obj.input_ste, obj.per_token, obj.per_latent)
        return Encoded(vals, code, count, tokens, latents)

    def _dense_encoded(self, x: torch.Tensor, pre: torch.Tensor, theta: torch.Tensor | None,
                       workspace: Workspace | None = None, candidates: torch.Tensor | None = None) -> Encoded:
        """The same from graph-free pre-activations (overwritten)."""
        # a fresh alias: the output joins the graph, the workspace's own tensor stays out of it
        obj = self.objective
        f, count, tokens, latents = DenseEncode.apply(x, self._b_pre, self.W_enc, self.b_enc, theta, pre.detach(),
                                                      self.cfg.bandwidth, workspace, candidates, obj.input_ste,
                                                      obj.per_token, obj.per_latent)
        return Encoded(f, None, count, tokens, latents)

    def _threshold_encoded(self, x: torch.Tensor, theta: torch.Tensor | None, path: str, workspace: Workspace | None,
                           pre: torch.Tensor) -> Encoded:
        """JumpReLU (θ) or ReLU (θ None) of graph-free pre-activations, by the fast path that pays."""
        candidates = None
        if path != "dense":  # entries with H or K non-zero lie above θ − ε
            floor = theta.detach() - self.cfg.bandwidth if theta is not None else pre.new_zeros(())
            candidates = above(pre, floor, workspace)
            if self._sparse_pays(int(candidates.count_nonzero()), x.shape[0], path):
                return self._sparse_encoded(x, Code.from_mask(pre, candidates), theta)
        return self._dense_encoded(x, pre, theta, workspace, candidates)

    # --- dead latents (AuxK, Gao et al. 2024) ----------------------------------------------------
    def _aux_code(self, pre: torch.Tensor, dead: torch.Tensor | None) -> Code | None:
        """The k_aux largest pre-activations of dead latents per token, chosen from graph-free
        pre-activations (before a dense step overwrites them); None when none is dead."""
        dead_idx = dead.nonzero().squeeze(1) if dead is not None else None
        if dead_idx is None or len(dead_idx) == 0:
            return None
        k_aux = min(max(1, self.cfg.d_in // 2), len(dead_idx))
        vals, idx = pre[:, dead_idx].topk(k_aux, dim=-1)
        return Code.from_topk(vals, dead_idx[idx], pre.shape[-1])

    def _aux_loss(self, x: torch.Tensor, code: Code | None, residual: torch.Tensor,
                  whole: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """How well the dead latents' ReLU activations of `code` reconstruct the residual error,
        and the latents it decoded with a non-zero value. `whole` turns this slice's decode into
        every slice's (a dictionary whose latents are split over ranks)."""
        if code is None:
            return x.new_zeros(()), torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x.device)
        aux_vals = self._sparse_encoded(x, code, None).values
        rec = code.decode(aux_vals, self._aux_decoder)
        return squared_error(whole(rec) if whole else rec, residual), code.fired(aux_vals)

    # AuxK reconstructs the residual's first `aux_columns` coordinates (None: all of it); a
    # multi-layer dictionary's group sets its own layer's width (multilayer.py)
    aux_columns: int | None = None

    @property
    def _aux_decoder(self) -> torch.Tensor:
        return self.W_dec if self.aux_columns is None else self.W_dec[:, :self.aux_columns]

    def _aux_reference(self, pre: torch.Tensor, residual: torch.Tensor, dead: torch.Tensor | None) -> torch.Tensor:
        """`_aux_loss` written plainly with autograd. Live latents are zeroed rather than removed,
        so the step never asks an accelerator how many are dead; with none dead the term is
        multiplied away there, and skipped on the CPU."""
        if dead is None or (pre.device.type == "cpu" and not dead.any()):  # a CPU "sync" is free: skip two matmuls
            return pre.new_zeros(())
        k_aux = min(max(1, self.cfg.d_in // 2), self.cfg.d_sae)
        vals, idx = pre.relu().masked_fill(~dead, 0.0).topk(k_aux, dim=-1)
        rec = torch.zeros_like(pre).scatter(-1, idx, vals) @ self._aux_decoder
        return squared_error(rec, residual) * dead.any()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """SPEC §2: W_dec He-uniform with unit-norm rows; W_enc = W_decᵀ, except for transcoders
        (their encoder reads another space), whose W_enc is He-uniform with unit-norm columns."""
        w = torch.empty_like(self.W_dec)
        bound = math.sqrt(6.0 / w.shape[1])  # He-uniform, fan_in = d_out
        w.uniform_(-bound, bound, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
        if not self.cfg.transcoder:
            self.W_enc.copy_(self.W_dec.T)
        else:
            bound = math.sqrt(6.0 / self.W_enc.shape[0])
            self.W_enc.uniform_(-bound, bound, generator=generator)
            self.W_enc.mul_(1.0 / self.W_enc.norm(dim=0, keepdim=True))
        self.b_enc.zero_()
        self.b_dec.zero_()

    @torch.no_grad()
    def remove_parallel_grad(self, rows: torch.Tensor | None = None) -> None:
        """Drop the part of each decoder row's gradient that would change the row's norm; `rows`
        limits it to those rows (the others' gradient must be zero)."""
        if self.W_dec.grad is None:
            return
        w, g = (self.W_dec, self.W_dec.grad) if rows is None else (self.W_dec[rows], self.W_dec.grad[rows])
        g.addcmul_(torch.linalg.vecdot(g, w).unsqueeze(1), w, value=-1.0)
        if rows is not None:  # g was a gathered copy
            self.W_dec.grad.index_copy_(0, rows, g)

    @torch.no_grad()
    def normalize_decoder(self, rows: torch.Tensor | None = None) -> None:
        w = self.W_dec if rows is None else self.W_dec[rows]
        w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if rows is not None:
            self.W_dec.index_copy_(0, rows, w)

    @torch.no_grad()
    def apply_constraints(self, rows: torch.Tensor | None = None) -> None:
        """Put the parameters back in their valid set after an optimizer step (unit decoder rows;
        only `rows` when the step moved no other decoder row)."""
        self.normalize_decoder(rows)

    @torch.no_grad()
    def unit_decoder_rows(self) -> None:
        """Unit decoder rows for weights that left the unit sphere (an average of unit rows is
        shorter), each row's norm moved into its latent's encoder column, bias and threshold where
        a latent's code scales with them alone (`PER_LATENT_SCALE`), so that no reconstruction
        changes; TopK compares latents with each other, so its rows keep their norms."""
        if not self.PER_LATENT_SCALE:
            return
        n = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(n[:, None])
        self.W_enc.mul_(n)
        self.b_enc.mul_(n)
        self._fold_threshold(n)

    # --- folding -------------------------------------------------------------------------------
    @property
    def folded(self) -> bool:
        return float(self.norm_scalar) == 1.0 and not bool(self.pre_encoder_bias)

    @torch.no_grad()
    def fold(self) -> "SparseAutoencoder":
        """A copy in the released form: raw input, no pre-encoder bias, C = 1 (SPEC §2 folding)."""
        out = copy.deepcopy(self)
        c = float(self.norm_scalar)
        b_enc = self.b_enc - (self.b_dec @ self.W_enc if bool(self.pre_encoder_bias) else 0.0)
        out.b_enc.copy_(c * b_enc)
        out.b_dec.copy_(c * self.b_dec)
        out._fold_threshold(c)
        out.norm_scalar.fill_(1.0)
        out.pre_encoder_bias.fill_(False)
        out.cfg = replace(self.cfg)
        return out

    def _fold_threshold(self, c: float | torch.Tensor) -> None:
        """Scale whatever thresholds the architecture has by C (or per latent)."""

    @property
    def threshold(self) -> torch.Tensor:
        """Per-latent thresholds of the inference form (zeros where the architecture has none)."""
        return torch.zeros_like(self.b_enc)

    def extra_repr(self) -> str:
        c = self.cfg
        site = f", {c.site}" + (f" → {c.target_site}" if c.transcoder else "") if c.site else ""
        return f"{c.arch}, d_in={c.d_in}, d_sae={c.d_sae}{site}{', folded' if self.folded else ''}"
