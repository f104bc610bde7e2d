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
from collections import deque
from contextlib import nullcontext
from functools import cached_property
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import TrainConfig
from ..errors import SaescopeError, first_line
from ..files import atomic_write, read_json, remove_temporaries, write_json
from ..sae import SAEConfig, build_sae
from ..sae.convert import batchtopk_to_jumprelu, fit_groups
from ..sae.formats import load_sae, save_dictionary, save_sae
from ..sae.multilayer import MultiLayerConfig, MultiLayerDictionary
from .distributed import LatentShard, Ranks, assign, data_parts, local_parts, side_by_side
from .schedule import TargetL0, lr_at, warmup_steps
from .step import SIGNUM_UNITS, Backend, Member
from .suite import expand, sites_read

CHECKPOINT = "checkpoint"        # folder: state.json + step-N/<sae>.pt
STATE = "state.json"
METRICS = "metrics.jsonl"
PART_SEED = 1_000_003            # data part p shuffles with seed + p·PART_SEED
# the last training rows a JumpReLU trained as BatchTopK gets its thresholds from: 16 batches of
# 4,096, so that a latent kept on one token in a thousand is still fitted on dozens of them
FIT_ROWS = 65_536


class Trainer:
    """The suite's loop: data, members, schedules, metrics and checkpoints; each step is the
    `backend`'s (step.py)."""

    def __init__(self, cfg: TrainConfig, out: str | Path, backend: Backend, source=None, *,
                 model_name: str | None = None, ranks: Ranks | None = None):
        self.cfg = cfg
        self.backend = backend
        self.out = Path(out)
        self.ranks = ranks or Ranks(device=torch.device(cfg.device))
        self.device = self.ranks.device
        self.sharded = not self.ranks.solo and cfg.parallel.mode == "sae"
        self.split = self.ranks.alone() if self.sharded else self.ranks  # the ranks each batch is split over
        self.plan = expand(cfg)
        self.saved = self._saved_state()
        self.source = source if source is not None else _open_source(cfg, self.ranks)
        self.plan_sites = sites_read(self.plan)
        missing = [s for s in self.plan_sites if s not in self.source.sites]
        if missing:
            raise SaescopeError(f"the activation source has no {', '.join(missing)}; it holds {', '.join(self.source.sites)}")
        multi = [p for p in self.plan if p.multi]
        if multi and not self.ranks.solo and not self.sharded:
            raise SaescopeError(f"{multi[0].name}: a cross-layer transcoder's or crosscoder's latents are split over "
                                "the ranks, each seeing whole batches: set parallel.mode = 'sae'")
        self.latent_shard = LatentShard(self.ranks) if multi and not self.ranks.solo else None
        if self.latent_shard and cfg.kernels == "reference":
            raise SaescopeError(f"{multi[0].name}: latents split over ranks train on the fast paths; set kernels to "
                                "auto, dense or sparse")
        for p in multi if self.latent_shard else ():
            self.latent_shard.bounds(p.width)  # a width the ranks cannot share is an error now, not at the first step
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
        reads = [p for p in self.plan if p.name in self.own] if self.sharded and not self.gather else self.plan
        self.sites = sites_read(reads)
        self.parts = data_parts(cfg.parallel.data_parts, self.saved, self.ranks.world, batch_size=cfg.batch_size,
                                sharded=self.sharded, gather=self.gather, out=self.out)
        self.local_parts = local_parts(self.ranks, self.parts, spread=not self.sharded or self.gather)
        self.views = {p: self.source.part(p, self.parts) for p in self.local_parts}
        self.members: list[Member] = []
        self.step = 0
        self._bad_batch = {site: torch.tensor(-1) for site in self.sites}  # first step with NaN/Inf input

    # --- who does what -------------------------------------------------------------------------
    def _owned(self) -> list[str]:
        """Every SAE (data-parallel), or this rank's share of them (sharded), and every multi-layer
        dictionary: sharded, each rank holds a slice of its latents."""
        if not self.sharded:
            return [p.name for p in self.plan]
        sizes = [(p.name, p.sites, p.width * (2 * self.source.d_in(p.site))) for p in self.plan if not p.multi]
        mine = assign(sizes, self.ranks.world, idle=len(sizes) < len(self.plan))[self.ranks.rank] if sizes else []
        return mine + [p.name for p in self.plan if p.multi]

    # --- set-up --------------------------------------------------------------------------------
    def build(self, first_batch: dict[str, torch.Tensor]) -> None:
        scalars = self.norm_scalars
        for p in self.plan:
            if p.name not in self.own:
                continue
            if p.multi:
                self.members.append(self._multi_member(p, first_batch))
                continue
            spec = p.spec
            d_in = first_batch[p.site].shape[1]
            sae_cfg = SAEConfig(
                arch=p.arch, d_in=d_in, d_sae=p.width, d_out=first_batch[p.target].shape[1] if spec.transcoder else None,
                site=p.site, target_site=p.target if spec.transcoder else None, model=self.model_name, k=p.k,
                theta_param=spec.theta_param, bandwidth=spec.bandwidth, skip=spec.skip)
            sae = build_sae(sae_cfg)
            sae.init_weights(self._generator(p))
            # SPEC §2: SAEs see x / C with E‖x/C‖² = 1; transcoders divide input and target by √d_model
            c = math.sqrt(d_in) if spec.transcoder else scalars[p.site]
            sae.norm_scalar.fill_(c)
            sae.pre_encoder_bias.fill_(not spec.transcoder)
            if spec.b_dec_init == "mean":
                with torch.no_grad():
                    sae.b_dec.copy_(self.split.mean_rows(first_batch[p.target].to(self.device) / c))
            if spec.skip:
                self._fit_skip(sae, first_batch[p.site].to(self.device) / c, first_batch[p.target].to(self.device) / c,
                               intercept=spec.b_dec_init == "mean")
            sae.objective = spec.objective(p.target_l0)
            sae = sae.to(self.device)
            if spec.threshold_init == "quantile":
                self._quantile_thresholds(sae, first_batch[p.site].to(self.device) / c, p.target_l0)
            if p.arch == "batchtopk" and not self.split.solo:
                sae.across = self.split  # the k·batch largest of the whole batch, not of this rank's share
            self.members.append(self._member(p, sae, c, p.width, self._signum_steps(first_batch[p.site].to(self.device) / c)))
        self.backend.setup(self)

    def _generator(self, p) -> torch.Generator:
        """Seeded by name: a dictionary starts the same whether trained alone or within any suite."""
        return torch.Generator().manual_seed(self.cfg.seed * 2**32 + zlib.crc32(p.name.encode()))

    def _member(self, p, sae, scale: float, latents: int, signum_steps: dict[str, float], **extra) -> Member:
        """The suite's record of one dictionary with `latents` latents on this rank (firing counters)."""
        controller = None
        if p.controlled:  # λ starts at the first listed value and then follows L0
            controller = TargetL0(target=p.target_l0, log_lambda=math.log(p.spec.lambdas[0]),
                                  gain=self.cfg.target_l0_gain, device=self.device)
        return Member(p.name, sae, p.site, p.target, scale, p.coeff, torch.zeros(latents, dtype=torch.long, device=self.device),
                      controller, lr_factor=(2**14 / p.width) ** 0.5 if self.cfg.lr_scale == "width" else 1.0,
                      signum_steps=signum_steps, bad_step=torch.tensor(-1, device=self.device),
                      bad_loss=torch.tensor(0.0, device=self.device), **extra)

    def _multi_member(self, p, first_batch: dict[str, torch.Tensor]) -> Member:
        """A cross-layer transcoder or crosscoder: each site normalised on its own (SPEC §8), b_dec
        at each output's mean, thresholds (JumpReLU with a target) at each group's quantiles, and
        each group's biases stepped by its own input's scales under signum."""
        spec, n = p.spec, len(p.inputs)
        d = MultiLayerDictionary(MultiLayerConfig(
            kind=spec.multi_layer, sites_in=list(p.inputs), sites_out=list(p.outputs), d_in=first_batch[p.site].shape[1],
            d_out=first_batch[p.target].shape[1], d_sae=p.width, model=self.model_name, arch=p.arch, k=p.k,
            bandwidth=spec.bandwidth))
        d.init_weights(self._generator(p))
        scalars = self.norm_scalars
        d.scale_in.copy_(torch.tensor([scalars[s] for s in p.inputs]))
        d.scale_out.copy_(torch.tensor([scalars[s] for s in p.outputs]))
        xs = [first_batch[s].to(self.device) / c for s, c in zip(p.inputs, d.scale_in.tolist())]
        if spec.b_dec_init == "mean":
            with torch.no_grad():
                for j, (s, c) in enumerate(zip(p.outputs, d.scale_out.tolist())):
                    d.b_dec[j].copy_(self.split.mean_rows(first_batch[s].to(self.device) / c))
        d.set_objective(spec.objective(p.target_l0))
        l0_from = self._init_from(d, spec, first_batch) if spec.init_from else None
        d = d.to(self.device)
        if spec.threshold_init == "quantile" and not spec.init_from:
            for g, x in zip(d.groups, xs):
                self._quantile_thresholds(g, x, p.target_l0)
        steps = {"b_dec": self._signum_steps(torch.cat(xs, 1))["b_dec"]}
        for i, x in enumerate(xs):
            steps.update({f"groups.{i}.{k}": v for k, v in self._signum_steps(x).items()})
        if self.latent_shard:
            d = d.sliced(self.latent_shard)
        return self._member(p, d, 1.0, n * d.cfg.d_sae, steps, l0_from=l0_from,
                            l0_decay=warmup_steps(spec.init_decay_steps, self.steps, 50_000, 0.2))

    def _init_from(self, d: MultiLayerDictionary, spec, first_batch: dict[str, torch.Tensor]) -> list[float] | None:
        """Groups started from the entry's single-layer dictionaries (MultiLayerDictionary.init_from);
        their L0s on the first batch, from which each group's k or target L0 decays (None: the
        entry has neither)."""
        saes = [load_sae(path) for path in spec.init_from]
        d.init_from(saes)
        if d.cfg.arch == "jumprelu" and spec.sparsity != "quadratic":
            return None
        with torch.no_grad():
            return [float((sae.encode(first_batch[s].float()) != 0).sum(1).float().mean())
                    for sae, s in zip(saes, d.cfg.sites_in)]

    def _signum_steps(self, x: torch.Tensor) -> dict[str, float]:
        """How far each bias or threshold moves per unit of signum's lr, from the centred input (the
        first whole batch) by train/step.py's SIGNUM_UNITS. Weights are rows of unit norm and move
        lr itself; a bias that moved lr on inputs whose coordinates vary by ~0.01 (SAE units:
        E‖x‖² = 1, most of it the mean) would drown every pre-activation within a few steps."""
        centred = x - self.split.mean_rows(x)
        per_coordinate = self.split.mean_rows(centred.pow(2))
        scales = {"pre": float(per_coordinate.mean().sqrt()), "coordinate": float(per_coordinate.median().sqrt()),
                  "inverse_width": 1.0 / x.shape[1]}
        return {name: scales[kind] * factor for name, (kind, factor) in SIGNUM_UNITS.items()}

    @torch.no_grad()
    def _fit_skip(self, sae, x: torch.Tensor, y: torch.Tensor, intercept: bool) -> None:
        """A skip transcoder's W_skip starts at the ridge least-squares map from input to target over
        the first (whole) batch, and b_dec (with the mean start) at its intercept: the skip carries the
        MLP's linear part from the first step and the latents start on what it leaves, as b_dec starts
        at the mean. Sign steps on a dense d_in × d_out matrix move every output coordinate at once,
        so from zero the skip would need many small steps (train/step.py: SIGNUM_UNITS)."""
        x, y = torch.cat(self.split.gather_rows(x)).double(), torch.cat(self.split.gather_rows(y)).double()
        xm, ym = x.mean(0), y.mean(0)
        xc, yc = x - xm, y - ym
        gram = xc.T @ xc
        ridge = 1e-3 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        A = torch.linalg.solve(gram + ridge, xc.T @ yc)
        sae.W_skip.copy_(A.to(sae.W_skip.dtype))
        if intercept:
            sae.b_dec.copy_((ym - xm @ A).to(sae.b_dec.dtype))

    @torch.no_grad()
    def _quantile_thresholds(self, sae, x: torch.Tensor, target_l0: float) -> None:
        """θ_i = the (1 − L0*/m) quantile of latent i's pre-activations on the first (whole) batch,
        so that every latent fires on a share L0*/m of it and L0 starts at L0*: no early steps
        spent with half the latents firing, and no latent starts dead or dense. Never below ε."""
        x = torch.cat(self.split.gather_rows(x))  # every rank computes the same θ from the whole batch
        pre = sae.pre_acts(x)
        rank = min(x.shape[0], max(1, round(x.shape[0] * (1 - target_l0 / sae.cfg.d_sae))))
        theta = pre.kthvalue(rank, dim=0).values
        sae.set_threshold(theta.clamp_min(sae.cfg.bandwidth))

    @cached_property
    def norm_scalars(self) -> dict[str, float]:
        """C per input site. A store's (or memory's) is exact and the same on every rank; a harvest
        estimates it from its first rows (so `run` asks before the first batch fills the shuffle
        buffer), and every rank takes data part 0's (rank 0's) estimate."""
        sites = sorted({p.site for p in self.plan if not p.spec.transcoder and not p.multi}
                       | {s for p in self.plan if p.multi for s in p.inputs + p.outputs})
        if not self.source.produced:
            return {s: self.source.norm_scalar(s) for s in sites if s in self.sites}
        view = self.views[self.local_parts[0]]
        return dict(zip(sites, self.ranks.broadcast([view.norm_scalar(s) for s in sites])))

    def _buffer_rows(self) -> int:
        """Each part's shuffle buffer: the configured (or memory-sized) total over the parts, the
        same on every rank and kept by the checkpoint, so that the batches replay exactly."""
        if self.saved:
            return self.saved["buffer_rows"]
        total = self.cfg.buffer_rows or self.source.default_buffer(self.plan_sites)
        return int(self.ranks.broadcast([max(total // self.parts, 1)])[0])

    def batches(self):
        """The global batches this config trains on, a function of its seed (or this rank's share of
        each, data-parallel): one batch of batch_size / parts rows from each local part, side by side."""
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
        return side_by_side(streams, self.ranks, self.parts, per, self.sites, self.gather)

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
                state = self._member_state(m)  # a dictionary split over ranks: gathered by all, written by rank 0
                if self.ranks.lead or not _split(m):
                    buf = io.BytesIO()
                    torch.save(state, buf)
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
            for place in (root, root / folder):  # a killed run's unfinished writes
                remove_temporaries(place)

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
        """What a checkpoint holds of one SAE (tensors and strings only: loaded with weights_only);
        of a dictionary whose latents are split over ranks, the whole's, as one process holds it."""
        optimizer = self.backend.state(m)  # first: it brings m.sae up to date
        sae, since_fired = m.sae, m.since_fired
        if _split(m):
            sae = m.sae.gathered()
            since_fired = self.latent_shard.gather_latents(m.since_fired.view(len(sae.groups), -1)).flatten()
        return _own({"sae": sae.state_dict(), "sae_config": json.dumps(sae.cfg.to_dict()),
                     "optimizer": optimizer, "since_fired": since_fired,
                     "controller": json.dumps(m.controller.state() if m.controller else None)})

    def _restore_member(self, m: Member, s: dict) -> None:
        since_fired = s["since_fired"]
        if _split(m):  # this rank's slice of the whole
            lo, hi = self.latent_shard.bounds(m.sae.full_width)
            s = {**s, "sae": m.sae.slice_state(s["sae"])}
            since_fired = since_fired.view(len(m.sae.groups), -1)[:, lo:hi].flatten()
        m.sae.load_state_dict(s["sae"])
        self.backend.load_state(m, s["optimizer"])
        m.since_fired.copy_(since_fired)
        ctl = json.loads(s["controller"])
        if ctl:
            m.controller = TargetL0(**ctl, device=self.device)

    # --- the loop ------------------------------------------------------------------------------
    def run(self, progress: bool = True) -> list[Path]:
        lead = self.ranks.lead
        self.out.mkdir(parents=True, exist_ok=True)
        if lead:
            remove_temporaries(self.out)
            write_json(self.out / "train_config.json", self.cfg.model_dump(mode="json"))
        stream = self.batches()
        self.norm_scalars  # noqa: B018 — estimated from a harvest's first rows, before the buffer takes them
        first = next(stream, None)
        if first is None:
            raise SaescopeError("the activation source gave no batch; it holds fewer rows than one batch")
        torch.manual_seed(self.cfg.seed)
        self.build(first)
        resumed = self._load_checkpoint()
        if lead:  # lines logged after the checkpoint (a killed run) are logged again as the run replays
            _metrics_until(self.out / METRICS, self.step)
        stream = _chain_first(first, stream)
        # the stream is a function of the seed: a resumed run replays it up to the checkpoint's step
        recent = deque(maxlen=self._recent_batches)  # what _write_saes fits thresholds on
        recent.extend(self._for_fitting(b) for b in islice(stream, self.step))
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
                recent.append(self._for_fitting(batch))
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
        return self._write_saes(list(recent))

    @cached_property
    def plan_by_name(self) -> dict:
        return {p.name: p for p in self.plan}

    @cached_property
    def _fitted(self) -> dict[str, tuple[str, ...]]:
        """The members whose saved thresholds are fitted on training rows, by name, with their
        input sites: BatchTopK's shared cut, and a JumpReLU trained as BatchTopK (one θ per latent)."""
        return {p.name: p.inputs or (p.site,) for p in self.plan if p.name in self.own and p.arch == "batchtopk"}

    @cached_property
    def _converted(self) -> frozenset[str]:
        """The members saved as JumpReLU with thresholds from the last FIT_ROWS rows."""
        return frozenset(p.name for p in self.plan if p.name in self.own and p.converted)

    @cached_property
    def _recent_batches(self) -> int:
        return math.ceil(FIT_ROWS / self.cfg.batch_size) if self._converted else 1

    @cached_property
    def _fit_sites(self) -> tuple[str, ...]:
        return tuple(sorted(set().union(*self._fitted.values())))

    def _for_fitting(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {site: batch[site] for site in self._fit_sites}

    def train_step(self, batch: dict[str, torch.Tensor]) -> None:
        """One step of every SAE on the same batch."""
        self._note_bad_batch(batch)
        self.backend.step(batch, lr_at(self.step, self.cfg.lr, self.lr_warmup))

    def _note_bad_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Remember the first step with non-finite activations (read at the next check)."""
        for site in self.sites:
            bad = ~torch.isfinite(batch[site]).all() & (self._bad_batch[site] < 0)
            self._bad_batch[site] = torch.where(bad, self.step, self._bad_batch[site])

    def _check_finite(self, last_good: int | None) -> None:
        """Stop on the first NaN or Inf seen since the last check (one read from the device; under
        torchrun one small all-reduce, so that every rank stops at once with the same message)."""
        sites = self.plan_sites
        mine = {m.name: m for m in self.members}
        local = [int(self._bad_batch[s]) if s in self._bad_batch else -1 for s in sites]
        local += [int(mine[p.name].bad_step) if p.name in mine else -1 for p in self.plan]
        first = self.ranks.first(local)
        for site, step in zip(sites, first):
            if step >= 0:
                raise SaescopeError(f"NaN or Inf in the activations of {site} at step {step}; {_kept(last_good)}")
        for p, step in zip(self.plan, first[len(sites):]):
            if step >= 0:
                m = mine.get(p.name)
                loss = f"{float(m.bad_loss)}" if m is not None and int(m.bad_step) == step else "not finite"
                raise SaescopeError(f"{p.name}: the loss is {loss} at step {step}; {_kept(last_good)}")

    def _log(self, log, rate: float, bar) -> None:
        lines, shown = [], None
        for m in self.members:
            dead = (m.since_fired >= self.dead_tokens).float().mean()
            if _split(m):  # every rank holds an equal slice
                dead = self.ranks.sum_(dead.clone()) / self.ranks.world
            line = {"sae": m.name, "step": self.step, "tokens": self.step * self.cfg.batch_size,
                    **{k: float(v) / max(m.steps, 1) for k, v in m.sums.items()},
                    "dead_fraction": float(dead), "tokens_per_s": rate}
            lines.append(json.dumps(line) + "\n")
            m.sums.clear()
            m.steps = 0
            shown = shown or f"{m.name}: L0 {line.get('l0', float('nan')):.1f}, FVU {line.get('fvu', float('nan')):.3f}"
        if self.sharded:  # every rank's lines, in the suite's order
            by_name = {json.loads(line)["sae"]: line for text in self.ranks.gather_text("".join(lines))
                       for line in text.splitlines(keepends=True)}
            lines = [by_name[p.name] for p in self.plan] if by_name else []
        if log is not None:
            log.writelines(lines)
            log.flush()
        bar.set_postfix_str(shown, refresh=False)

    def _write_saes(self, recent: list[dict[str, torch.Tensor]]) -> list[Path]:
        """Data-parallel: rank 0 writes every SAE; sharded: each rank its own. A BatchTopK SAE's
        inference threshold is fitted to the last batch (the whole of it) under the saved weights;
        a JumpReLU trained as BatchTopK gets a threshold per latent from the last batches."""
        self.ranks.barrier()  # rank 0 has written the last metrics lines
        final = _last_metrics(self.out / METRICS)

        def whole(batches, site):
            return torch.cat([torch.cat(self.split.gather_rows(b[site].to(self.device))) for b in batches])

        rows = {name: [whole(recent if name in self._converted else recent[-1:], site) for site in sites]
                for name, sites in self._fitted.items()}
        for m in self.members if self.sharded or self.ranks.lead else ():
            self.backend.sync(m)
            if m.l0_from is not None:  # the run's end is the target's, however short the run
                m.sae.set_l0([self.plan_by_name[m.name].value] * len(m.l0_from))
            sae = m.sae.gathered() if _split(m) else m.sae
            if _split(m) and not self.ranks.lead:  # rank 0 saves the whole
                continue
            if isinstance(sae, MultiLayerDictionary):
                if m.name in rows:
                    sae = fit_groups(sae, rows[m.name], convert=m.name in self._converted, batch_size=self.cfg.batch_size)
            elif m.name in self._converted:
                sae = batchtopk_to_jumprelu(sae, rows[m.name][0], batch_size=self.cfg.batch_size)
            elif m.name in rows:
                sae.fit_threshold(rows[m.name][0] / m.scale)
            sae.cfg.extra = {**sae.cfg.extra, "training": json.loads(self.cfg.model_dump_json()),
                             "final_metrics": final.get(m.name, {}), "steps": self.step, "dead_tokens": self.dead_tokens,
                             "corpus": getattr(self.source, "corpus", None),
                             "target_l0": self.plan_by_name[m.name].target_l0}
            if isinstance(sae, MultiLayerDictionary):
                save_dictionary(sae.cpu(), self.out / "saes" / m.name, format="native")
            else:
                save_sae(sae.cpu(), self.out / "saes" / m.name, format="native")
        self.ranks.barrier()
        return [self.out / "saes" / p.name for p in self.plan]


def _own(state):
    """`state` with every tensor that views a larger storage copied out: torch.save writes a view's
    whole storage, and a grouped encoder is a slice of all its group's encoders."""
    if isinstance(state, dict):
        return {k: _own(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_own(v) for v in state)
    if torch.is_tensor(state) and state.untyped_storage().nbytes() > state.numel() * state.element_size():
        return state.clone()
    return state


def _split(m: Member) -> bool:
    """A multi-layer dictionary whose latents are split over the ranks."""
    return getattr(m.sae, "shard", None) is not None


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
