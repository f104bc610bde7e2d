"""What a training step minimises beyond reconstruction, as functions of one `Encoded` batch, so
that the reference and both fast paths (fast.py) share every formula.

- Sparsity (SPEC §2, §7): the linear L0 penalty λ·L0 (Gemma Scope); the quadratic penalty around
  a target, λ·c·(L0 − L0*)² with c = 1/(2·L0*) (Gemma Scope 2: its gradient, (L0 − L0*)/L0*,
  equals the linear penalty's at L0 = 2·L0*), of the batch's mean L0 or per token; and tanh,
  λ·Σ_i tanh(s·f_i), whose gradient reaches the activations themselves (the 2025 variant).
  L0 here is the straight-through count, so each reaches θ through SPEC §2's pseudo-derivative.
- Frequency: w·Σ_i max(0, p_i − τ) with p_i the share of the batch's tokens on which latent i
  fires (the same straight-through indicator): only latents firing more often than τ pay, and
  they pay by raising θ, so no latent becomes dense. TopK and BatchTopK have no θ and no
  indicator to differentiate; there p_i is written as the latent's total activation over its
  mean activation (held constant), which is the share in value and whose gradient lowers that
  latent's activations, so that the top-k cut keeps it on fewer tokens.
- Matryoshka: nested prefixes of the latents each reconstruct the target alone (the partial
  sums of the decoder share one pass), the losses weighted and summed; low-index latents then
  carry the frequent, general directions (less feature absorption).
- Dead latents (`Objective.dead_aux`): AuxK's loss on the pre-activations of latents that have
  not fired for a while (sae/base.py), so JumpReLU's dead latents get a gradient too.
- Norm cap (`Objective.norm_cap`): a row whose centred target norm exceeds the cap × the batch's
  median counts in the reconstruction loss as if its norm were that (its squared error times
  (cap·median/norm)²). Gemma's massive-activation tokens (newlines and the like: rare, with norms
  far above the rest) otherwise carry most of the loss, and JumpReLU spends many latents on each
  of them and reconstructs ordinary tokens worse (README: Dictionary quality). The reported MSE
  and FVU stay unweighted."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable

import torch

from ..errors import SaescopeError
from .fast import Code

SPARSITY = ("l0", "quadratic", "tanh")
QUADRATIC_FORMS = ("batch", "token")


@dataclass(frozen=True)
class Objective:
    """One SAE's training objective beyond its architecture (validated by config.SAESpec)."""

    sparsity: str = "l0"                 # jumprelu: "l0" | "quadratic" | "tanh"
    target_l0: float | None = None       # the quadratic penalty's L0*
    quadratic_form: str = "batch"        # "batch": (mean L0 − L0*)²; "token": the mean of (L0_b − L0*)²
    tanh_scale: float = 4.0              # s in tanh(s·f), f on unit-mean-square inputs
    frequency_penalty: float = 0.0       # w; 0: off
    frequency_threshold: float = 0.1     # τ: a latent firing on more than this share of tokens pays
    matryoshka: tuple[int, ...] = ()     # prefix widths, increasing, each below the width (which is implied last)
    matryoshka_weights: tuple[float, ...] = ()  # one per prefix and the whole; default equal, summing to 1
    dead_aux: float = 0.0                # jumprelu: weight of the AuxK-style loss on dead latents
    input_ste: bool = False              # jumprelu: the kernel's gradient reaches the pre-activations too
    norm_cap: float = 0.0                # rows above this × the median centred norm weigh as if at it; 0: off

    def __post_init__(self):
        if self.sparsity not in SPARSITY:
            raise SaescopeError(f"unknown sparsity '{self.sparsity}'; available: {', '.join(SPARSITY)}")
        if self.quadratic_form not in QUADRATIC_FORMS:
            raise SaescopeError(f"unknown quadratic_form '{self.quadratic_form}'; available: {', '.join(QUADRATIC_FORMS)}")
        if self.sparsity == "quadratic" and not (self.target_l0 and self.target_l0 > 0):
            raise SaescopeError("the quadratic sparsity penalty needs a positive target_l0")
        if list(self.matryoshka) != sorted(set(self.matryoshka)) or any(p <= 0 for p in self.matryoshka):
            raise SaescopeError(f"matryoshka prefixes must be increasing positive widths, got {list(self.matryoshka)}")
        if self.norm_cap < 0:
            raise SaescopeError(f"norm_cap must be positive (0: off), got {self.norm_cap}")
        if self.matryoshka_weights and len(self.matryoshka_weights) != len(self.matryoshka) + 1:
            raise SaescopeError(f"matryoshka_weights needs {len(self.matryoshka) + 1} weights (each prefix and the "
                                f"whole), got {len(self.matryoshka_weights)}")

    def check_width(self, width: int) -> None:
        if self.matryoshka and self.matryoshka[-1] >= width:
            raise SaescopeError(f"matryoshka prefix {self.matryoshka[-1]} is not below the SAE's width {width}")

    @property
    def per_token(self) -> bool:
        """Whether the loss reads each token's L0 (else the batch's total is all it needs)."""
        return self.sparsity == "quadratic" and self.quadratic_form == "token"

    @property
    def per_latent(self) -> bool:
        """Whether the loss reads each latent's firing count."""
        return self.frequency_penalty > 0

    @property
    def weights(self) -> tuple[float, ...]:
        n = len(self.matryoshka) + 1
        return self.matryoshka_weights or (1.0 / n,) * n


@dataclass
class Encoded:
    """One batch's code, whichever path made it: the activations (in the graph) and the
    straight-through firing counts: in all, and per token and per latent where the objective
    reads them (Objective.per_token, per_latent; computing them costs passes over [B, m])."""

    values: torch.Tensor                  # f [B, m] (dense), or the values of `code`'s entries [n] (sparse)
    code: Code | None                     # the entries' positions; None when `values` is dense
    count: torch.Tensor                   # firings in the batch
    tokens: torch.Tensor | None = None    # [B] latents firing at each token
    latents: torch.Tensor | None = None   # [m] tokens each latent fires on

    @classmethod
    def of_dense(cls, f: torch.Tensor) -> "Encoded":
        """Dense activations f ≥ 0 whose count needs no straight-through gradient (ReLU, TopK)."""
        return cls(f, None, (f > 0).sum().float())

    @property
    def batch(self) -> int:
        return self.values.shape[0] if self.code is None else self.code.offsets.shape[0]

    @cached_property
    def fired(self) -> torch.Tensor:
        """[m] bool: the latents that fired at some token (f ≥ 0, so a maximum tells)."""
        if self.latents is not None:
            return self.latents.detach() > 0
        if self.code is not None:
            return self.code.fired(self.values)
        return self.values.detach().amax(0) > 0

    @property
    def l0(self) -> torch.Tensor:
        return self.count / self.batch

    def decode(self, W_dec: torch.Tensor, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """Σ over latents lo ≤ i < hi of f_i·W_dec[i] (no bias), [B, d_out]; a sparse code decodes
        only its entries in that range."""
        hi = W_dec.shape[0] if hi is None else min(hi, W_dec.shape[0])
        if self.code is None:
            return self.values @ W_dec if (lo, hi) == (0, W_dec.shape[0]) else self.values[:, lo:hi] @ W_dec[lo:hi]
        code, values = self.code, self.values
        if (lo, hi) != (0, W_dec.shape[0]):  # the entries in range, still in token order
            inside = ((code.cols >= lo) & (code.cols < hi)).nonzero().squeeze(1)
            code, values = code.select(inside), values[inside]
        return code.decode(values, W_dec)

    def total(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Σ over the batch and latents of fn(f), for an fn with fn(0) = 0."""
        return fn(self.values).sum()

    def latent_totals(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([m] Σ over the batch of each latent's activations, in the graph; [m] its firing count,
        the encoder's own where it counted them)."""
        fired = None if self.latents is None else self.latents.detach()
        if self.code is None:
            total = self.values.sum(0)
            return total, fired if fired is not None else (self.values.detach() > 0).sum(0).to(total.dtype)
        zeros = self.values.new_zeros(self.code.width)
        total = zeros.index_add(0, self.code.cols, self.values)
        return total, fired if fired is not None else zeros.index_add(0, self.code.cols, (self.values.detach() > 0).to(total.dtype))

    def weighted(self, w: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of Σ_i f_i·w_i."""
        if self.code is None:
            return (self.values @ w).sum()
        return (self.values * w[self.code.cols]).sum()


def row_errors(x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_d (x̂ − x)² of each row."""
    return (x_hat - target).pow(2).sum(-1)


def squared_error(x_hat: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ_d (x̂ − x)², averaged over the batch: the loss's reconstruction term (SPEC §2)."""
    return row_errors(x_hat, target).mean()


@torch.no_grad()
def capped_rows(target: torch.Tensor, cap: float) -> torch.Tensor:
    """Each row's weight under the norm cap: min(1, (cap·median / ‖t − mean‖)²), of this batch
    (under data-parallel training, of each rank's share)."""
    norm = (target - target.mean(0)).norm(dim=1)
    return (cap * norm.median() / norm.clamp_min(torch.finfo(norm.dtype).tiny)).pow(2).clamp(max=1.0)


def reconstruction(enc: Encoded, W_dec: torch.Tensor, b_dec: torch.Tensor, target: torch.Tensor,
                   objective: Objective) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(the reconstruction loss, the whole dictionary's squared error, x̂), x̂ = the decode + b_dec
    (a skip transcoder's b_dec + x·A, one row per token, is in every prefix's x̂ too): with Matryoshka
    prefixes, the weighted sum of each prefix's squared error, the partial decodes chained so
    that every latent is decoded once. With a norm cap the losses weigh rows; the error does not."""
    rows = capped_rows(target, objective.norm_cap) if objective.norm_cap else None

    def terms(x_hat):  # (the loss's term, the unweighted error), each row's error summed once
        err = row_errors(x_hat, target)
        mse = err.mean()
        return (mse if rows is None else (err * rows).mean()), mse

    if not objective.matryoshka:
        x_hat = enc.decode(W_dec) + b_dec
        return (*terms(x_hat), x_hat)
    bounds = (*objective.matryoshka, W_dec.shape[0])
    x_hat, loss, lo = b_dec, 0.0, 0
    for hi, weight in zip(bounds, objective.weights):
        x_hat = x_hat + enc.decode(W_dec, lo, hi)
        term, mse = terms(x_hat)
        loss, lo = loss + weight * term, hi
    return loss, mse, x_hat


def sparsity_penalty(objective: Objective, coeff, enc: Encoded) -> torch.Tensor:
    """λ times the chosen sparsity measure of the batch."""
    if objective.sparsity == "l0":
        return coeff * enc.l0
    if objective.sparsity == "quadratic":
        target = objective.target_l0
        gap = enc.tokens - target if objective.per_token else enc.l0 - target
        return coeff * gap.pow(2).mean() / (2 * target)
    scale = objective.tanh_scale
    return coeff * enc.total(lambda f: torch.tanh(scale * f)) / enc.batch


def frequency_penalty(objective: Objective, enc: Encoded) -> torch.Tensor | float:
    """w·Σ_i max(0, p_i − τ) over latents firing on more than τ of the batch."""
    if not objective.frequency_penalty:
        return 0.0
    return _hinge(objective, enc.latents / enc.batch)


def activation_frequency_penalty(objective: Objective, enc: Encoded) -> torch.Tensor | float:
    """The same penalty for codes without a threshold (TopK, BatchTopK): p_i = Σ_b f_bi / (B·mean_i),
    the mean of latent i's non-zero activations held constant."""
    if not objective.frequency_penalty:
        return 0.0
    total, count = enc.latent_totals()
    mean = (total.detach() / count.clamp_min(1)).clamp_min(torch.finfo(total.dtype).tiny)
    return _hinge(objective, total / (mean * enc.batch))


def _hinge(objective: Objective, share: torch.Tensor) -> torch.Tensor:
    """w·Σ_i max(0, p_i − τ)."""
    return objective.frequency_penalty * (share - objective.frequency_threshold).clamp_min(0).sum()
