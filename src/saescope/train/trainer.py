"""Many SAEs from one activation stream, by the Gemma Scope recipe (SPEC §2).

Every SAE of a suite sees the same shuffled batches (one read of the store, or one harvest),
each with its own Adam state and sparsity schedule. Under torchrun the same loop runs on every
rank, data-parallel or SAE-sharded (distributed.py). A checkpoint is a folder: one file per SAE
(weights, optimizer and controller states, dead-latent counters) under `step-N/`, committed by
`state.json` once every rank has written its files; the data position is the step, since the
stream is a deterministic function of the seed and the data parts, so a resumed run replays it
and skips ahead."""

from __future__ import annotations

import io
import json
import math
import shutil
import time
import zlib
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import SAESpec, TrainConfig
from ..errors import SaescopeError, first_line
from ..files import atomic_write, read_json, write_json
from ..sae import SAEConfig, SparseAutoencoder, build_sae
from ..sae.fast import Workspace, compute_dtype, product
from ..sae.formats import width_label
from ..site import Site
from .distributed import Ranks, assign, joined
from .schedule import TargetL0, coeff_at, lr_at, warmup_steps

CHECKPOINT = "checkpoint"        # folder: state.json + step-N/<sae>.pt
STATE = "state.json"
METRICS = "metrics.jsonl"
PART_SEED = 1_000_003            # data part p shuffles with seed + p·PART_SEED


@dataclass
class Member:
    """One SAE of the suite with everything that trains it. Per-step state stays in tensors; the
    host reads it only when it logs or checkpoints."""

    name: str
    sae: SparseAutoencoder
    site: str
    target: str
    scale: float                # C: the SAE sees activations / C
    coeff: float                # λ after warm-up (unused under a target-L0 controller)
    optimizer: torch.optim.Adam   # steps W_enc through `enc_rows` (see Trainer._optimizer)
    since_fired: torch.Tensor   # tokens since each latent last fired
    controller: TargetL0 | None = None
    sums: dict = field(default_factory=dict)  # metrics accumulated since the last log line
    steps: int = 0                            # steps in `sums`
    bad_step: torch.Tensor | None = None     # first step with a non-finite loss (−1: none)
    bad_loss: torch.Tensor | None = None
    enc_rows: torch.Tensor | None = None     # W_enc's contiguous transpose, the tensor Adam steps


@dataclass
class EncoderGroup:
    """SAEs of a suite that read the same input, stepped together: their encoders are slices of one
    latent-major matrix, so one product gives all their pre-activations, each SAE's pre-encoder
    bias folded into its bias, (x − b_dec)·W_enc + b_enc = x·W_enc + (b_enc − b_dec·W_enc).

    Where it pays: on a 2-core CPU it does not (six SAEs, batch 2048, d_in 640, widths 1024 to
    16384: grouped steps within ±4% of separate ones, run to run, i.e. noise; a CPU product is
    efficient at these sizes already), so the CPU steps them apart. On accelerators, where one
    small product leaves most of the chip idle and each costs a launch, they are grouped (not
    measured here: no GPU was lent yet)."""

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


def member_name(spec: SAESpec, site: str, width: int, value: float | int) -> str:
    kind = f"{spec.arch}-tc" if spec.transcoder else spec.arch
    if spec.arch in ("topk", "batchtopk"):
        tag = f"k{value}"
    elif spec.target_l0:
        tag = f"l0_{value:g}"
    else:
        tag = f"lam{value:g}"
    options = ("-logtheta" if spec.arch == "jumprelu" and spec.theta_param == "log" else "") + (
        "-bzeros" if spec.b_dec_init == "zeros" else "")
    return f"{site}-{kind}-{width_label(width)}-{tag}{options}"


def expand(cfg: TrainConfig) -> list[tuple[str, SAESpec, str, str, int, float]]:
    """(name, spec, site, target site, width, λ / k / target L0) for every SAE of the suite."""
    out = []
    for spec in cfg.saes:
        values = spec.ks if spec.arch in ("topk", "batchtopk") else (spec.target_l0 or spec.lambdas)
        if spec.target_l0 and spec.arch != "jumprelu":
            raise SaescopeError(f"target_l0 is for jumprelu SAEs; {spec.arch} sets sparsity with ks or lambdas")
        for site in spec.sites:
            target = site
            if spec.transcoder:
                s = Site.parse(site)
                if s.kind != "mlp_in":
                    raise SaescopeError(f"a transcoder reads mlp_in.L, not {site}")
                target = str(Site("mlp", s.layer))
            for width in spec.widths:
                for value in values:
                    out.append((member_name(spec, site, width, value), spec, site, target, width, value))
    names = [o[0] for o in out]
    if len(set(names)) != len(names):
        raise SaescopeError("the suite lists the same SAE twice: " + ", ".join(sorted({n for n in names if names.count(n) > 1})))
    return out


class Trainer:
    def __init__(self, cfg: TrainConfig, out: str | Path, source=None, *, model_name: str | None = None,
                 ranks: Ranks | None = None):
        self.cfg = cfg
        self.out = Path(out)
        self.ranks = ranks or Ranks(device=torch.device(cfg.device))
        self.device = self.ranks.device
        self.sharded = not self.ranks.solo and cfg.parallel.mode == "sae"
        self.split = self.ranks.alone() if self.sharded else self.ranks  # the ranks each batch is split over
        self.plan = expand(cfg)
        self.saved = self._saved_state()
        self.source = source if source is not None else _open_source(cfg, self.ranks)
        self.plan_sites = _sites(self.plan)
        missing = [s for s in self.plan_sites if s not in self.source.sites]
        if missing:
            raise SaescopeError(f"the activation source has no {', '.join(missing)}; it holds {', '.join(self.source.sites)}")
        self.model_name = model_name or getattr(self.source, "model_name", None)
        self.steps = cfg.tokens // cfg.batch_size
        if self.steps < 1:
            raise SaescopeError(f"tokens ({cfg.tokens}) must cover at least one batch of {cfg.batch_size}")
        self.lr_warmup = warmup_steps(cfg.lr_warmup_steps, self.steps, 1000, 0.05)
        self.coeff_warmup = warmup_steps(cfg.lambda_warmup_steps, self.steps, 10_000, 0.2)
        self.dead_tokens = cfg.dead_tokens or min(10_000_000, max(cfg.tokens // 10, cfg.batch_size))
        # which SAEs this rank trains, which sites it reads, which data parts it makes
        self.gather = self.sharded and self.source.produced
        self.own = set(self._owned())
        reads = [p for p in self.plan if p[0] in self.own] if self.sharded and not self.gather else self.plan
        self.sites = _sites(reads)
        self.parts = self._data_parts()
        spread = not self.sharded or self.gather
        self.local_parts = list(range(self.ranks.rank, self.parts, self.ranks.world) if spread else range(self.parts))
        self.views = {p: self.source.part(p, self.parts) for p in self.local_parts}
        self.members: list[Member] = []
        self.step = 0
        self._bad_batch = {site: torch.tensor(-1) for site in self.sites}  # first step with NaN/Inf input
        self.workspace = Workspace()  # the SAEs step one after another, so they share buffers
        self.groups: list[EncoderGroup] = []

    # --- who does what -------------------------------------------------------------------------
    def _owned(self) -> list[str]:
        if not self.sharded:
            return [p[0] for p in self.plan]
        sizes = [(name, frozenset((site, target)), width * (2 * self.source.d_in(site)))
                 for name, _, site, target, width, _ in self.plan]
        return assign(sizes, self.ranks.world)[self.ranks.rank]

    def _data_parts(self) -> int:
        """How many parts each global batch is made of: fixed for a run (its checkpoint says)."""
        world, asked = self.ranks.world, self.cfg.parallel.data_parts
        saved = self.saved["parts"] if self.saved else None
        if asked and saved and asked != saved:
            raise SaescopeError(f"{self.out} holds a run with {saved} data parts; a run keeps its data parts "
                                f"(leave data_parts unset, or set it to {saved})")
        # sharded, from a store: each rank reads whole batches itself, so one part is enough
        parts = asked or saved or (1 if self.sharded and not self.gather else world)
        if self.cfg.batch_size % parts:
            raise SaescopeError(f"batch_size {self.cfg.batch_size} does not split into {parts} equal data parts")
        if (not self.sharded or self.gather) and parts % world:
            why = f"the checkpoint of step {self.saved['step']} in {self.out} was made of" if saved else "each batch is made of"
            raise SaescopeError(f"{why} {parts} data parts, which {world} ranks cannot share evenly; "
                                f"use a number of ranks that divides {parts}"
                                + ("" if self.sharded else ", or SAE-sharded mode (parallel.mode = 'sae')"))
        return parts

    # --- set-up --------------------------------------------------------------------------------
    def build(self, first_batch: dict[str, torch.Tensor]) -> None:
        scalars = self.norm_scalars
        for name, spec, site, target, width, value in self.plan:
            if name not in self.own:
                continue
            d_in = first_batch[site].shape[1]
            sae_cfg = SAEConfig(
                arch=spec.arch, d_in=d_in, d_sae=width, d_out=first_batch[target].shape[1] if spec.transcoder else None,
                site=site, target_site=target if spec.transcoder else None, model=self.model_name,
                k=int(value) if spec.arch in ("topk", "batchtopk") else None,
                theta_param=spec.theta_param, bandwidth=spec.bandwidth)
            sae = build_sae(sae_cfg)
            # seeded by name: an SAE starts the same whether trained alone or within any suite
            sae.init_weights(torch.Generator().manual_seed(self.cfg.seed * 2**32 + zlib.crc32(name.encode())))
            # SPEC §2: SAEs see x / C with E‖x/C‖² = 1; transcoders divide input and target by √d_model
            c = math.sqrt(d_in) if spec.transcoder else scalars[site]
            sae.norm_scalar.fill_(c)
            sae.pre_encoder_bias.fill_(not spec.transcoder)
            if spec.b_dec_init == "mean":
                with torch.no_grad():
                    sae.b_dec.copy_(self.split.mean_rows(first_batch[target].to(self.device) / c))
            sae = sae.to(self.device)
            if spec.arch == "batchtopk" and not self.split.solo:
                sae.across = self.split  # the k·batch largest of the whole batch, not of this rank's share
            controller = None
            if spec.target_l0:  # λ starts at the first listed value and then follows L0
                controller = TargetL0(target=float(value), log_lambda=math.log(spec.lambdas[0]), gain=self.cfg.target_l0_gain,
                                      device=self.device)
            coeff = float(value) if spec.arch in ("jumprelu", "relu") and not spec.target_l0 else 0.0
            self.members.append(Member(name, sae, site, target, c, coeff, None,
                                       torch.zeros(width, dtype=torch.long, device=self.device), controller,
                                       bad_step=torch.tensor(-1, device=self.device),
                                       bad_loss=torch.tensor(0.0, device=self.device)))
        if self.cfg.kernels != "reference":
            self.groups = EncoderGroup.form(self.members, self.device)
        for m in self.members:  # after grouping, which gives some SAEs a new W_enc parameter
            m.enc_rows = m.sae.W_enc.detach().t()
            m.optimizer = self._optimizer(m.sae, m.enc_rows)

    @cached_property
    def norm_scalars(self) -> dict[str, float]:
        """C per input site. A store's (or memory's) is exact and the same on every rank; a harvest
        estimates it from its first rows (so `run` asks before the first batch fills the shuffle
        buffer), and every rank takes data part 0's (rank 0's) estimate."""
        sites = sorted({p[2] for p in self.plan if not p[1].transcoder})
        if not self.source.produced:
            return {s: self.source.norm_scalar(s) for s in sites if s in self.sites}
        view = self.views[self.local_parts[0]]
        return dict(zip(sites, self.ranks.broadcast([view.norm_scalar(s) for s in sites])))

    def _optimizer(self, sae: SparseAutoencoder, enc_rows: torch.Tensor) -> torch.optim.Adam:
        """Adam over the SAE's parameters, W_enc seen through its contiguous transpose `enc_rows`
        (it is stored latent-major, see SparseAutoencoder): torch's fused Adam copies a
        non-contiguous tensor in and out, measured 54 against 13 ms a step for a 640 × 16384
        encoder. The alias shares the parameter's memory; `_step_member` hands it W_enc's
        gradient, transposed (a view)."""
        params = [enc_rows if p is sae.W_enc else p for p in sae.parameters()]
        # fused: one pass over each parameter (11 ms against 95 ms for a 640 × 16384 SAE's step);
        # the reference path keeps torch's plain loop
        return torch.optim.Adam(params, lr=self.cfg.lr, eps=self.cfg.adam_eps, betas=(self.cfg.adam_beta1, self.cfg.adam_beta2),
                                fused=self.cfg.kernels != "reference")

    def _buffer_rows(self) -> int:
        """Each part's shuffle buffer: the configured (or memory-sized) total over the parts, the
        same on every rank and kept by the checkpoint, so that the batches replay exactly."""
        if self.saved:
            return self.saved["buffer_rows"]
        total = self.cfg.buffer_rows or self.source.default_buffer(self.plan_sites)
        return int(self.ranks.broadcast([max(total // self.parts, 1)])[0])

    def _batches(self):
        """Global batches (or this rank's share of each, data-parallel): one batch of
        batch_size / parts rows from each local part, side by side."""
        per = self.cfg.batch_size // self.parts
        self.buffer_rows = self._buffer_rows()
        streams = []
        for p, view in self.views.items():
            rows = view.n_rows(self.sites[0]) if hasattr(view, "n_rows") else None
            epochs = max(1, math.ceil(self.steps * per / rows)) if rows else 1
            streams.append(view.batches(per, sites=self.sites, seed=self.cfg.seed + p * PART_SEED, epochs=epochs,
                                        buffer_rows=self.buffer_rows, drop_last=True))
        if len(streams) == 1 and not self.gather:
            return streams[0]
        return self._side_by_side(streams)

    def _side_by_side(self, streams):
        per, world = self.cfg.batch_size // self.parts, self.ranks.world
        made = [p for r in range(world) for p in range(r, self.parts, world)]  # rank r made parts r, r + world, …
        order = torch.tensor(sorted(range(self.parts), key=made.__getitem__))
        for parts in zip(*streams):
            batch = {s: torch.cat([b[s] for b in parts]) if len(parts) > 1 else parts[0][s] for s in self.sites}
            if self.gather:  # every rank's parts, put in part order (NCCL gathers device tensors)
                batch = {s: torch.cat(self.ranks.gather_rows(x.to(self.device))).view(self.parts, per, -1)[order]
                         .view(-1, x.shape[1]) for s, x in batch.items()}
            yield batch

    # --- checkpoints ---------------------------------------------------------------------------
    def _saved_state(self) -> dict | None:
        """The committed checkpoint's record, after checking it belongs to this run."""
        if (self.out / "checkpoint.pt").is_file():
            raise SaescopeError(f"{self.out / 'checkpoint.pt'} is a checkpoint of an earlier saescope (one file); "
                                "finish that run with the version that wrote it, or move it away to start over")
        path = self.out / CHECKPOINT / STATE
        if not path.is_file():
            return None
        state = read_json(path)
        if state.get("config") != _resumable(self.cfg):
            raise SaescopeError(f"{self.out} holds a run with another configuration; use another output folder")
        return state

    def _save_checkpoint(self) -> None:
        """Each rank writes its SAEs' files (data-parallel: rank 0 all of them, they are the same on
        every rank); once all have, rank 0 commits them in state.json and drops older steps."""
        root = self.out / CHECKPOINT
        folder = f"step-{self.step:08d}"
        try:
            for m in self.members if self.sharded or self.ranks.lead else ():
                buf = io.BytesIO()
                torch.save(self._member_state(m), buf)
                atomic_write(root / folder / f"{m.name}.pt", buf.getvalue())
        except OSError as exc:  # a full disk: the last committed checkpoint is untouched
            shutil.rmtree(root / folder, ignore_errors=True)
            kept = self.saved["step"] if self.saved else None
            raise SaescopeError(f"cannot write the checkpoint of step {self.step} in {root} "
                                f"({exc.strerror or first_line(exc)}); {_kept(kept)}: make room and rerun to resume") from None
        self.ranks.barrier()
        if self.ranks.lead:
            self.saved = {"format": 2, "step": self.step, "folder": folder, "parts": self.parts,
                          "buffer_rows": self.buffer_rows, "ranks": self.ranks.world,
                          "mode": "sae" if self.sharded else "data", "config": _resumable(self.cfg)}
            write_json(root / STATE, self.saved)
            for old in root.glob("step-*"):
                if old.name != folder:
                    shutil.rmtree(old, ignore_errors=True)

    def _load_checkpoint(self) -> bool:
        if not self.saved:
            return False
        folder = self.out / CHECKPOINT / self.saved["folder"]
        for m in self.members:
            path = folder / f"{m.name}.pt"
            try:
                s = torch.load(path, map_location=self.device, weights_only=True)
            except FileNotFoundError:
                raise SaescopeError(f"checkpoint file missing: {path}; move {self.out / CHECKPOINT} away to start over") from None
            except Exception as exc:  # torch raises several types for a damaged file
                raise SaescopeError(f"checkpoint {path} cannot be read ({first_line(exc)}); "
                                    f"move {self.out / CHECKPOINT} away to start over") from None
            self._restore_member(m, s)
        self.step = self.saved["step"]
        return True

    def _member_state(self, m: Member) -> dict:
        """What a checkpoint holds of one SAE (tensors and strings only: loaded with weights_only)."""
        return {"sae": m.sae.state_dict(), "sae_config": json.dumps(m.sae.cfg.to_dict()),
                "optimizer": self._optimizer_state(m), "since_fired": m.since_fired,
                "controller": json.dumps(m.controller.state() if m.controller else None)}

    def _optimizer_state(self, m: Member) -> dict:
        return m.optimizer.state_dict()

    def _restore_optimizer(self, m: Member, saved: dict) -> None:
        m.optimizer.load_state_dict(saved)

    def _restore_member(self, m: Member, s: dict) -> None:
        m.sae.load_state_dict(s["sae"])
        self._restore_optimizer(m, s["optimizer"])
        m.since_fired.copy_(s["since_fired"])
        ctl = json.loads(s["controller"])
        if ctl:
            m.controller = TargetL0(**ctl, device=self.device)

    # --- the loop ------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> list[Path]:
        lead = self.ranks.lead
        self.out.mkdir(parents=True, exist_ok=True)
        if lead:
            write_json(self.out / "train_config.json", self.cfg.model_dump(mode="json"))
        stream = self._batches()
        self.norm_scalars  # noqa: B018 — estimated from a harvest's first rows, before the buffer takes them
        first = next(stream, None)
        if first is None:
            raise SaescopeError("the activation source gave no batch; it holds fewer rows than one batch")
        torch.manual_seed(self.cfg.seed)
        self.build(first)
        resumed = self._load_checkpoint()
        if lead:  # lines logged after the checkpoint (a killed run) are logged again as the run replays
            _metrics_until(self.out / METRICS, self.step)
        if resumed:  # the stream is a function of the seed: replay it up to the checkpoint's step
            stream = islice(stream, self.step - 1, None)
        else:
            stream = _chain_first(first, stream)
        bar = tqdm(total=self.steps * self.cfg.batch_size, initial=self.step * self.cfg.batch_size, unit="tok",
                   unit_scale=True, desc=f"train {len(self.plan)} SAEs" + (f" on {self.ranks.world} ranks" if not self.ranks.solo else ""),
                   disable=not progress or not lead)
        last_good = self.step if resumed else None
        start, start_step = time.perf_counter(), self.step
        with (self.out / METRICS).open("a") if lead else nullcontext() as log:
            while self.step < self.steps:
                batch = next(stream, None)
                if batch is None:
                    raise SaescopeError(f"the activation source ran out at step {self.step} of {self.steps}")
                self.train_step(batch)
                self.step += 1
                bar.update(self.cfg.batch_size)
                if self.step % self.cfg.log_every == 0 or self.step == self.steps:
                    self._check_finite(last_good)
                    rate = (self.step - start_step) * self.cfg.batch_size / max(time.perf_counter() - start, 1e-9)
                    self._log(log, rate, bar)
                if self.cfg.checkpoint_every and self.step % self.cfg.checkpoint_every == 0:
                    self._check_finite(last_good)
                    self._save_checkpoint()
                    last_good = self.step
        bar.close()
        self._check_finite(last_good)
        self._save_checkpoint()
        return self._write_saes()

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """One step of every SAE on the same batch. Each site is scaled (and its variance taken)
        once per scale, however many SAEs read it."""
        with _tf32(self.cfg.precision == "tf32"):  # forward and backward products alike
            self._train_step(batch)

    def _note_bad_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Remember the first step with non-finite activations (read at the next check)."""
        for site in self.sites:
            bad = ~torch.isfinite(batch[site]).all() & (self._bad_batch[site] < 0)
            self._bad_batch[site] = torch.where(bad, self.step, self._bad_batch[site])

    def _train_step(self, batch: dict[str, torch.Tensor]) -> None:
        lr = lr_at(self.step, self.cfg.lr, self.lr_warmup)
        self._note_bad_batch(batch)
        scaled: dict[tuple[str, float], torch.Tensor] = {}

        def view(site: str, c: float) -> torch.Tensor:
            if (site, c) not in scaled:
                scaled[site, c] = batch[site].to(self.device) / c
            return scaled[site, c]

        pre = {}
        for group in self.groups:
            with self._autocast():
                pre.update(group.pre_activations(view(group.site, group.scale), self.workspace))
        outs = [self._backward(m, view(m.site, m.scale), view(m.target, m.scale), lr, pre.get(m.name))
                for m in self.members]
        if self.split.solo:
            var = {key: (x - x.mean(0)).pow(2).sum(-1).mean() for key, x in scaled.items()}
        else:
            var = self._average(outs, scaled)
        for m, out in zip(self.members, outs):
            self._update(m, out, var[m.target, m.scale], lr)

    def _autocast(self):
        """bfloat16: the forward's products under autocast; the fast paths' hand-written backward
        products follow the dtype their forward saw (fast.compute_dtype)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bfloat16")

    def _backward(self, m: Member, x: torch.Tensor, y: torch.Tensor, lr: float, pre: torch.Tensor | None) -> dict:
        """The loss and its gradient on this rank's batch; the graph is freed before the next SAE."""
        coeff = m.controller.coeff if m.controller else coeff_at(self.step, m.coeff, self.coeff_warmup)
        with self._autocast():
            out = m.sae.training_loss(x, y, coeff, dead=m.since_fired >= self.dead_tokens,
                                       path=self.cfg.kernels, workspace=self.workspace, pre=pre)
        m.sae.zero_grad(set_to_none=True)
        out["loss"].backward()
        out.update(loss=out["loss"].detach(), mse=out["mse"].detach(), coeff=coeff, batch=x.shape[0])
        return out

    def _update(self, m: Member, out: dict, var: torch.Tensor, lr: float) -> None:
        loss, mse = out["loss"], out["mse"]
        bad = ~torch.isfinite(loss) & (m.bad_step < 0)
        m.bad_step = torch.where(bad, self.step, m.bad_step)
        m.bad_loss = torch.where(bad, loss, m.bad_loss)
        for group in m.optimizer.param_groups:
            group["lr"] = lr
        rows = self._decoder_rows(out)
        m.sae.remove_parallel_grad(rows)
        m.enc_rows.grad = m.sae.W_enc.grad.t()
        m.optimizer.step()
        m.sae.apply_constraints(rows)
        m.since_fired.add_(out["batch"] * self.split.world).masked_fill_(out["fired"], 0)
        if m.controller:
            m.controller.update(out["l0"])
        for key, value in (("loss", loss), ("mse", mse), ("l0", out["l0"]), ("fvu", mse / var),
                           ("lambda", out["coeff"]), ("lr", lr)):
            m.sums[key] = m.sums.get(key, 0.0) + value
        m.steps += 1

    def _average(self, outs: list[dict], scaled: dict) -> dict:
        """Data-parallel: make this rank's step the whole batch's, for every SAE at once (one
        all-reduce of the small statistics, then the gradients in buckets). Each rank's loss is a
        mean over an equal share, so the batch's gradient is the mean of the ranks' gradients; a
        latent fired if it fired anywhere. Where at most a quarter of an SAE's latents were
        touched, only their encoder and decoder rows are sent: every other row's gradient is zero
        on every rank. Returns each input's variance over the whole batch (for FVU)."""
        stats = []
        for out in outs:
            touched = out.get("touched", out["fired"])
            stats += [out["fired"].double(), touched.double(), torch.stack([out["l0"], out["loss"], out["mse"]]).double()]
        for x in scaled.values():
            stats += [x.sum(0, dtype=torch.float64), x.double().pow(2).sum().view(1)]
        flat = self.split.sum_(torch.cat(stats))
        world, start, grads, picked = self.split.world, 0, [], []
        for m, out in zip(self.members, outs):
            width = m.sae.cfg.d_sae
            out["fired"], out["touched"] = flat[start:start + width] > 0, flat[start + width:start + 2 * width] > 0
            out["l0"], out["loss"], out["mse"] = (flat[start + 2 * width:start + 2 * width + 3] / world).float().unbind()
            start += 2 * width + 3
            rows = _few_touched(out)
            for p in m.sae.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grad = p.grad.t() if p is m.sae.W_enc else p.grad  # W_enc's rows are latents, as W_dec's
                if rows is not None and (p is m.sae.W_enc or p is m.sae.W_dec):
                    picked.append((grad, rows, grad[rows]))
                else:
                    grads.append(grad)
        self.split.average_(grads + [g for _, _, g in picked])
        for grad, rows, rows_grad in picked:
            grad.index_copy_(0, rows, rows_grad)
        var = {}
        for key, x in scaled.items():
            d, n = x.shape[1], x.shape[0] * world
            moments = flat[start:start + d + 1]
            var[key] = moments[d] / n - (moments[:d] / n).pow(2).sum()
            start += d + 1
        return var

    def _decoder_rows(self, out: dict) -> torch.Tensor | None:
        """The decoder rows a step can move, when the decoder-norm step may touch only those.
        A row's gradient is zero unless its latent fired (or AuxK decoded it), and with β1 = 0
        Adam leaves a zero-gradient row exactly where it was; gathering rows costs a few dense
        passes' worth each, so this pays when at most a quarter fire (wide SAEs: at 2^20 latents
        and L0 50, a batch of 4096 reaches about 18% of them)."""
        if self.cfg.kernels == "reference" or self.cfg.adam_beta1 != 0:
            return None
        return _few_touched(out)

    def _check_finite(self, last_good: int | None) -> None:
        """Stop on the first NaN or Inf seen since the last check (one read from the device; under
        torchrun one small all-reduce, so that every rank stops at once with the same message)."""
        sites = self.plan_sites
        mine = {m.name: m for m in self.members}
        local = [int(self._bad_batch[s]) if s in self._bad_batch else -1 for s in sites]
        local += [int(mine[p[0]].bad_step) if p[0] in mine else -1 for p in self.plan]
        first = self.ranks.first(local)
        for site, step in zip(sites, first):
            if step >= 0:
                raise SaescopeError(f"NaN or Inf in the activations of {site} at step {step}; {_kept(last_good)}")
        for p, step in zip(self.plan, first[len(sites):]):
            if step >= 0:
                m = mine.get(p[0])
                loss = f"{float(m.bad_loss)}" if m is not None and int(m.bad_step) == step else "not finite"
                raise SaescopeError(f"{p[0]}: the loss is {loss} at step {step}; {_kept(last_good)}")

    def _log(self, log, rate: float, bar) -> None:
        lines, shown = [], None
        for m in self.members:
            line = {"sae": m.name, "step": self.step, "tokens": self.step * self.cfg.batch_size,
                    **{k: float(v) / max(m.steps, 1) for k, v in m.sums.items()},
                    "dead_fraction": float((m.since_fired >= self.dead_tokens).float().mean()), "tokens_per_s": rate}
            lines.append(json.dumps(line) + "\n")
            m.sums.clear()
            m.steps = 0
            shown = shown or f"{m.name}: L0 {line.get('l0', float('nan')):.1f}, FVU {line.get('fvu', float('nan')):.3f}"
        if self.sharded:  # every rank's lines, in the suite's order
            by_name = {json.loads(line)["sae"]: line for text in self.ranks.gather_text("".join(lines))
                       for line in text.splitlines(keepends=True)}
            lines = [by_name[p[0]] for p in self.plan] if by_name else []
        if log is not None:
            log.writelines(lines)
            log.flush()
        bar.set_postfix_str(shown, refresh=False)

    def _write_saes(self) -> list[Path]:
        """Data-parallel: rank 0 writes every SAE; sharded: each rank its own."""
        self.ranks.barrier()  # rank 0 has written the last metrics lines
        final = _last_metrics(self.out / METRICS)
        for m in self.members if self.sharded or self.ranks.lead else ():
            m.sae.cfg.extra = {"training": json.loads(self.cfg.model_dump_json()), "final_metrics": final.get(m.name, {}),
                               "steps": self.step}
            m.sae.cpu().save(self.out / "saes" / m.name, format="native")
        self.ranks.barrier()
        return [self.out / "saes" / p[0] for p in self.plan]


@contextmanager
def _tf32(enabled: bool):
    """TensorFloat-32 for CUDA float32 products while the block runs, then the setting as it was."""
    allowed = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled or allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allowed


def _sites(plan: list) -> list[str]:
    """The input and target sites a part of the suite reads."""
    return sorted({p[2] for p in plan} | {p[3] for p in plan})


def _few_touched(out: dict) -> torch.Tensor | None:
    """The latents a step's gradient reached, when at most a quarter were (else None); kept in
    `out`, so the all-reduce and the decoder-norm step read the mask once."""
    if "few_touched" not in out:
        touched = out.get("touched", out["fired"])
        out["few_touched"] = (touched.nonzero().squeeze(1) if int(touched.count_nonzero()) <= touched.numel() // 4
                              else None)
    return out["few_touched"]


def _kept(last_good: int | None) -> str:
    return (f"stopped; the checkpoint of step {last_good} is kept" if last_good is not None
            else "stopped before the first checkpoint")


def _chain_first(first, rest):
    yield first
    yield from rest


def _metrics_until(path: Path, step: int) -> None:
    """Keep the metrics lines of steps up to `step` (a killed run may also leave half a line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            if line.endswith("\n") and json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):
            pass
    atomic_write(path, "".join(kept).encode())


def _last_metrics(path: Path) -> dict[str, dict]:
    last: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            last[rec["sae"]] = rec
    return last


def _resumable(cfg: TrainConfig) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint: all but how the
    ranks share the work (data parts are checked on their own)."""
    return json.loads(cfg.model_dump_json(exclude={"parallel"}))


def _open_source(cfg: TrainConfig, ranks: Ranks):
    from ..data import ActivationStore, HarvestStream

    if cfg.store:
        return ActivationStore(cfg.store)
    if cfg.harvest:
        harvest = cfg.harvest
        if ranks.device.type == "cuda" and not ranks.solo:  # each rank's model on its own GPU
            harvest = harvest.model_copy(update={"device": str(ranks.device)})
        with ranks.lead_first():  # the first load fills the model cache the others then read
            return HarvestStream(harvest)
    raise SaescopeError("training needs activations: set `store` (a harvest folder) or `harvest` (stream from a model)")


def train(cfg: TrainConfig, out: str | Path, *, source=None, progress: bool = True) -> list[Path]:
    """Train every SAE of `cfg` into `out/saes/<name>/`; rerunning resumes from the checkpoint.
    Under torchrun (WORLD_SIZE > 1) every rank calls this; `cfg.parallel` says how they share."""
    if cfg.backend == "jax":
        from ..jax.trainer import JaxTrainer

        return JaxTrainer(cfg, out, source).run(progress=progress)
    with joined(cfg.parallel, cfg.device) as ranks:
        return Trainer(cfg, out, source, ranks=ranks).run(progress=progress)
