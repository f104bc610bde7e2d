"""Per-latent statistics and examples over held-out text, streamed with bounded memory.

For each latent, across every batch, only fixed-size tensors are kept: its K strongest
activations (a running top-k), and a uniform sample of R of its firings (priority sampling:
each firing draws a random key and the R smallest keys are kept). Examples across the
activation range are read off that uniform sample at its quantiles, and so is the histogram of
non-zero activations. Memory is O(d_sae · (K + R)), never O(tokens).

The pages shade every token around an example by the latent's activation, which is only known
once the examples are chosen. Rather than run the model twice, each batch's non-zero
activations are spilled to disk as sorted (token · d_sae + latent) keys — about L0 · 12 bytes a
token — and the windows are looked up there by binary search at the end."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checks import check_sae
from ..data.tokens import SpecialTokens, keep_mask
from ..files import relative_to
from ..lm import LanguageModel, capture
from ..lm.loading import model_reference
from ..lm.model import _get
from ..sae import SparseAutoencoder
from ..site import Site
from .db import connect

CONTEXT = 12  # tokens kept on each side of an example
LOGIT_NOTE = ("top logits are W_dec[i] · W_U (attention latents first pass through o_proj); the final norm "
              "is not applied, so they show direction, not calibrated probabilities")


class _Running:
    """Bounded per-latent state for one SAE, as flat entry lists (latent, value, token, key).

    Only firings are touched — L0 entries a token, not d_sae — and they are merged into the state
    in bulk: a lexsort by (latent, order) and a rank within each latent's run keeps the K largest
    values and the R smallest random keys of every latent."""

    def __init__(self, m: int, k: int, r: int, seed: int, merge_every: int = 1 << 22):
        self.m, self.k, self.r, self.merge_every = m, k, r, merge_every
        self.count = np.zeros(m, np.int64)
        self.total = np.zeros(m, np.float64)
        self.rng = np.random.default_rng(seed)
        empty = (np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32))
        self.top, self.sample, self.pending = empty, empty, []

    def update(self, latent: np.ndarray, val: np.ndarray, tok: np.ndarray) -> None:
        """One batch's firings: latent index, activation and global token index (seq · T + pos)."""
        self.count += np.bincount(latent, minlength=self.m)
        self.total += np.bincount(latent, weights=val, minlength=self.m)
        self.pending.append((latent, val, tok, self.rng.random(len(latent), dtype=np.float32)))
        if sum(len(p[0]) for p in self.pending) >= self.merge_every:
            self.merge()

    def merge(self) -> None:
        if not self.pending:
            return
        new = tuple(np.concatenate(parts) for parts in zip(*self.pending))
        self.pending = []
        top = tuple(np.concatenate(p) for p in zip(self.top, new))
        self.top = _keep(top, -top[1], self.k)
        sample = tuple(np.concatenate(p) for p in zip(self.sample, new))
        self.sample = _keep(sample, sample[3], self.r)

    def latents(self):
        """Per latent: its top (values, tokens), strongest first, and its sample (values, tokens), ascending."""
        self.merge()
        top_at = np.searchsorted(self.top[0], np.arange(self.m + 1))
        sample_at = np.searchsorted(self.sample[0], np.arange(self.m + 1))
        for j in range(self.m):
            t, s = slice(top_at[j], top_at[j + 1]), slice(sample_at[j], sample_at[j + 1])
            order = np.argsort(self.sample[1][s], kind="stable")
            yield j, (self.top[1][t], self.top[2][t]), (self.sample[1][s][order], self.sample[2][s][order])


def _keep(entries: tuple, order: np.ndarray, limit: int) -> tuple:
    """The first `limit` entries of each latent by `order` (ascending), grouped by latent."""
    latent = entries[0]
    idx = np.lexsort((order, latent))
    sorted_latent = latent[idx]
    rank = np.arange(len(idx)) - np.searchsorted(sorted_latent, sorted_latent)
    kept = idx[rank < limit]
    return tuple(a[kept] for a in entries)


class _Spill:
    """Every non-zero activation of one SAE, in token order, as two flat files on disk."""

    def __init__(self, folder: Path, m: int):
        self.m, self.paths = m, (folder / "keys.i8", folder / "vals.f4")
        self.files = [open(p, "wb") for p in self.paths]

    def append(self, latent: np.ndarray, val: np.ndarray, tok: np.ndarray) -> None:
        """Firings in token order, and by latent within a token, so that the keys stay sorted."""
        self.files[0].write((tok * self.m + latent).astype(np.int64).tobytes())
        self.files[1].write(val.astype(np.float32).tobytes())

    def windows(self, latent: np.ndarray, start: np.ndarray, length: np.ndarray, width: int) -> np.ndarray:
        """[n, width] activations of `latent` at tokens start .. start + length (0 beyond)."""
        for f in self.files:
            f.close()
        if self.paths[0].stat().st_size == 0:
            return np.zeros((len(latent), width), np.float32)
        keys = np.memmap(self.paths[0], dtype=np.int64, mode="r")
        vals = np.memmap(self.paths[1], dtype=np.float32, mode="r")
        want = (start[:, None] + np.arange(width)) * self.m + latent[:, None]
        at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
        hit = (keys[at] == want) & (np.arange(width) < length[:, None])
        return np.where(hit, vals[at], 0).astype(np.float32)


@torch.no_grad()
def _direction_logits(sae: SparseAutoencoder, lm: LanguageModel, site: Site, n: int, chunk: int = 256):
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
    for stale in db_path.parent.glob(f".{db_path.name}.*"):  # what a killed build left: partial file, spill folders
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    start = time.perf_counter()
    special = SpecialTokens.of(lm.tokenizer).ids
    sites = {name: check_sae(sae, lm) for name, (sae, _) in saes.items()}
    running = {name: _Running(sae.cfg.d_sae, top_k, sample, seed=seed + n) for n, (name, (sae, _)) in enumerate(saes.items())}
    spill_dir = tempfile.TemporaryDirectory(prefix=f".{db_path.name}.", dir=db_path.parent)
    spills = {}
    for n, name in enumerate(saes):
        (Path(spill_dir.name) / str(n)).mkdir()
        spills[name] = _Spill(Path(spill_dir.name) / str(n), saes[name][0].cfg.d_sae)
    capture_sites = sorted({str(s) for s in sites.values()})
    T = rows.shape[1]
    n_real = 0
    bar = tqdm(total=rows.numel(), unit="tok", unit_scale=True, desc=f"explore {len(saes)} SAEs", disable=not progress)
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            ids = rows[i:i + batch_size].long()
            keep = keep_mask(ids, special).reshape(-1)
            tok = np.arange(i * T, i * T + ids.numel())[keep.numpy()]
            acts = capture(lm, ids, capture_sites)
            n_real += int(keep.sum())
            for name, (sae, _) in saes.items():
                x = acts[str(sites[name])].reshape(-1, sae.cfg.d_in)[keep.to(lm.device)]
                f = sae.encode(x).float().cpu()
                row, col = f.nonzero(as_tuple=True)  # row-major: by token, then latent
                fired = (col.numpy(), f[row, col].numpy(), tok[row.numpy()])
                running[name].update(*fired)
                spills[name].append(*fired)
            bar.update(ids.numel())
    bar.close()
    con = connect(tmp)
    with con:
        con.execute("INSERT INTO meta VALUES ('logits', ?)", (LOGIT_NOTE,))
        con.execute("INSERT INTO meta VALUES ('model', ?)", (model_reference(lm.name),))
        con.executemany("INSERT INTO sequences VALUES (?, ?)",
                        [(s, rows[s].numpy().astype(np.int32).tobytes()) for s in range(len(rows))])
        used = set(rows.flatten().tolist())
        for name, (sae, path) in saes.items():
            used |= _write_sae(con, name, sae, relative_to(db_path.parent, path), sites[name], running[name], spills[name], lm, n_real,
                               rows.reshape(-1), T, bands, per_band, bins, n_logits, n_neighbours)
        con.executemany("INSERT INTO vocab VALUES (?, ?)", [(t, lm.tokenizer.decode([t])) for t in sorted(used)])
    spill_dir.cleanup()
    con.execute("VACUUM")
    con.close()
    tmp.replace(db_path)
    return {"seconds": time.perf_counter() - start, "bytes": db_path.stat().st_size, "tokens": n_real}


def firing_histogram(vals: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts and edges over the sampled firings, sorted ascending (from the smallest firing up: a
    JumpReLU latent never fires below its threshold). Binned in float64: a latent whose firings
    differ by a float32 step or two needs edges finer than float32 holds."""
    vals = np.asarray(vals, dtype=np.float64)
    return np.histogram(vals, bins=bins, range=(vals[0], vals[-1]) if len(vals) else (0.0, 1.0))


def _write_sae(con, name, sae, path, site, run: _Running, spill: _Spill, lm, n_real, flat, T, bands, per_band, bins,
               n_logits, n_neighbours) -> set[int]:
    m = sae.cfg.d_sae
    density = (run.count / max(n_real, 1)).tolist()
    mean_act = (run.total / np.maximum(run.count, 1)).tolist()
    l0 = float(run.count.sum()) / max(n_real, 1)
    con.execute("INSERT INTO saes VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, str(site), sae.cfg.target_site, sae.cfg.arch, m, sae.cfg.d_in, path, n_real, l0))
    used: set[int] = set()
    examples, latents = [], []
    for j, (top_vals, top_toks), (vals, toks) in run.latents():
        top = [(float(v), int(t)) for v, t in zip(top_vals, top_toks)]
        for rank, (v, t) in enumerate(top):
            examples.append((name, j, "top", rank, None, t // T, t % T, v))
        for band in range(bands if len(vals) else 0):  # quantile bands of the firing distribution
            lo, hi = band * len(vals) // bands, (band + 1) * len(vals) // bands
            for rank, q in enumerate(range(lo, min(hi, lo + per_band))):
                examples.append((name, j, "quantile", rank, band, int(toks[q]) // T, int(toks[q]) % T, float(vals[q])))
        hist = firing_histogram(vals, bins)
        latents.append((name, j, density[j], top[0][0] if top else 0.0, mean_act[j],
                        json.dumps({"counts": hist[0].tolist(), "edges": [round(e, 6) for e in hist[1].tolist()],
                                    "sample": int(len(vals)), "firings": int(run.count[j])}),
                        json.dumps([lm.tokenizer.decode([t]) for t in _top_tokens(top, flat)], ensure_ascii=False)))
    con.executemany("INSERT INTO latents VALUES (?, ?, ?, ?, ?, ?, ?)", latents)
    con.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", _with_windows(examples, spill, T))
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


def _with_windows(examples: list[tuple], spill: _Spill, T: int) -> list[tuple]:
    """Each example row plus its window's start and the latent's activations over it (float32 bytes)."""
    if not examples:
        return []
    latent, seq, pos = (np.array([e[i] for e in examples], dtype=np.int64) for i in (1, 5, 6))
    lo = np.maximum(pos - CONTEXT, 0)
    length = np.minimum(pos + CONTEXT + 1, T) - lo
    acts = spill.windows(latent, seq * T + lo, length, 2 * CONTEXT + 1)
    return [(*e, int(lo[i]), acts[i, :length[i]].tobytes()) for i, e in enumerate(examples)]


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


def build_dir(folder: str | Path, corpus, tokens: int, *, model=None, out: str | Path | None = None,
              batch_size: int = 8, device: str = "cpu", dtype: str = "float32", progress: bool = True) -> dict:
    """`saescope explore build DIR`: the SAEs of a run folder (or a folder of SAEs) over held-out text."""
    from ..errors import SaescopeError
    from ..data import token_tensor
    from ..lm import load_model
    from ..sae.export import member
    from ..sae.formats import load_dictionary, run_saes
    from ..sae.multilayer import MultiLayerDictionary
    from ..site import Site

    folder = Path(folder)
    store = folder / "activations" / "store.json"
    if model is None:
        if not store.is_file():
            raise SaescopeError(f"{folder} is not a `saescope run` folder; pass --model for a folder of SAEs")
        model = json.loads(store.read_text())["model"]
    found = run_saes(folder)
    saes = {}
    for name, path in found.items():
        d = load_dictionary(path)
        if not isinstance(d, MultiLayerDictionary):
            saes[name] = (d, path)
        elif d.cfg.kind == "clt":  # each layer's latents as that layer's transcoder, named as a set's would be
            d = d.fold()
            saes.update({member(name, d.cfg.sites_in, Site.parse(s).layer): (d.layer_view(i), path)
                         for i, s in enumerate(d.cfg.sites_in)})
    if not saes:
        raise SaescopeError(f"{folder} holds no SAE, transcoder or cross-layer transcoder; the explorer does not "
                            "show crosscoders yet")
    lm = load_model(model, device=device, dtype=dtype)
    saes = {name: (sae.to(lm.device), path) for name, (sae, path) in saes.items()}
    db = Path(out) if out else folder / "features.db"
    info = build(saes, lm, token_tensor(lm, corpus, tokens), db, batch_size=batch_size, progress=progress)
    return {**info, "path": str(db), "saes": len(saes)}
