"""SPEC §4 metrics: pure functions on arrays, and a streaming evaluator that splices each SAE into
the model on held-out token rows and accumulates everything in one pass over the data."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..checks import check_sae
from ..data.tokens import SpecialTokens, keep_mask
from ..lm import LanguageModel, splice
from ..lm.sites import block_outputs, skipping
from ..sae import SparseAutoencoder
from ..site import Site

DENSE_FREQUENCY = 0.1  # SPEC §4: a latent firing on more than 10% of tokens is dense


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over rows."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def l0(f: torch.Tensor) -> float:
    """Mean number of active latents per row."""
    return float((f != 0).sum(-1).double().mean())


def dead_dense(frequency: torch.Tensor, dense: float = DENSE_FREQUENCY) -> tuple[float, float]:
    """Shares of latents that never fire, and that fire on more than `dense` of tokens."""
    return float((frequency == 0).double().mean()), float((frequency > dense).double().mean())


def kl_divergence(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, for next-token distributions given as logits [..., vocab]."""
    logp, logq = F.log_softmax(logits_p.float(), -1), F.log_softmax(logits_q.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def per_sequence_se(sums: list[float], counts: list[float]) -> float:
    """Standard error of the token-weighted mean Σ sums / Σ counts, sequences as the sampling
    units (tokens within a sequence are not independent); sequences with nothing counted are not
    units."""
    keep = [i for i, n in enumerate(counts) if n > 0]
    return ratio_se([sums[i] for i in keep], [counts[i] for i in keep])


def ratio_se(numerators: list[float], denominators: list[float]) -> float:
    """Standard error of R = Σ a_j / Σ b_j over sampling units j (the ratio estimator's
    √(Σ (a_j − R·b_j)² / (N (N − 1))) / mean(b)); NaN with fewer than two units."""
    a, b = torch.tensor(numerators, dtype=torch.float64), torch.tensor(denominators, dtype=torch.float64)
    if len(b) < 2 or float(b.sum()) == 0:
        return math.nan
    r = a.sum() / b.sum()
    return float(((a - r * b).pow(2).sum() / (len(b) * (len(b) - 1))).sqrt() / b.mean().abs())


def massive_dims(mean: torch.Tensor, rms: torch.Tensor, factor: float = 10.0) -> list[int]:
    """Dimensions whose mean dwarfs a typical dimension's RMS (Gemma 3's residual offsets, SPEC §4)."""
    return sorted(int(i) for i in torch.nonzero(mean.abs() > factor * rms.median()).flatten())


@dataclass
class _Sums:
    """Running sums for one SAE over the evaluation tokens."""

    d_sae: int
    seq_len: int
    d_out: int
    n: int = 0
    sse: float = 0.0
    sum_x: torch.Tensor = None
    sum_sq: torch.Tensor = None
    fired: torch.Tensor = None
    active: float = 0.0
    sse_dims: torch.Tensor = None
    pos_sse: torch.Tensor = None
    pos_n: torch.Tensor = None
    ce_spliced: float = 0.0
    kl: float = 0.0
    seq_delta: list = None    # per sequence: Σ (spliced − clean) CE, and Σ KL, over its predictions
    seq_kl: list = None
    seq_spliced: list = None  # per sequence: Σ spliced CE

    def __post_init__(self):
        self.sum_x = torch.zeros(self.d_out, dtype=torch.float64)
        self.sum_sq = torch.zeros(self.d_out, dtype=torch.float64)
        self.sse_dims = torch.zeros(self.d_out, dtype=torch.float64)
        self.fired = torch.zeros(self.d_sae, dtype=torch.float64)
        self.pos_sse = torch.zeros(self.seq_len, dtype=torch.float64)
        self.pos_n = torch.zeros(self.seq_len, dtype=torch.float64)
        self.seq_delta, self.seq_kl, self.seq_spliced = [], [], []


class CleanPass:
    """The clean pass's next-token log-probabilities and probabilities, made once per batch: every
    spliced pass is compared with them in two vocabulary-sized passes (its log-softmax, then
    Σ p·(log p − log q) as one batched dot product), where cross-entropy and KL each from logits
    take several (a Gemma 3 row of 1024 tokens is a 1 GiB [1024, 262144] tensor)."""

    def __init__(self, logits: torch.Tensor, ids: torch.Tensor):
        self.targets = ids[:, 1:, None]
        self.logp = F.log_softmax(logits[:, :-1].float(), -1)
        self.p = self.logp.exp()
        self.ce = -self.logp.gather(-1, self.targets).squeeze(-1)

    def compare(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy [batch, seq − 1] of the spliced logits, and KL(clean ‖ spliced)."""
        logq = F.log_softmax(logits[:, :-1].float(), -1)
        ce = -logq.gather(-1, self.targets).squeeze(-1)
        diff = logq.neg_().add_(self.logp)  # in place: log p − log q
        kl = (self.p.unsqueeze(-2) @ diff.unsqueeze(-1)).flatten(-3)
        return ce, kl


def clean_passes(lm: LanguageModel, rows: torch.Tensor, batch_size: int, sites: set[str], blocks: int = 0):
    """Each batch of token rows with what every evaluation compares against: (ids, the real-token
    mask, the scored predictions [batch, seq − 1] (input and target both real tokens), the clean
    value at every site of `sites`, the clean pass, the outputs of blocks 0…`blocks`−1 (for
    `skipping`)). Call under torch.no_grad()."""
    special = SpecialTokens.of(lm.tokenizer).ids if lm.tokenizer is not None else []
    for i in range(0, len(rows), batch_size):
        ids = rows[i:i + batch_size].long().to(lm.device)
        keep = keep_mask(ids, special) if special else torch.ones_like(ids, dtype=torch.bool)
        seen: dict[str, torch.Tensor] = {}
        with contextlib.ExitStack() as stack:
            for site in sites:
                stack.enter_context(splice(lm, site, lambda v, key=site: seen.__setitem__(key, v) or v))
            outputs = stack.enter_context(block_outputs(lm, blocks))
            clean = CleanPass(lm(ids), ids)
        yield ids, keep, (keep[:, :-1] & keep[:, 1:]).to(torch.float64), seen, clean, outputs


def _ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per position [batch, seq − 1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)


def evaluate(saes: dict[str, SparseAutoencoder], lm: LanguageModel, rows: torch.Tensor, *, batch_size: int = 1,
             progress: bool = True) -> dict[str, dict]:
    """Evaluate every SAE on the token rows [n_seq, seq_len] (held-out text, BOS-led).

    The reconstruction replaces the site's value at real tokens only (BOS, EOS and padding keep
    their clean value), and losses count only predictions whose input and target are real tokens.
    The model runs whole once per batch (the clean pass); each spliced pass and each site's
    zero-ablation starts at its site's block from the clean pass's values before it."""
    inputs = {name: check_sae(sae, lm) for name, sae in saes.items()}
    targets = {name: Site.parse(sae.cfg.target_site) if sae.cfg.target_site else inputs[name] for name, sae in saes.items()}
    seq_len = rows.shape[1]
    sums = {name: _Sums(sae.cfg.d_sae, seq_len, sae.cfg.width_out) for name, sae in saes.items()}
    totals = {"n_pred": 0, "ce_clean": 0.0, "seq_pred": [], "seq_clean": []}
    zero_ce = {str(t): [] for t in set(targets.values())}  # per sequence: Σ CE with the target zeroed
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc=f"eval {len(saes)} SAEs", disable=not progress)
    start = time.perf_counter()
    first = max(t.layer for t in targets.values())  # blocks the spliced passes may skip
    with torch.no_grad():
        for ids, keep, pred, seen, clean, before in clean_passes(
                lm, rows, batch_size, {*map(str, inputs.values()), *map(str, targets.values())}, first):
            totals["n_pred"] += float(pred.sum())
            clean_ce = (clean.ce.double() * pred).sum(1)
            totals["ce_clean"] += float(clean_ce.sum())
            totals["seq_pred"] += pred.sum(1).tolist()
            totals["seq_clean"] += clean_ce.tolist()
            for target in zero_ce:
                with skipping(lm, before[:Site.parse(target).layer]), \
                        splice(lm, target, lambda v: v * (~keep)[..., None].to(v.dtype)):
                    zero_ce[target] += (_ce(lm(ids), ids).double() * pred).sum(1).tolist()
            for name, sae in saes.items():
                s, site, target = sums[name], str(inputs[name]), str(targets[name])
                x_in, y = seen[site], seen[target]
                f = sae.encode(x_in)
                y_hat = sae.decode(f) + sae.skip_output(x_in)
                m = keep[..., None]
                err = ((y_hat - y).double() * m).pow(2)
                s.n += int(keep.sum())
                s.sse += float(err.sum())
                s.sse_dims += err.sum((0, 1))
                yk = y.double()[keep]
                s.sum_x += yk.sum(0)
                s.sum_sq += yk.pow(2).sum(0)
                s.fired += ((f != 0) & m).sum((0, 1)).double()
                s.active += float(((f != 0) & m).sum())
                s.pos_sse += err.sum(-1).sum(0)
                s.pos_n += keep.sum(0).double()
                # nothing upstream of `target` changes, so the clean pass's input gives the exact splice
                replace = torch.where(m, y_hat.to(y.dtype), y)
                with skipping(lm, before[:targets[name].layer]), splice(lm, target, lambda v, r=replace: r):
                    spliced = lm(ids)
                ce, kl = clean.compare(spliced)
                del spliced
                spliced_ce = (ce.double() * pred).sum(1)
                kl = (kl.double() * pred).sum(1)
                s.ce_spliced += float(spliced_ce.sum())
                s.kl += float(kl.sum())
                s.seq_delta += (spliced_ce - clean_ce).tolist()
                s.seq_spliced += spliced_ce.tolist()
                s.seq_kl += kl.tolist()
            bar.update(ids.numel())
    bar.close()
    seconds = time.perf_counter() - start
    return {name: _summary(name, sae, sums[name], totals, zero_ce[str(targets[name])], str(inputs[name]), rows, seconds)
            for name, sae in saes.items()}


def _summary(name, sae, s: _Sums, totals, zero_seq, site, rows, seconds) -> dict:
    n_pred = max(totals["n_pred"], 1.0)
    mean = s.sum_x / max(s.n, 1)
    var_dims = s.sum_sq - s.n * mean.pow(2)
    rms = (s.sum_sq / max(s.n, 1)).sqrt()
    big = massive_dims(mean, rms)
    keep_dims = torch.ones_like(mean, dtype=torch.bool)
    keep_dims[big] = False
    ce_clean = totals["ce_clean"] / n_pred
    ce_spliced = s.ce_spliced / n_pred
    ce_zero = sum(zero_seq) / n_pred
    # CE recovered = Σ_j (zero − spliced) / Σ_j (zero − clean), sequences j the units
    scored = [j for j, n in enumerate(totals["seq_pred"]) if n > 0]
    recovered_se = ratio_se([zero_seq[j] - s.seq_spliced[j] for j in scored],
                            [zero_seq[j] - totals["seq_clean"][j] for j in scored])
    frequency = s.fired / max(s.n, 1)
    dead, dense = dead_dense(frequency)
    pos_var = var_dims.sum() / max(s.n, 1)
    by_position = (s.pos_sse / s.pos_n.clamp_min(1) / pos_var).tolist()
    return {
        "sae": name, "site": site, "target_site": sae.cfg.target_site, "arch": sae.cfg.arch, "d_sae": sae.cfg.d_sae,
        "n_tokens": int(rows.numel()), "n_scored": s.n,
        "l0": s.active / max(s.n, 1),
        "fvu": float(s.sse / var_dims.sum()),
        "fvu_without_massive_dims": float(s.sse_dims[keep_dims].sum() / var_dims[keep_dims].sum()),
        "massive_dims": big,
        "ce_loss_clean": ce_clean, "ce_loss_spliced": ce_spliced, "ce_loss_zero_ablation": ce_zero,
        "delta_loss": ce_spliced - ce_clean, "delta_loss_se": per_sequence_se(s.seq_delta, totals["seq_pred"]),
        "ce_loss_recovered": (ce_zero - ce_spliced) / (ce_zero - ce_clean) if ce_zero != ce_clean else math.nan,
        "ce_loss_recovered_se": recovered_se,
        "kl": s.kl / n_pred, "kl_se": per_sequence_se(s.seq_kl, totals["seq_pred"]),
        "dead_fraction": dead, "dense_fraction": dense,
        # the trainer's count: no firing over its last `dead_tokens` training tokens, for every latent
        "dead_fraction_training": sae.cfg.extra.get("final_metrics", {}).get("dead_fraction"),
        "dead_training_tokens": sae.cfg.extra.get("dead_tokens"),
        "firing_frequency": frequency.tolist(),
        "recon_loss_by_position": by_position,
        "eval_seconds": seconds,
    }

