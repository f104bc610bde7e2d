"""Baselines on the same interface and trainer: TopK, BatchTopK (both with AuxK) and ReLU + L1."""

from __future__ import annotations

import torch

from .base import AUXK_COEFF, SAEConfig, SparseAutoencoder
from .fast import Code, buffer
from .objectives import Encoded, activation_frequency_penalty


class TopKSAE(SparseAutoencoder):
    """f = the k largest of ReLU(pre) per token, the rest zero."""

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.relu().topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, vals)

    def _select(self, pre: torch.Tensor) -> torch.Tensor:
        return self._activate(pre)

    def _choose(self, pre: torch.Tensor) -> Code:
        """The training step's chosen entries of graph-free pre-activations (ReLU comes after)."""
        vals, idx = pre.topk(self.cfg.k, dim=-1)
        return Code.from_topk(vals, idx, pre.shape[-1])

    aux_weight = AUXK_COEFF

    def training_code(self, x, dead, path, workspace, pre):
        if path == "reference":
            pre = self.pre_acts(x)
            enc = Encoded.of_dense(self._select(pre))
            return enc, lambda residual: (self._aux_reference(pre, residual, dead), None)
        pre = self._fast_pre(x, workspace) if pre is None else pre
        code = self._choose(pre)
        aux_code = self._aux_code(pre, dead)  # before a dense step overwrites pre
        if self._sparse_pays(self.cfg.k * x.shape[0], x.shape[0], path):
            enc = self._sparse_encoded(x, code, None)
        else:  # the chosen entries in an otherwise zero matrix: ReLU there is the TopK activation
            chosen = buffer(workspace, "chosen", pre.shape, pre.dtype, pre.device)
            chosen = (torch.zeros_like(pre) if chosen is None else chosen.zero_()).index_put_((code.rows, code.cols), code.pre)
            enc = self._dense_encoded(x, chosen, None, workspace)
        return enc, lambda residual: self._aux_loss(x, aux_code, residual)

    def penalty(self, enc, sparsity_coeff, out):
        return activation_frequency_penalty(self.objective, enc)


class BatchTopKSAE(TopKSAE):
    """Training keeps the k·batch largest activations of the whole batch; inference uses one
    threshold, i.e. a JumpReLU with a shared θ, set from the finished weights (`fit_threshold`).

    When a batch is split over data-parallel ranks, `across` (set by the trainer) gives the cut
    of the whole batch: an object with `world` and `largest_share(top, n)` (how many of this
    rank's largest values are among the batch's n largest)."""

    across = None

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.register_buffer("shared_threshold", torch.tensor(-1.0))  # < 0: not yet estimated

    def _kept(self, flat: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Values and flat indices of the k·batch largest entries (of the whole batch across ranks)."""
        world = self.across.world if self.across is not None else 1
        n = min(self.cfg.k * rows * world, flat.numel() * world)
        vals, idx = flat.topk(min(n, flat.numel()))
        if self.across is not None:  # this rank's share of the batch's n largest (a prefix: topk sorts)
            keep = self.across.largest_share(vals.detach(), n)
            vals, idx = vals[:keep], idx[:keep]
        return vals, idx

    def _select(self, pre: torch.Tensor) -> torch.Tensor:
        flat = pre.relu().reshape(-1)
        vals, idx = self._kept(flat, pre.shape[0])
        return torch.zeros_like(flat).scatter(0, idx, vals).reshape(pre.shape)

    def _choose(self, pre: torch.Tensor) -> Code:
        return Code.from_flat(pre, self._kept(pre.reshape(-1), pre.shape[0])[1])

    @torch.no_grad()
    def fit_threshold(self, x: torch.Tensor) -> None:
        """The shared θ: where the batch x (in SAE units, the whole batch) is cut between its k·rows
        largest activations and the rest, under the finished weights. Fitted once training is over,
        not tracked along the way: a running average of the cut lags the weights, and under signum
        the saved weights are an average that no training step evaluated."""
        pre = self.pre_acts(x).relu().reshape(-1)
        n = min(self.cfg.k * x.shape[0], pre.numel())
        vals = pre.topk(min(n + 1, pre.numel())).values
        below = vals[n] if len(vals) > n else vals.new_tensor(0.0)
        self.shared_threshold.fill_(float((vals[n - 1] + below) / 2))

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        if float(self.shared_threshold) < 0:
            return super()._activate(pre)
        return pre * (pre > self.shared_threshold).to(pre.dtype)

    @property
    def threshold(self) -> torch.Tensor:
        return self.shared_threshold.clamp_min(0).expand(self.cfg.d_sae)

    def _fold_threshold(self, c: float) -> None:
        if float(self.shared_threshold) >= 0:
            self.shared_threshold.mul_(c)


class ReLUSAE(SparseAutoencoder):
    """f = ReLU(pre); sparsity by an L1 penalty weighted by decoder row norms (unit here)."""

    PER_LATENT_SCALE = True

    def _activate(self, pre: torch.Tensor) -> torch.Tensor:
        return pre.relu()

    def training_code(self, x, dead, path, workspace, pre):
        if path == "reference":
            return Encoded.of_dense(self._activate(self.pre_acts(x))), None
        pre = self._fast_pre(x, workspace) if pre is None else pre
        return self._threshold_encoded(x, None, path, workspace, pre), None

    def penalty(self, enc, sparsity_coeff, out):
        l1 = enc.weighted(self.W_dec.norm(dim=1)) / enc.batch
        out["l1"] = l1.detach()
        return sparsity_coeff * l1
