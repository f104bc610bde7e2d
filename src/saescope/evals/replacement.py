"""The replacement model (SPEC §8, §9): a cross-layer transcoder, a crosscoder or a set of per-layer
transcoders standing in for every site it writes at once, beside each layer replaced alone.

One layer at a time, every input a dictionary reads is upstream of the output it writes, so the
clean pass's inputs give the exact splice (as evaluate() does for one SAE). All at once, errors
compound: each input is read from the spliced forward itself, so the pass runs with a hook at
every site that reads there (the codes, and their writes to this and later outputs) and then
replaces there (the sum of the writes so far). That is the model circuit tracing explains."""

from __future__ import annotations

import contextlib
import math
import time

import torch
from tqdm.auto import tqdm

from ..lm import LanguageModel, splice
from ..sae import SparseAutoencoder
from ..sae.layers import Layers
from ..sae.multilayer import MultiLayerDictionary
from ..site import Site
from .metrics import clean_passes, dead_dense, per_sequence_se


def evaluate_replacement(dictionaries: dict[str, MultiLayerDictionary | list[SparseAutoencoder]], lm: LanguageModel,
                         rows: torch.Tensor, *, batch_size: int = 1, progress: bool = True,
                         layers_alone: bool = True) -> dict[str, dict]:
    """Per layer: L0, FVU, delta loss and KL with that output alone replaced; and the same delta
    loss and KL with every output replaced at once. Real tokens only, as evaluate().
    `layers_alone=False` leaves out the one-layer splices (a model forward per layer and
    dictionary; their delta loss and KL are then NaN)."""
    layered = {name: Layers(d) for name, d in dictionaries.items()}
    sites = {s for L in layered.values() for s in (*L.sites_in, *L.sites_out)}
    for s in sites:
        Site.parse(s).check(lm)
    sums = {name: _LayerSums(len(L.sites_out), L.width) for name, L in layered.items()}
    totals = {"n_pred": 0.0, "seq_pred": [], "ce_clean": 0.0}
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc=f"replacement eval of {len(layered)}", disable=not progress)
    start = time.perf_counter()
    with torch.no_grad():
        for ids, keep, pred, seen, clean, _ in clean_passes(lm, rows, batch_size, sites):
            totals["n_pred"] += float(pred.sum())
            totals["seq_pred"] += pred.sum(1).tolist()
            clean_ce = (clean.ce.double() * pred).sum(1)
            totals["ce_clean"] += float(clean_ce.sum())

            def score(spliced_logits):
                ce, kl = clean.compare(spliced_logits)
                return (ce.double() * pred).sum(1) - clean_ce, (kl.double() * pred).sum(1)

            m = keep[..., None]
            for name, L in layered.items():
                s, n = sums[name], len(L.sites_out)
                s.tokens += int(keep.sum())
                y_hat = [L.bias(j) for j in range(n)]
                for i, site in enumerate(L.sites_in):  # one at a time, from the clean inputs
                    f, writes = L.code_and_writes(i, seen[site])
                    s.active[i] += float(((f != 0) & m).sum())
                    s.fired[i, :f.shape[-1]] += ((f != 0) & m).sum((0, 1)).double().cpu()
                    for j, w in writes.items():
                        y_hat[j] = y_hat[j] + w
                for j, site in enumerate(L.sites_out):
                    y = seen[site]
                    s.add_error(j, ((y_hat[j] - y).double() * m).pow(2).sum(), y.double()[keep])
                    if not layers_alone:
                        continue
                    with splice(lm, site, lambda v, r=torch.where(m, y_hat[j].to(y.dtype), y): r):
                        delta, kl = score(lm(ids))
                    s.layer_delta[j] += delta.tolist()
                    s.layer_kl[j] += kl.tolist()
                with _replaced(lm, L, m):  # all at once, each input read from the spliced forward
                    delta, kl = score(lm(ids))
                s.all_delta += delta.tolist()
                s.all_kl += kl.tolist()
            bar.update(ids.numel())
    bar.close()
    seconds = time.perf_counter() - start
    return {name: sums[name].summary(name, layered[name], totals, rows, seconds) for name in layered}


@contextlib.contextmanager
def _replaced(lm: LanguageModel, L: Layers, keep: torch.Tensor):
    """Every output of L replaced at real tokens; at a site that is read and written (a crosscoder's
    residual), the codes come from the value arriving there, before its own replacement."""
    pending = {j: L.bias(j) for j in range(len(L.sites_out))}

    def at(site):
        def fn(v):
            if site in L.sites_in:
                for j, w in L.code_and_writes(L.sites_in.index(site), v)[1].items():
                    pending[j] = pending[j] + w
            if site in L.sites_out:
                j = L.sites_out.index(site)
                v = torch.where(keep, torch.as_tensor(pending[j]).to(v.dtype).expand_as(v), v)
            return v
        return fn

    with contextlib.ExitStack() as stack:
        for site in dict.fromkeys([*L.sites_in, *L.sites_out]):
            stack.enter_context(splice(lm, site, at(site)))
        yield


class _LayerSums:
    def __init__(self, n: int, width: int):
        self.tokens = 0
        self.active = [0.0] * n
        self.fired = torch.zeros(n, width, dtype=torch.float64)
        self.sse = [0.0] * n
        self.sum_y = [0.0] * n
        self.sum_sq = [0.0] * n
        self.n_rows = [0] * n
        self.layer_delta = [[] for _ in range(n)]
        self.layer_kl = [[] for _ in range(n)]
        self.all_delta, self.all_kl = [], []

    def add_error(self, j: int, sse: torch.Tensor, y: torch.Tensor) -> None:
        self.sse[j] += float(sse)
        self.sum_y[j] = self.sum_y[j] + y.sum(0)
        self.sum_sq[j] += float(y.pow(2).sum())
        self.n_rows[j] += y.shape[0]

    def summary(self, name: str, L: Layers, totals: dict, rows: torch.Tensor, seconds: float) -> dict:
        n_pred, seq = max(totals["n_pred"], 1.0), totals["seq_pred"]
        layers = []
        for j, site in enumerate(L.sites_out):
            var = self.sum_sq[j] - float(self.sum_y[j].pow(2).sum()) / max(self.n_rows[j], 1)
            dead, dense = dead_dense(self.fired[j] / max(self.tokens, 1))
            layers.append({"site_in": L.sites_in[j], "site_out": site, "l0": self.active[j] / max(self.tokens, 1),
                           "fvu": self.sse[j] / var if var > 0 else float("nan"),
                           "delta_loss": sum(self.layer_delta[j]) / n_pred if self.layer_delta[j] else math.nan,
                           "delta_loss_se": per_sequence_se(self.layer_delta[j], seq) if self.layer_delta[j] else math.nan,
                           "kl": sum(self.layer_kl[j]) / n_pred if self.layer_kl[j] else math.nan,
                           "kl_se": per_sequence_se(self.layer_kl[j], seq) if self.layer_kl[j] else math.nan,
                           "dead_fraction": dead, "dense_fraction": dense})
        mean = {k: sum(layer[k] for layer in layers) / len(layers) for k in ("l0", "fvu", "delta_loss", "kl")}
        return {"sae": name, "kind": L.kind,
                "sites_in": L.sites_in, "sites_out": L.sites_out, "n_tokens": int(rows.numel()), "n_scored": self.tokens,
                "ce_loss_clean": totals["ce_clean"] / n_pred,
                "l0_per_layer": mean["l0"], "fvu_mean": mean["fvu"], "delta_loss_one_at_a_time_mean": mean["delta_loss"],
                "kl_one_at_a_time_mean": mean["kl"],
                "delta_loss_all_replaced": sum(self.all_delta) / n_pred,
                "delta_loss_all_replaced_se": per_sequence_se(self.all_delta, seq),
                "kl_all_replaced": sum(self.all_kl) / n_pred, "kl_all_replaced_se": per_sequence_se(self.all_kl, seq),
                "layers": layers, "eval_seconds": seconds}
