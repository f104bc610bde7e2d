"""Baselines on the same interface and trainer: TopK, BatchTopK (both with AuxK) and ReLU + L1."""

from __future__ import annotations

import torch

from .base import AUXK_COEFF, SAEConfig, SparseAutoencoder
from .fast import Code, buffer
from .objectives import Encoded, activation_frequency_penalty, reconstruction


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
        return Code.from_topk(vals, idx, self.cfg.d_sae)

    def training_loss(self, x, target, sparsity_coeff, dead=None, path="auto", workspace=None, pre=None):
        if path == "reference":
            pre = self.pre_acts(x)
            f = self._select(pre)
            enc = Encoded.of_dense(f)
        else:
            pre = self._fast_pre(x, workspace) if pre is None else pre
            code = self._choose(pre)
            if self._sparse_pays(self.cfg.k * x.shape[0], x.shape[0], path):
                enc = self._sparse_encoded(x, code, None)
            else:  # the chosen entries in an otherwise zero matrix: ReLU there is the TopK activation
                chosen = buffer(workspace, "chosen", pre.shape, pre.dtype, pre.device)
                chosen = (torch.zeros_like(pre) if chosen is None else chosen.zero_()).index_put_((code.rows, code.cols), code.pre)
                enc = self._dense_encoded(x, chosen, None, workspace)
        loss, mse, x_hat = reconstruction(enc, self.W_dec, self._decoder_base(x), target, self.objective)
        loss = loss + activation_frequency_penalty(self.objective, enc)
        residual = target - x_hat.detach()
        out = {"mse": mse, "l0": enc.l0.detach(), "fired": enc.fired}
        if path == "reference":
            aux = self._aux_reference(pre, residual, dead)
        else:
            aux, aux_fired = self._aux_loss(x, self._aux_code(pre, dead), residual)
            out["touched"] = enc.fired | aux_fired
        return {"loss": loss + AUXK_COEFF * aux, "aux": aux.detach(), **out}


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

    def training_loss(self, x, target, sparsity_coeff, dead=None, path="auto", workspace=None, pre=None):
        norms = self.W_dec.norm(dim=1)
        if path == "reference":
            f = self._activate(self.pre_acts(x))
            enc = Encoded.of_dense(f)
        else:
            pre = self._fast_pre(x, workspace) if pre is None else pre
            enc = self._threshold_encoded(x, None, path, workspace, pre)
        loss, mse, _ = reconstruction(enc, self.W_dec, self._decoder_base(x), target, self.objective)
        l1 = enc.weighted(norms) / x.shape[0]
        return {"loss": loss + sparsity_coeff * l1, "mse": mse, "l1": l1.detach(), "l0": enc.l0.detach(), "fired": enc.fired}
