"""torch.distributed for training: who this process is, the few collectives the trainer needs, and
which SAEs each rank trains.

A job is started by torchrun (`--standalone` on one machine, the c10d rendezvous across nodes);
WORLD_SIZE > 1 in the environment makes `train` join the process group: NCCL when the device is
CUDA (each rank on its LOCAL_RANK's GPU), gloo on CPUs, and a gloo group beside NCCL for host-side
messages. Two modes (ParallelConfig.mode):

- "data": every rank trains every SAE on its share of each global batch. After each backward the
  fired masks, the batch statistics and the gradients are all-reduced (only the rows of latents
  that fired somewhere, when at most a quarter did: the other rows are zero on every rank), so
  every rank takes the same Adam step. Rank 0 writes checkpoints and outputs.
- "sae": the suite's SAEs are spread over the ranks, balanced by size, and each is trained on
  whole batches with no per-step collective. How activations reach a rank: from a store (or
  memory) each rank reads, itself, the sites its own SAEs need, for every part of each batch —
  reading is cheap and a shared filesystem serves many readers, while sending rows between ranks
  would move as many bytes and tie the ranks to one pace; a suite spread by site reads each site
  once. From a harvest a model forward makes the rows, so each rank makes its parts of each batch
  and an all-gather gives every rank all of it: the forward, the costly step, is done once.
  A cross-layer transcoder or crosscoder is not placed on one rank but split: every rank holds a
  slice of each group's latents (`LatentShard`), and its step has a few collectives of its own.

Either way a global batch is the union of `parts` independently shuffled data parts (part p
reads shards, or corpus rows, p, p + parts, …), so the batches do not depend on how many ranks
make them: a checkpoint resumes on any rank count its mode can split the parts over, and one
process with data_parts = N replays an N-rank run exactly."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from ..config import ParallelConfig
from ..errors import SaescopeError, first_line
from ..sae.fast import few_touched

BUCKET = 2**25               # elements per gradient all-reduce (128 MiB of float32)
PATIENT = timedelta(days=7)  # waits on another stage (rank 0's harvest), not on a collective


@dataclass
class Ranks:
    """This process's place in the job; with world 1 every collective is the identity."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    group: object = None      # collectives on the training device
    control: object = None    # gloo on CPU tensors: host-side messages and barriers
    patient: object = None    # gloo with a long timeout, for waiting on rank 0's stages
    timeout_s: float = 600.0

    @property
    def solo(self) -> bool:
        return self.world == 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def alone(self) -> "Ranks":
        """This process by itself: whom a batch is split over when each rank holds whole batches."""
        return Ranks(device=self.device)

    def _run(self, what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo and NCCL raise DistBackendError (a RuntimeError) or RuntimeError
            raise SaescopeError(f"{what} across {self.world} ranks failed: another rank has died, or stalled for over "
                                f"{self.timeout_s:g} s ({first_line(exc)})") from None

    # --- on the training device ----------------------------------------------------------------
    def sum_(self, flat: torch.Tensor) -> torch.Tensor:
        """All-reduce a tensor in place by sum."""
        if not self.solo:
            self._run("a sum", dist.all_reduce, flat, group=self.group)
        return flat

    def average_(self, tensors: list[torch.Tensor]) -> None:
        """Replace each tensor by its mean over the ranks: one all-reduce per bucket of about
        BUCKET elements (a few large messages, without one copy of every gradient at once)."""
        if self.solo:
            return
        bucket: list[torch.Tensor] = []
        for i, t in enumerate(tensors):
            bucket.append(t)
            if i == len(tensors) - 1 or sum(b.numel() for b in bucket) + tensors[i + 1].numel() > BUCKET:
                flat = self.sum_(torch.cat([b.reshape(-1) for b in bucket])).div_(self.world)
                start = 0
                for b in bucket:
                    b.copy_(flat[start:start + b.numel()].view_as(b))
                    start += b.numel()
                bucket = []

    def mean_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The mean row of x [rows, d] over every rank's rows (equal counts)."""
        if self.solo:
            return x.mean(0)
        return self.sum_(x.sum(0)).div_(x.shape[0] * self.world)

    def gather_rows(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's x (same shape), in rank order."""
        if self.solo:
            return [x]
        out = [torch.empty_like(x) for _ in range(self.world)]
        self._run("an all-gather", dist.all_gather, out, x.contiguous(), group=self.group)
        return out

    def largest_share(self, top: torch.Tensor, n: int) -> int:
        """How many of this rank's largest values `top` (sorted, descending, at most n) are among the
        n largest of every rank's together: BatchTopK's cut over a batch split across ranks. Ties
        at the cut go to lower ranks first, so that exactly n are kept, as one process would (a tie
        is usually a row the shuffle drew twice: either copy gives the same gradient)."""
        padded = torch.full((n,), -torch.inf, dtype=top.dtype, device=top.device)
        padded[:len(top)] = top
        cut = torch.cat(self.gather_rows(padded)).topk(n).values[-1]
        counts = torch.stack([(top > cut).sum(), (top == cut).sum()])
        every = torch.stack(self.gather_rows(counts))  # [world, (above, at the cut)]
        share = (n - every[:, 0].sum() - every[:self.rank, 1].sum()).clamp(0, counts[1])
        return int(counts[0] + share)

    # --- host side -----------------------------------------------------------------------------
    def first(self, values: list[int]) -> list[int]:
        """Per entry, the smallest non-negative value any rank holds (−1 where none): first steps."""
        if self.solo or not values:
            return values
        big = 2**62
        t = torch.tensor([v if v >= 0 else big for v in values], dtype=torch.int64)
        self._run("a check", dist.all_reduce, t, op=dist.ReduceOp.MIN, group=self.control)
        return [v if v < big else -1 for v in t.tolist()]

    def broadcast(self, values: list[float]) -> list[float]:
        """Rank 0's values on every rank."""
        if self.solo or not values:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        self._run("a broadcast", dist.broadcast, t, src=0, group=self.control)
        return t.tolist()

    def gather_text(self, text: str) -> list[str]:
        """Every rank's text on rank 0 (in rank order); [] elsewhere. Bytes in tensors, no pickle."""
        if self.solo:
            return [text]
        data = torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._run("a gather", dist.all_gather, sizes, torch.tensor([len(data)]), group=self.control)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros(longest, dtype=torch.uint8)
        padded[:len(data)] = data
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
        self._run("a gather", dist.all_gather, out, padded, group=self.control)
        if not self.lead:
            return []
        return [bytes(o[:int(s)].tolist()).decode() for o, s in zip(out, sizes)]

    def barrier(self, patient: bool = False) -> None:
        if not self.solo:
            self._run("a barrier", dist.barrier, group=self.patient if patient else self.control)

    @contextmanager
    def lead_first(self):
        """Rank 0 runs the block, then the others (e.g. a model's first load fills a shared cache)."""
        if not self.lead:
            self.barrier(patient=True)
        yield
        if self.lead:
            self.barrier(patient=True)


@dataclass
class LatentShard:
    """A multi-layer dictionary whose every group's latents are split over the ranks in contiguous
    slices, every rank seeing whole batches (SAE-sharded mode): what its training step needs of
    the others. The decoder is the large part, and each latent's rows stay on one rank."""

    ranks: Ranks

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world(self) -> int:
        return self.ranks.world

    def bounds(self, width: int) -> tuple[int, int]:
        """This rank's slice [lo, hi) of `width` latents (the whole group's)."""
        if width % self.world:
            raise SaescopeError(f"{width} latents per layer do not split evenly over {self.world} ranks")
        share = width // self.world
        return self.rank * share, (self.rank + 1) * share

    def gather_latents(self, t: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's slice of `t` along its latent dimension, joined in rank order."""
        return torch.cat(self.ranks.gather_rows(t.contiguous()), dim=dim)

    def summed(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `partial` (this rank's latents' part of a reconstruction or a
        count), whose gradient reaches this rank's part as the sum's own: the sum is the same
        on every rank, so is every loss term that reads it, and so its gradient."""
        whole = self.ranks.sum_(partial.detach().clone())
        return partial + (whole - partial.detach())


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def joined(parallel: ParallelConfig, device: str):
    """The job's Ranks: one process unless torchrun set WORLD_SIZE > 1, then the process group
    (joined here unless the caller already has; left again on the way out)."""
    world = world_size()
    if world == 1:
        yield Ranks(device=torch.device(device))
        return
    cuda = torch.device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    timeout = timedelta(seconds=parallel.timeout_s)
    made = not dist.is_initialized()
    if made:
        if cuda:
            torch.cuda.set_device(local)
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except (RuntimeError, ValueError) as exc:
            raise SaescopeError(f"cannot join the torch.distributed job: {first_line(exc)}") from None
    control = dist.new_group(backend="gloo", timeout=timeout) if cuda else dist.group.WORLD
    ranks = Ranks(rank=dist.get_rank(), world=dist.get_world_size(),
                  device=torch.device("cuda", local) if cuda else torch.device(device),
                  group=dist.group.WORLD, control=control, patient=dist.new_group(backend="gloo", timeout=PATIENT),
                  timeout_s=parallel.timeout_s)
    yield ranks
    if made:  # only on the way out of a finished job: a failed one exits, and torchrun ends the others
        dist.destroy_process_group()


def assign(members: list[tuple[str, frozenset, int]], world: int, idle: bool = False) -> list[list[str]]:
    """Sharded mode: SAEs (name, sites read, size) spread over `world` ranks, largest first, each
    to the least-loaded rank (a tie goes to a rank that already reads its sites). Every rank
    computes the same answer from the suite alone. `idle`: ranks may get none (they hold slices
    of multi-layer dictionaries)."""
    if len(members) < world and not idle:
        raise SaescopeError(f"SAE-sharded training of {len(members)} SAEs cannot use {world} ranks; "
                            "use at most that many, or data-parallel mode")
    loads, reads = [0] * world, [set() for _ in range(world)]
    out: list[list[str]] = [[] for _ in range(world)]
    for name, sites, size in sorted(members, key=lambda m: (-m[2], m[0])):
        r = min(range(world), key=lambda r: (loads[r], not sites <= reads[r], r))
        loads[r] += size
        reads[r] |= sites
        out[r].append(name)
    return out


def average_step(ranks: Ranks, saes: list, outs: list[dict], scaled: dict) -> dict:
    """Data-parallel: make this rank's step the whole batch's, for every SAE at once (one
    all-reduce of the small statistics, then the gradients in buckets). Each rank's loss is a
    mean over an equal share, so the batch's gradient is the mean of the ranks' gradients; a
    latent fired if it fired anywhere. Where at most a quarter of an SAE's latents were
    touched, only their encoder and decoder rows are sent: every other row's gradient is zero
    on every rank. `outs` are the SAEs' `training_loss` outputs (updated in place); returns each
    scaled input's variance over the whole batch (for FVU)."""
    stats = []
    for out in outs:
        touched = out.get("touched", out["fired"])
        stats += [out["fired"].double(), touched.double(), torch.stack([out["l0"], out["loss"], out["mse"]]).double()]
    for x in scaled.values():
        stats += [x.sum(0, dtype=torch.float64), x.double().pow(2).sum().view(1)]
    flat = ranks.sum_(torch.cat(stats))
    world, start, grads, picked = ranks.world, 0, [], []
    for sae, out in zip(saes, outs):
        width = sae.cfg.d_sae
        out["fired"], out["touched"] = flat[start:start + width] > 0, flat[start + width:start + 2 * width] > 0
        out["l0"], out["loss"], out["mse"] = (flat[start + 2 * width:start + 2 * width + 3] / world).float().unbind()
        start += 2 * width + 3
        rows = few_touched(out)
        for p in sae.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grad = p.grad.t() if p is sae.W_enc else p.grad  # W_enc's rows are latents, as W_dec's
            if rows is not None and (p is sae.W_enc or p is sae.W_dec):
                picked.append((grad, rows, grad[rows]))
            else:
                grads.append(grad)
    ranks.average_(grads + [g for _, _, g in picked])
    for grad, rows, rows_grad in picked:
        grad.index_copy_(0, rows, rows_grad)
    var = {}
    for key, x in scaled.items():
        d, n = x.shape[1], x.shape[0] * world
        moments = flat[start:start + d + 1]
        var[key] = moments[d] / n - (moments[:d] / n).pow(2).sum()
        start += d + 1
    return var


def data_parts(asked: int | None, saved: dict | None, world: int, *, batch_size: int, sharded: bool, gather: bool,
               out) -> int:
    """How many parts each global batch is made of: fixed for a run (its checkpoint, `saved`,
    says). `sharded`: SAE-sharded mode; `gather`: its ranks make parts of a harvest and gather
    them (else each reads whole batches from a store itself, so one part is enough). `out` is
    the run's folder, named in messages."""
    kept = saved["parts"] if saved else None
    if asked and kept and asked != kept:
        raise SaescopeError(f"{out} holds a run with {kept} data parts; a run keeps its data parts "
                            f"(leave data_parts unset, or set it to {kept})")
    parts = asked or kept or (1 if sharded and not gather else world)
    if batch_size % parts:
        raise SaescopeError(f"batch_size {batch_size} does not split into {parts} equal data parts")
    if (not sharded or gather) and parts % world:
        why = f"the checkpoint of step {saved['step']} in {out} was made of" if saved else "each batch is made of"
        raise SaescopeError(f"{why} {parts} data parts, which {world} ranks cannot share evenly; "
                            f"use a number of ranks that divides {parts}"
                            + ("" if sharded else ", or SAE-sharded mode (parallel.mode = 'sae')"))
    return parts


def local_parts(ranks: Ranks, parts: int, spread: bool) -> list[int]:
    """The data parts this rank makes: r, r + world, … when the parts are shared out, else all."""
    return list(range(ranks.rank, parts, ranks.world) if spread else range(parts))


def side_by_side(streams: list, ranks: Ranks, parts: int, per: int, sites: list[str], gather: bool):
    """Global batches (or this rank's share of each) from the local parts' streams, each giving
    `per` rows a batch. `gather`: every rank's parts are all-gathered and put in part order, so
    every rank sees the whole batch (SAE-sharded ranks streaming from a model)."""
    world = ranks.world
    made = [p for r in range(world) for p in range(r, parts, world)]  # rank r made parts r, r + world, …
    order = torch.tensor(sorted(range(parts), key=made.__getitem__))
    for chunks in zip(*streams):
        batch = {s: torch.cat([b[s] for b in chunks]) if len(chunks) > 1 else chunks[0][s] for s in sites}
        if gather:  # NCCL gathers device tensors
            batch = {s: torch.cat(ranks.gather_rows(x.to(ranks.device))).view(parts, per, -1)[order]
                     .view(-1, x.shape[1]) for s, x in batch.items()}
        yield batch
