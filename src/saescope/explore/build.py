"""Per-latent statistics and examples over held-out text, streamed with bounded memory.

For each latent, across every batch, only fixed-size tensors are kept: its K strongest
activations (a running top-k), and a uniform sample of R of its firings (priority sampling:
each firing draws a random key and the R smallest keys are kept). Examples across the
activation range are read off that uniform sample at its quantiles, and so is the histogram of
non-zero activations. Memory is O(d_sae · (K + R)), never O(tokens)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_sae
from ..data.tokens import SpecialTokens, keep_mask
from ..lm import LanguageModel, capture
from ..lm.model import _get
from ..sae import SparseAutoencoder
from ..site import Site
from .db import connect

LOGIT_NOTE = ("top logits are W_dec[i] · W_U (attention latents first pass through o_proj); the final norm "
              "is not applied, so they show direction, not calibrated probabilities")


@dataclass
class _Running:
    """Bounded per-latent state for one SAE."""

    top_vals: torch.Tensor     # [m, K], −inf where empty
    top_tok: torch.Tensor      # [m, K] global token index (seq · T + pos)
    keys: torch.Tensor         # [m, R] priority keys, +inf where empty
    sample_vals: torch.Tensor  # [m, R]
    sample_tok: torch.Tensor   # [m, R]
    count: torch.Tensor        # [m] firings
    total: torch.Tensor        # [m] sum of activations

    @classmethod
    def empty(cls, m: int, k: int, r: int) -> "_Running":
        return cls(torch.full((m, k), -torch.inf), torch.zeros(m, k, dtype=torch.long),
                   torch.full((m, r), torch.inf), torch.zeros(m, r), torch.zeros(m, r, dtype=torch.long),
                   torch.zeros(m, dtype=torch.long), torch.zeros(m, dtype=torch.float64))

    def update(self, acts: torch.Tensor, tok: torch.Tensor, gen: torch.Generator) -> None:
        """acts [n, m] for the real tokens of a batch; tok [n] their global indices."""
        fired = acts > 0
        self.count += fired.sum(0)
        self.total += acts.double().sum(0)
        vals, where = torch.cat([self.top_vals, acts.T], 1).topk(self.top_vals.shape[1], dim=1)
        self.top_tok = torch.cat([self.top_tok, tok.expand(acts.shape[1], -1)], 1).gather(1, where)
        self.top_vals = vals
        keys = torch.rand(acts.shape, generator=gen).masked_fill(~fired, torch.inf).T
        all_keys = torch.cat([self.keys, keys], 1)
        kept, where = all_keys.topk(self.keys.shape[1], dim=1, largest=False)
        self.sample_vals = torch.cat([self.sample_vals, acts.T], 1).gather(1, where)
        self.sample_tok = torch.cat([self.sample_tok, tok.expand(acts.shape[1], -1)], 1).gather(1, where)
        self.keys = kept


@torch.no_grad()
def _direction_logits(sae: SparseAutoencoder, lm: LanguageModel, site: Site, n: int, chunk: int = 1024):
    """Top ±n tokens of each decoder direction through the unembedding."""
    W_U = lm.model.get_output_embeddings().weight.detach().float()  # [vocab, d_model]
    dec = sae.W_dec.detach().float()
    if site.kind == "attn" and not sae.cfg.target_site:
        dec = _get(lm.layers[site.layer], lm.block_map.attn)(dec.to(lm.device)).float()
    pos, neg = [], []
    for i in range(0, dec.shape[0], chunk):
        logits = dec[i:i + chunk].to(W_U.device) @ W_U.T
        pos.append(logits.topk(n, dim=1))
        neg.append(logits.topk(n, dim=1, largest=False))
    return ([torch.cat([p.values for p in pos]).cpu(), torch.cat([p.indices for p in pos]).cpu()],
            [torch.cat([q.values for q in neg]).cpu(), torch.cat([q.indices for q in neg]).cpu()])


def _neighbours(sae: SparseAutoencoder, n: int, chunk: int = 2048):
    dec = torch.nn.functional.normalize(sae.W_dec.detach().float().cpu(), dim=1)
    vals, idx = [], []
    for i in range(0, dec.shape[0], chunk):
        cos = dec[i:i + chunk] @ dec.T
        cos[torch.arange(cos.shape[0]), torch.arange(i, i + cos.shape[0])] = -2.0  # not itself
        top = cos.topk(min(n, dec.shape[0] - 1), dim=1)
        vals.append(top.values)
        idx.append(top.indices)
    return torch.cat(vals), torch.cat(idx)


def build(saes: dict[str, tuple[SparseAutoencoder, str]], lm: LanguageModel, rows: torch.Tensor, db_path: str | Path,
          *, batch_size: int = 4, top_k: int = 20, sample: int = 256, bands: int = 10, per_band: int = 2,
          bins: int = 32, n_logits: int = 10, n_neighbours: int = 10, seed: int = 0, progress: bool = True) -> dict:
    """Write the feature database for `saes` ({id: (sae, path)}) over token rows [n_seq, T]."""
    db_path = Path(db_path)
    tmp = db_path.with_name(f".{db_path.name}.partial")
    tmp.unlink(missing_ok=True)
    start = time.perf_counter()
    special = SpecialTokens.of(lm.tokenizer).ids
    sites = {name: check_sae(sae, lm) for name, (sae, _) in saes.items()}
    running = {name: _Running.empty(sae.cfg.d_sae, top_k, sample) for name, (sae, _) in saes.items()}
    gen = torch.Generator().manual_seed(seed)
    T = rows.shape[1]
    n_real = 0
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc=f"explore {len(saes)} SAEs", disable=not progress)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids = rows[i:i + batch_size].long()
            keep = keep_mask(ids, special).reshape(-1)
            tok = (torch.arange(i * T, i * T + ids.numel()))[keep]
            acts = capture(lm, ids, sorted({str(s) for s in sites.values()}))
            n_real += int(keep.sum())
            for name, (sae, _) in saes.items():
                x = acts[str(sites[name])].reshape(-1, sae.cfg.d_in)[keep.to(lm.device)]
                running[name].update(sae.encode(x).float().cpu(), tok, gen)
            bar.update(ids.numel())
    bar.close()
    con = connect(tmp)
    with con:
        con.execute("INSERT INTO meta VALUES ('logits', ?)", (LOGIT_NOTE,))
        con.execute("INSERT INTO meta VALUES ('model', ?)", (lm.name,))
        con.executemany("INSERT INTO sequences VALUES (?, ?)",
                        [(s, rows[s].numpy().astype(np.int32).tobytes()) for s in range(len(rows))])
        used = set(rows.flatten().tolist())
        for name, (sae, path) in saes.items():
            used |= _write_sae(con, name, sae, path, sites[name], running[name], lm, n_real, rows.reshape(-1), T,
                               bands, per_band, bins, n_logits, n_neighbours)
        con.executemany("INSERT INTO vocab VALUES (?, ?)", [(t, lm.tokenizer.decode([t])) for t in sorted(used)])
    con.execute("VACUUM")
    con.close()
    tmp.replace(db_path)
    return {"seconds": time.perf_counter() - start, "bytes": db_path.stat().st_size, "tokens": n_real}


def _write_sae(con, name, sae, path, site, run: _Running, lm, n_real, flat, T, bands, per_band, bins, n_logits,
               n_neighbours) -> set[int]:
    m = sae.cfg.d_sae
    density = (run.count.double() / max(n_real, 1)).tolist()
    mean_act = (run.total / run.count.clamp_min(1)).tolist()
    l0 = float(run.count.sum()) / max(n_real, 1)
    con.execute("INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, str(site), sae.cfg.target_site, sae.cfg.arch, m, sae.cfg.d_in, str(path), n_real, l0))
    used: set[int] = set()
    examples, latents = [], []
    for j in range(m):
        top = [(float(v), int(t)) for v, t in zip(run.top_vals[j], run.top_tok[j]) if v > 0]
        seen = run.keys[j] < torch.inf
        vals, toks = run.sample_vals[j][seen], run.sample_tok[j][seen]
        order = vals.argsort()
        vals, toks = vals[order], toks[order]
        for rank, (v, t) in enumerate(top):
            examples.append((name, j, "top", rank, None, t // T, t % T, v))
        for band in range(bands if len(vals) else 0):  # quantile bands of the firing distribution
            lo, hi = band * len(vals) // bands, (band + 1) * len(vals) // bands
            for rank, q in enumerate(range(lo, min(hi, lo + per_band))):
                examples.append((name, j, "quantile", rank, band, int(toks[q]) // T, int(toks[q]) % T, float(vals[q])))
        hist = np.histogram(vals.numpy(), bins=bins, range=(0.0, float(vals.max()) if len(vals) else 1.0))
        latents.append((name, j, density[j], top[0][0] if top else 0.0, mean_act[j] if run.count[j] else 0.0,
                        json.dumps({"counts": hist[0].tolist(), "edges": [round(e, 6) for e in hist[1].tolist()],
                                    "sample": int(len(vals)), "firings": int(run.count[j])}),
                        json.dumps(_top_tokens(top, flat))))
    con.executemany("INSERT INTO latents VALUES (?, ?, ?, ?, ?, ?, ?)", latents)
    con.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?)", examples)
    (pv, pi), (nv, ni) = _direction_logits(sae, lm, site, n_logits)
    rows = []
    for j in range(m):
        for sign, vals, idx in ((1, pv, pi), (-1, nv, ni)):
            for rank in range(vals.shape[1]):
                rows.append((name, j, sign, rank, int(idx[j, rank]), float(vals[j, rank])))
                used.add(int(idx[j, rank]))
    con.executemany("INSERT INTO logits VALUES (?, ?, ?, ?, ?, ?)", rows)
    cv, ci = _neighbours(sae, n_neighbours)
    con.executemany("INSERT INTO neighbours VALUES (?, ?, ?, ?, ?)",
                    [(name, j, r, int(ci[j, r]), float(cv[j, r])) for j in range(m) for r in range(ci.shape[1])])
    return used


def _top_tokens(top: list[tuple[float, int]], flat: torch.Tensor) -> list[int]:
    """Distinct token ids at the latent's strongest activations, strongest first (up to 5)."""
    out: list[int] = []
    for _, t in top:
        token = int(flat[t])
        if token not in out:
            out.append(token)
        if len(out) == 5:
            break
    return out


def build_dir(folder: str | Path, corpus, tokens: int, *, model: str | None = None, out: str | Path | None = None,
              batch_size: int = 8, device: str = "cpu", progress: bool = True) -> dict:
    """`saescope explore build DIR`: the SAEs of a run folder (or a folder of SAEs) over held-out text."""
    from ..errors import SaescopeError
    from ..data import token_tensor
    from ..evals.report import find_saes
    from ..lm import load_model
    from ..sae.formats import load_sae

    folder = Path(folder)
    run_saes, store = folder / "train" / "saes", folder / "activations" / "store.json"
    if model is None:
        if not store.is_file():
            raise SaescopeError(f"{folder} is not a `saescope run` folder; pass --model for a folder of SAEs")
        model = json.loads(store.read_text())["model"]
    found = find_saes([str(run_saes if run_saes.is_dir() else folder)])
    lm = load_model(model, device=device)
    saes = {name: (load_sae(path).to(lm.device), path) for name, path in found.items()}
    db = Path(out) if out else folder / "features.db"
    info = build(saes, lm, token_tensor(lm, corpus, tokens), db, batch_size=batch_size, progress=progress)
    return {**info, "path": str(db), "saes": len(saes)}
