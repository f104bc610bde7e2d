"""The PyTorch backend: each SAE's loss and gradient by its kernel path (sae/fast.py), the
decoder-norm step, Adam, and, data-parallel, one all-reduce of the step (distributed.py)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from schedulefree import ScheduleFreeWrapper

from ..sae import SparseAutoencoder
from ..sae.multilayer import MultiLayerDictionary
from ..sae.fast import Workspace, compute_dtype, few_touched, product
from .distributed import average_step
from .schedule import decayed
from .step import Backend, Member


@dataclass
class EncoderGroup:
    """SAEs of a suite that read the same input, stepped together: their encoders are slices of one
    latent-major matrix, so one product gives all their pre-activations, each SAE's pre-encoder
    bias folded into its bias, (x − b_dec)·W_enc + b_enc = x·W_enc + (b_enc − b_dec·W_enc).

    It pays where one small product leaves most of the device idle and each costs a launch
    (accelerators); on a CPU a product of these sizes is efficient already and grouped steps
    measured within noise of separate ones (bench/train_step.py), so the CPU steps them apart."""

    site: str
    scale: float
    members: list[Member]
    weight: torch.Tensor      # [Σ widths, d_in]: each member's W_enc is the transpose of a slice

    APART_ON = {"cpu"}        # device types whose SAEs step apart

    @classmethod
    def form(cls, members: list[Member], device: torch.device) -> list["EncoderGroup"]:
        if device.type in cls.APART_ON:
            return []
        by_input: dict[tuple, list[Member]] = {}
        for m in members:
            if m.multi:
                continue
            by_input.setdefault((m.site, m.scale), []).append(m)
        groups = []
        for (site, scale), group in by_input.items():
            if len(group) < 2:
                continue
            weight = torch.cat([m.sae.W_enc.detach().t() for m in group])
            start = 0
            for m in group:
                width = m.sae.cfg.d_sae
                m.sae.W_enc = torch.nn.Parameter(weight[start:start + width].t())
                start += width
            groups.append(cls(site, scale, group, weight))
        return groups

    @torch.no_grad()
    def pre_activations(self, x: torch.Tensor, workspace: Workspace) -> dict[str, torch.Tensor]:
        """Each member's graph-free pre-activations: views into one [batch, Σ widths] product."""
        out = workspace.get("group", (x.shape[0], self.weight.shape[0]), torch.float32, x.device)
        product(x, self.weight.t(), compute_dtype(x.device), out)
        views, start = {}, 0
        for m in self.members:
            sae, width = m.sae, m.sae.cfg.d_sae
            bias = sae.b_enc - sae.b_dec @ sae.W_enc if sae._b_pre is not None else sae.b_enc
            views[m.name] = out[:, start:start + width].add_(bias)
            start += width
        return views


class TorchStep(Backend):
    def __init__(self, cfg):
        self.cfg = cfg
        self.groups: list[EncoderGroup] = []
        self.optimizers: dict[str, torch.optim.Adam] = {}
        self.enc_rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # each W_enc with the tensor Adam steps
        self.workspace = Workspace()  # the SAEs step one after another, so they share buffers
        self.group_workspaces: dict[str, list[Workspace]] = {}  # a multi-layer dictionary's: its groups' graphs live at once

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self.cfg.kernels != "reference":
            self.groups = EncoderGroup.form(trainer.members, trainer.device)
        for m in trainer.members:  # after grouping, which gives some SAEs a new W_enc parameter
            self.enc_rows[m.name] = [(w, w.detach().t()) for w in m.sae.encoder_weights()]
            if m.multi:
                self.group_workspaces[m.name] = [Workspace() for _ in m.sae.groups]
            self.optimizers[m.name] = self._optimizer(m.sae, self.enc_rows[m.name], m.signum_steps)

    def _optimizer(self, sae: SparseAutoencoder | MultiLayerDictionary, enc_rows: list[tuple[torch.Tensor, torch.Tensor]],
                   signum_steps: dict[str, float]):
        """The SAE's parameters, W_enc seen through its contiguous transpose `enc_rows` (it is
        stored latent-major, see SparseAutoencoder): torch's fused Adam copies a non-contiguous
        tensor in and out on every step. The alias shares the parameter's memory; `_update` hands
        it W_enc's gradient, transposed (a view). Adam is fused (one pass over each parameter)
        but on the reference path. Signum is SGD on the gradient's sign (`_update` takes it)
        inside schedule-free averaging (`schedulefree`'s wrapper), sparsify's default."""
        cfg = self.cfg
        alias = {id(w): rows for w, rows in enc_rows}
        named = [(name, alias.get(id(p), p)) for name, p in sae.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        if cfg.optimizer == "signum":
            factor = [signum_steps.get(name, 1.0) for name, _ in named]
            groups = [{"params": [p for p, f in zip(params, factor) if f == u], "unit": u} for u in sorted(set(factor))]
            optimizer = ScheduleFreeWrapper(torch.optim.SGD(groups, lr=cfg.lr), momentum=cfg.momentum)
            optimizer.train()
            return optimizer
        return torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                fused=cfg.kernels != "reference")

    def step(self, batch: dict[str, torch.Tensor], lr: float) -> None:
        """Each site is scaled (and its variance taken) once per scale, however many SAEs read it."""
        with tf32_products(self.cfg.precision == "tf32"):  # forward and backward products alike
            self._step(batch, lr)

    def _step(self, batch: dict[str, torch.Tensor], lr: float) -> None:
        t = self.trainer
        scaled: dict[tuple[str, float], torch.Tensor] = {}

        def view(site: str, c: float) -> torch.Tensor:
            if (site, c) not in scaled:
                scaled[site, c] = batch[site].to(t.device) / c
            return scaled[site, c]

        pre = {}
        for group in self.groups:
            with self._autocast():
                pre.update(group.pre_activations(view(group.site, group.scale), self.workspace))
        # each target's variance over the whole batch, once per target: loss "fvu" divides by it,
        # and one process's metrics read it (data-parallel, average_step's one collective gives it)
        fvu = self.cfg.loss == "fvu"
        singles = [m for m in t.members if not m.multi]
        targets = dict.fromkeys((m.target, m.scale) for m in singles)  # in suite order: the same collectives on every rank
        var = {key: self._variance(view(*key)) for key in targets} if fvu or t.split.solo else {}
        outs = {m.name: self._backward(m, view(m.site, m.scale), view(m.target, m.scale), pre.get(m.name),
                                       var[m.target, m.scale] if fvu else None) for m in singles}
        if not t.split.solo:
            var = average_step(t.split, [m.sae for m in singles], list(outs.values()), scaled)
        for m in t.members:
            if m.multi:  # one member at a time: its graph spans every layer
                out = self._backward_multi(m, view)
                self._update(m, out, out["var"], lr)
            else:
                self._update(m, outs[m.name], var[m.target, m.scale], lr)

    def _autocast(self):
        """bfloat16: the forward's products under autocast; the fast paths' hand-written backward
        products follow the dtype their forward saw (fast.compute_dtype)."""
        return torch.autocast(self.trainer.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bfloat16")

    def _backward(self, m: Member, x: torch.Tensor, y: torch.Tensor, pre: torch.Tensor | None,
                  variance: torch.Tensor | None = None) -> dict:
        """The loss and its gradient on this rank's batch; the graph is freed before the next SAE.
        With `variance` (loss "fvu"), the gradient is the objective's over it."""
        t = self.trainer
        coeff = m.coefficient(t.step, t.coeff_warmup)
        with self._autocast():
            out = m.sae.training_loss(x, y, coeff, dead=m.since_fired >= t.dead_tokens,
                                       path=self.cfg.kernels, workspace=self.workspace, pre=pre)
        m.sae.zero_grad(set_to_none=True)
        (out["loss"] if variance is None else out["loss"] / variance).backward()
        out.update(loss=out["loss"].detach(), mse=out["mse"].detach(), coeff=coeff, batch=x.shape[0])
        return out

    def _backward_multi(self, m: Member, view) -> dict:
        """A cross-layer transcoder's or crosscoder's loss and gradient: each site scaled by its own
        C, each output's error over its own variance (loss "fvu"); "var" is their sum, so the
        logged FVU is the share of all outputs' variance left unexplained."""
        t, d = self.trainer, m.sae
        xs = [view(s, c) for s, c in zip(d.cfg.sites_in, m.scales_in)]
        ys = [view(s, c) for s, c in zip(d.cfg.sites_out, m.scales_out)]
        var = [self._variance(y) for y in ys]
        coeff = m.coefficient(t.step, t.coeff_warmup)
        if m.l0_from is not None:
            target = t.plan_by_name[m.name].value
            d.set_l0([decayed(t.step, start, target, m.l0_decay) for start in m.l0_from])
        with self._autocast():
            out = d.training_loss(xs, ys, coeff, dead=m.since_fired >= t.dead_tokens, path=self.cfg.kernels,
                                  variances=var if self.cfg.loss == "fvu" else None,
                                  workspaces=self.group_workspaces[m.name])
        d.zero_grad(set_to_none=True)
        out["loss"].backward()
        out.update(loss=out["loss"].detach(), coeff=coeff, batch=xs[0].shape[0], var=torch.stack(var).sum())
        return out

    def _variance(self, y: torch.Tensor) -> torch.Tensor:
        """The whole batch's total variance of y (data-parallel: over every rank's rows), so that
        each rank's FVU gradient is its share of one process's."""
        split = self.trainer.split
        return split.mean_rows((y - split.mean_rows(y)).pow(2).sum(-1, keepdim=True)).squeeze(0)

    def _update(self, m: Member, out: dict, var: torch.Tensor, lr: float) -> None:
        optimizer = self.optimizers[m.name]
        lr = lr * m.lr_factor
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("unit", 1.0)
        rows = self._decoder_rows(out)
        m.sae.remove_parallel_grad(rows)
        for w, alias in self.enc_rows[m.name]:
            alias.grad = w.grad.t()
        if self.cfg.optimizer == "signum":
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad.sign_()
        optimizer.step()
        m.sae.apply_constraints(rows)
        m.record(self.trainer.step, loss=out["loss"], mse=out["mse"], l0=out["l0"], fired=out["fired"], var=var,
                 coeff=out["coeff"], lr=lr, rows=out["batch"] * self.trainer.split.world)

    def _decoder_rows(self, out: dict) -> torch.Tensor | None:
        """The decoder rows a step can move, when the decoder-norm step may touch only those.
        A row's gradient is zero unless its latent fired (or AuxK decoded it), and with β1 = 0
        Adam leaves a zero-gradient row exactly where it was; gathering rows costs a few dense
        passes' worth each, so this pays when at most a quarter fire (wide SAEs: at 2^20 latents
        and L0 50, a batch of 4096 reaches about 18% of them)."""
        if self.cfg.kernels == "reference" or self.cfg.optimizer != "adam" or self.cfg.adam_beta1 != 0:
            return None
        return few_touched(out)

    def state(self, m: Member) -> dict:
        """Of a dictionary whose latents are split over ranks, the whole's (every rank's slices
        gathered), so that its checkpoint is one process's and resumes on any rank count."""
        saved = self.optimizers[m.name].state_dict()
        shard = getattr(m.sae, "shard", None)
        return saved if shard is None else self._per_latent(m, saved, lambda t, axis: shard.gather_latents(t, dim=axis))

    def load_state(self, m: Member, saved: dict) -> None:
        optimizer = self.optimizers[m.name]
        shard = getattr(m.sae, "shard", None)
        if shard is not None:
            lo, hi = shard.bounds(m.sae.full_width)
            saved = self._per_latent(m, saved, lambda t, axis: t[lo:hi] if axis == 0 else t[..., lo:hi])
        optimizer.load_state_dict(saved)
        if self.cfg.optimizer == "signum":
            optimizer.train_mode = True  # the checkpoint holds the training point y, not the average

    def _per_latent(self, m: Member, saved: dict, fn) -> dict:
        """`saved` (an optimizer state) with fn(tensor, latent axis) applied to each per-latent
        state tensor: those of the groups' encoders (stepped as latent-major rows), biases,
        thresholds and decoders; the rest (b_dec, step counts) is the same on every rank."""
        names = {id(p): name for name, p in m.sae.named_parameters()}
        names.update({id(alias): name for name, p in m.sae.named_parameters()
                      for w, alias in self.enc_rows[m.name] if w is p})
        axes = {"W_enc": 0, "b_enc": 0, "theta": 0, "W_dec": 0}
        state = dict(saved["state"])
        for group, saved_group in zip(self.optimizers[m.name].param_groups, saved["param_groups"]):
            for p, index in zip(group["params"], saved_group["params"]):
                axis = axes.get(names[id(p)].rsplit(".", 1)[-1])
                if axis is not None and index in state:
                    state[index] = {k: fn(v, axis) if torch.is_tensor(v) and v.dim() else v for k, v in state[index].items()}
        return {**saved, "state": state}

    def sync(self, m: Member) -> None:
        """Signum: the run is over and the SAE becomes the schedule-free average (what its
        authors evaluate), each decoder row made unit again where that changes no code."""
        if self.cfg.optimizer == "signum":
            self.optimizers[m.name].eval()
            m.sae.unit_decoder_rows()


@contextmanager
def tf32_products(enabled: bool):
    """TensorFloat-32 for CUDA float32 products while the block runs, then the setting as it was."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed
