"""Neuronpedia export: the feature database written in Neuronpedia's upload format (that of its
convert-saedashboard-to-neuronpedia-export.py), so SAEs trained and explored here can be published there.

One Neuronpedia source per SAE, sourceId = f"{layer}-{source_set}__{SAE id}" with every run of characters
other than letters, digits, '_' and '-' in the SAE id replaced by '_' (resid.6-jumprelu-2k, set saescope →
6-saescope__resid_6-jumprelu-2k):

    {out}/{modelId}/{sourceId}/release.jsonl, model.jsonl, sourceset.jsonl, source.jsonl   one JSON line each
    {out}/{modelId}/{sourceId}/{features,activations,explanations}/batch-{n}.jsonl.gz      latents n·batch_size …

The output is reproducible: ids are built from (source, latent, example) instead of random cuids, createdAt
is the database's modification time, gzip headers carry no timestamp. creatorId is a placeholder
("saescope-export"): Neuronpedia assigns the real creator on upload. The database holds no LLM explanations,
so each latent with top tokens gets one that lists them and says so, unless `explanations` gives the user's.
"""

from __future__ import annotations

import gzip
import json
import re
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import groupby, pairwise
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..errors import SaescopeError
from ..files import atomic_write
from ..lm.loading import model_provenance
from ..site import Site
from .db import connect

CREATOR_ID = "saescope-export"
TOP_TOKENS_NOTE = "not an LLM explanation: the distinct tokens at the latent's strongest activations"


@dataclass(frozen=True)
class _Source:
    sae: str
    id: str
    base: dict  # modelId, layer (= source id), createdAt: shared by its features, activations, explanations
    bands: int  # quantile bands per latent
    user: dict[int, str]  # the user's explanations by latent


def export_neuronpedia(db_path: str | Path, out_dir: str | Path, *, model_id: str | None = None,
                       source_set: str = "saescope", creator_name: str = "saescope user",
                       release_id: str | None = None, release_title: str | None = None, url: str = "",
                       hf_repo_id: str | None = None, explanations: dict[str, dict[int, str]] | None = None,
                       batch_size: int = 128, progress: bool = True) -> dict:
    """Write the Neuronpedia export of the database at `db_path` under `out_dir`. `model_id` defaults to
    the database's model name (last path part, lowercased); `explanations` ({SAE id: {latent: text}})
    replaces the top-token explanation of the latents it names; `hf_repo_id` is where the SAE folders are
    published (each source's hfFolderId is its folder's name). Returns a summary."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise SaescopeError(f"no feature database at {db_path}")
    if batch_size < 1:
        raise SaescopeError(f"batch_size must be at least 1, got {batch_size}")
    explanations = explanations or {}
    with closing(connect(db_path, readonly=True)) as con:
        try:
            saes = [dict(r) for r in con.execute("SELECT * FROM saes ORDER BY id")]
            meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as exc:
            raise SaescopeError(f"{db_path} is not a saescope feature database ({exc})") from None
        if not saes:
            raise SaescopeError(f"{db_path} holds no SAEs")
        if unknown := sorted(set(explanations) - {s["id"] for s in saes}):
            raise SaescopeError(f"explanations name SAEs not in {db_path}: {', '.join(unknown)}")
        model_id = _checked("model_id", model_id or _slug(meta.get("model", "").rsplit("/", 1)[-1].lower(), True),
                            dots=True)
        source_set = _checked("source_set", source_set)
        release_id = _checked("release_id", release_id or _slug(f"{source_set}-{model_id}"))
        ids = {s["id"]: f"{Site.parse(s['site']).layer}-{source_set}__{_slug(s['id'])}" for s in saes}
        if len(set(ids.values())) < len(ids):
            raise SaescopeError("two SAE ids give the same Neuronpedia source id; rename one")
        created = datetime.fromtimestamp(db_path.stat().st_mtime, timezone.utc).isoformat()
        title = release_title or f"saescope SAEs on {model_id}"
        urls = [url] if url else []
        default = ids[saes[0]["id"]]
        d_model = next((s["d_in"] for s in saes if Site.parse(s["site"]).kind != "attn"), None)
        headers = {
            "release.jsonl": {
                "name": release_id, "description": title, "creatorName": creator_name, "creatorId": CREATOR_ID,
                "visibility": "PUBLIC", "isNewUi": False, "featured": False, "descriptionShort": title,
                "urls": urls, "creatorEmail": None, "creatorNameShort": creator_name,
                "defaultSourceSetName": source_set, "defaultSourceId": default, "defaultUmapSourceIds": [],
                "createdAt": created},
            "model.jsonl": {
                "id": model_id, "instruct": model_id.endswith("-it"), "creatorId": CREATOR_ID,
                "displayNameShort": model_id, "displayName": _display_name(model_id, meta.get("model")),
                "tlensId": None, "dimension": d_model,
                "visibility": "PUBLIC", "defaultSourceSetName": source_set, "defaultSourceId": default,
                "inferenceEnabled": True, "layers": 0, "neuronsPerLayer": 0, "createdAt": created, "owner": "",
                "updatedAt": created, "website": None},
            "sourceset.jsonl": {
                "modelId": model_id, "name": source_set, "creatorId": CREATOR_ID, "hasDashboards": True,
                "visibility": "PUBLIC", "description": title, "type": "", "creatorName": creator_name,
                "urls": urls, "creatorEmail": None, "releaseName": release_id, "defaultOfModelId": None,
                "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
                "showHeadAttribution": False, "showUmap": False, "createdAt": created},
        }
        prompts = con.execute("SELECT COUNT(*), MAX(length(tokens)) / 4 FROM sequences").fetchone()
        vocab = dict(con.execute("SELECT token, text FROM vocab").fetchall())
        root = Path(out_dir) / model_id
        counts = {"features": 0, "activations": 0, "explanations": 0}
        bar = tqdm(total=sum(-(-s["d_sae"] // batch_size) for s in saes), unit="batch", desc="neuronpedia export",
                   disable=not progress)
        for sae in saes:
            source_id = ids[sae["id"]]
            folder = root / source_id
            source = _source_line(sae, source_id, model_id, source_set, hf_repo_id, *prompts, created)
            for name, line in {**headers, "source.jsonl": source}.items():
                atomic_write(folder / name, _jsonl([line]))
            max_band = con.execute("SELECT MAX(band) FROM examples WHERE sae = ?", (sae["id"],)).fetchone()[0]
            base = {"modelId": model_id, "layer": source_id, "createdAt": created}
            src = _Source(sae["id"], source_id, base, 0 if max_band is None else max_band + 1,
                          explanations.get(sae["id"], {}))
            written = set()
            for n, start in enumerate(range(0, sae["d_sae"], batch_size)):
                for kind, lines in _batch(con, src, vocab, start, min(start + batch_size, sae["d_sae"]) - 1).items():
                    if lines or kind == "features":
                        written.add(path := folder / kind / f"batch-{n}.jsonl.gz")
                        atomic_write(path, gzip.compress(_jsonl(lines), mtime=0))
                    counts[kind] += len(lines)
                bar.update()
            for stale in set(folder.glob("*/batch-*.jsonl.gz")) - written:  # left by an earlier, larger export
                stale.unlink()
        bar.close()
    return {"out": str(root), "sources": list(ids.values()), **counts}


def _display_name(model_id: str, model: str | None) -> str:
    """The model's name on Neuronpedia; the embedded model's says it is a dequantised GGUF."""
    source = model_provenance(model)
    return f"{model_id} ({source['weights']}; {source['file']} sha256 {source['sha256'][:12]})" if source else model_id


def _source_line(sae: dict, source_id: str, model_id: str, source_set: str, hf_repo_id: str | None,
                 n_prompts: int, prompt_len: int, created: str) -> dict:
    site = Site.parse(sae["site"])
    what = f"transcoder {site} → {sae['target_site']}" if sae["target_site"] else "SAE"
    return {
        "id": source_id, "modelId": model_id, "setName": source_set, "creatorId": CREATOR_ID,
        "hasDashboards": True, "inferenceEnabled": True, "inferenceHosts": [], "saelensConfig": None,
        "saelensRelease": None, "saelensSaeId": None, "hfRepoId": hf_repo_id,
        "hfFolderId": Path(sae["path"]).name if hf_repo_id else None, "visibility": "PUBLIC",
        "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
        "num_prompts": n_prompts, "num_tokens_in_prompt": prompt_len, "dataset": None,
        "notes": f"built by saescope over {sae['n_tokens']} held-out tokens: {sae['arch']} {what} on "
                 f"{site.tl_name}, {sae['d_sae']} latents (saescope id {sae['id']})",
        "createdAt": created}


def _batch(con: sqlite3.Connection, src: _Source, vocab: dict[int, str], lo: int, hi: int) -> dict[str, list[dict]]:
    """The feature, activation and explanation lines of latents lo..hi of one source."""
    args = (src.sae, lo, hi)
    latents = con.execute("SELECT * FROM latents WHERE sae = ? AND latent BETWEEN ? AND ? ORDER BY latent", args)
    logits = _by_latent(con.execute("SELECT latent, sign, token, value FROM logits WHERE sae = ? AND latent BETWEEN ? "
                                    "AND ? ORDER BY latent, sign, rank", args))
    neighbours = _by_latent(con.execute("SELECT latent, other, cosine FROM neighbours WHERE sae = ? AND latent "
                                        "BETWEEN ? AND ? ORDER BY latent, rank", args))
    examples = _by_latent(con.execute(  # window tokens: int32 and float32 are both 4 bytes, so the same byte range
        "SELECT e.*, substr(s.tokens, 4 * e.lo + 1, length(e.acts)) AS window FROM examples e JOIN sequences s "
        "USING (seq) WHERE e.sae = ? AND e.latent BETWEEN ? AND ? ORDER BY e.latent, e.kind DESC, e.band, e.rank",
        args))
    out: dict[str, list[dict]] = {"features": [], "activations": [], "explanations": []}
    for row in latents:
        j = row["latent"]
        out["features"].append(_feature(src, row, logits.get(j, []), neighbours.get(j, []), vocab))
        bands: dict[int, list[float]] = {}
        for e in examples.get(j, []):
            if e["band"] is not None:
                bands.setdefault(e["band"], []).append(e["act"])
        out["activations"] += [_activation(src, e, vocab, bands) for e in examples.get(j, [])]
        tokens = json.loads(row["top_tokens"])
        if j in src.user or tokens:
            out["explanations"].append(_explanation(src, j, src.user.get(j), tokens))
    return out


def _feature(src: _Source, row: sqlite3.Row, logits: list[sqlite3.Row], neighbours: list[sqlite3.Row],
             vocab: dict[int, str]) -> dict:
    hist = json.loads(row["histogram"])
    edges = hist["edges"]
    neg, pos = ([r for r in logits if r["sign"] == sign] for sign in (-1, 1))
    return {
        **src.base, "index": str(row["latent"]), "creatorId": CREATOR_ID, "maxActApprox": row["max_act"],
        "hasVector": False, "vector": [], "vectorLabel": None, "vectorDefaultSteerStrength": row["max_act"],
        "hookName": None, "topkCosSimIndices": [r["other"] for r in neighbours],
        "topkCosSimValues": [r["cosine"] for r in neighbours], "neuron_alignment_indices": [],
        "neuron_alignment_values": [], "neuron_alignment_l1": [], "correlated_neurons_indices": [],
        "correlated_neurons_pearson": [], "correlated_neurons_l1": [], "correlated_features_indices": [],
        "correlated_features_pearson": [], "correlated_features_l1": [],
        "neg_str": [vocab[r["token"]] for r in neg], "neg_values": [r["value"] for r in neg],
        "pos_str": [vocab[r["token"]] for r in pos], "pos_values": [r["value"] for r in pos],
        "frac_nonzero": row["density"], "freq_hist_data_bar_heights": hist["counts"],
        "freq_hist_data_bar_values": [(a + b) / 2 for a, b in pairwise(edges)],
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": []}


def _activation(src: _Source, e: sqlite3.Row, vocab: dict[int, str], bands: dict[int, list[float]]) -> dict:
    """One stored example; quantile examples carry their band's activation range among the latent's examples."""
    values = np.frombuffer(e["acts"], np.float32).tolist()
    peak = int(np.argmax(values))
    band = bands.get(e["band"])
    tag = "top" if band is None else f"q{e['band']}"
    return {
        "id": f"{src.id}-{e['latent']}-{tag}-{e['rank']}", **src.base, "index": str(e["latent"]),
        "tokens": [vocab[t] for t in np.frombuffer(e["window"], np.int32).tolist()], "maxValue": values[peak],
        "maxValueTokenIndex": peak, "minValue": min(values), "values": values, "creatorId": CREATOR_ID,
        "dataSource": None, "dataIndex": str(e["seq"]), "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
        "lossValues": [], "logitContributions": None, "binMin": min(band) if band else None,
        "binMax": max(band) if band else None, "binContains": 1 / src.bands if band else None,
        "qualifyingTokenIndex": e["pos"] - e["lo"]}


def _explanation(src: _Source, latent: int, user: str | None, tokens: list[str]) -> dict:
    return {
        "id": f"{src.id}-{latent}-explanation", **src.base, "index": str(latent),
        "description": user if user is not None else
        "top tokens: " + ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens),
        "authorId": CREATOR_ID, "embedding": None, "triggeredById": None,
        "typeName": "saescope-top-tokens" if user is None else "user", "explanationModelName": None,
        "notes": TOP_TOKENS_NOTE if user is None else None}


def _jsonl(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()


def _by_latent(rows: Iterable[sqlite3.Row]) -> dict[int, list[sqlite3.Row]]:
    return {j: list(group) for j, group in groupby(rows, key=lambda r: r["latent"])}


def _slug(text: str, dots: bool = False) -> str:
    """`text` with each run of characters other than letters, digits, '_', '-' (and '.' if `dots`) as '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]+" if dots else r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def _checked(what: str, value: str, dots: bool = False) -> str:
    if not value or _slug(value, dots) != value:
        allowed = "letters, digits, '-', '_'" + (" and '.'" if dots else "")
        raise SaescopeError(f"{what} {value!r}: use only {allowed}")
    return value
