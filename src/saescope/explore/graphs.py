"""The explorer's attribution-graph routes: the graphs of a run's `graphs/` folder (written by
`saescope circuit` or made here from a prompt), each feature node linked to its transcoder's
latent page, and interventions on a graph's features.

A graph is read only by a slug listed in the folder's graph-metadata.json, so no name a request
sends is joined onto a path unchecked; graphs made here get a fresh slug of the server's own."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from ..circuits import Graph, Intervention, attribute, intervene
from ..circuits.files import feature_index, write_graph_files
from ..errors import SaescopeError
from ..files import read_json, write_json
from ..sae.export import member
from .db import connect

MAX_PROMPT = 400  # characters: a graph's cost grows with the square of its tokens


class GraphRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=MAX_PROMPT)
    max_feature_nodes: int = Field(1024, ge=1, le=8192)


class InterventionItem(BaseModel):
    layer: int = Field(..., ge=0)
    position: int = Field(..., ge=0)
    latent: int = Field(..., ge=0)
    value: float = Field(0.0, ge=-1e4, le=1e4)


class InterventionRequest(BaseModel):
    interventions: list[InterventionItem] = Field(..., min_length=1, max_length=64)
    new_tokens: int = Field(8, ge=0, le=32)
    freeze_attention: bool = True


def label(top_tokens: list[str]) -> str:
    """A feature node's one-line description (its clerp): its strongest tokens."""
    return " ".join(top_tokens[:3])


def add_graph_routes(app: FastAPI, folder: Path, lm, unit, unit_name: str | None, sae_ids: set[str],
                     model_lock: threading.Lock, con) -> None:
    """Routes under /api/graphs. `unit` (a transcoder set or CLT, named `unit_name`) makes new
    graphs, labelled from the feature database where it holds their layers, and runs
    interventions; without it, graphs are read only."""

    def index() -> list[dict]:
        path = folder / "graph-metadata.json"
        return read_json(path).get("graphs", []) if path.is_file() else []

    def read(slug: str) -> dict:
        if slug not in {g["slug"] for g in index()}:
            raise HTTPException(404, f"no graph {slug!r} here")
        return read_json(folder / f"{slug}.json")

    def feature_saes(data: dict) -> dict[str, str]:
        """Each layer's transcoder in the feature database, where it holds the graph's set."""
        scan = data["metadata"].get("scan", "")
        sites = [f"mlp_in.{i}" for i in range(lm.n_layers)]
        named = {layer: member(scan, sites, layer) for layer in range(lm.n_layers)}
        return {str(layer): sae for layer, sae in named.items() if sae in sae_ids}

    @app.get("/api/graphs")
    def list_graphs() -> dict:
        return {"graphs": index(), "can_make": unit is not None}

    @app.get("/api/graphs/{slug}")
    def graph(slug: str) -> dict:
        data = read(slug)
        return {**data, "feature_saes": feature_saes(data)}

    def need_unit():
        if unit is None:
            raise HTTPException(409, "this server has no transcoders: start it with `saescope serve DIR --transcoders ...` "
                                     "to make graphs and intervene")

    @app.post("/api/graphs")
    def make(req: GraphRequest) -> dict:
        need_unit()
        slug = f"graph-{time.strftime('%Y%m%d-%H%M%S')}-{time.perf_counter_ns() % 100000:05d}"
        try:
            with model_lock:
                g = attribute(lm, unit, req.prompt, max_feature_nodes=req.max_feature_nodes, progress=False,
                              dictionary=unit_name or "")
        except SaescopeError as exc:
            raise HTTPException(422, str(exc)) from None
        sites = [f"mlp_in.{i}" for i in range(lm.n_layers)]
        labels = feature_labels(con, g, lambda layer: member(unit_name or "", sites, layer))
        write_graph_files(g, folder, slug, labels=labels)
        return {"slug": slug}

    @app.post("/api/graphs/{slug}/intervene")
    def run(slug: str, req: InterventionRequest) -> dict:
        need_unit()
        data = read(slug)
        try:
            with model_lock:
                return intervene(lm, unit, data["metadata"]["prompt"],
                                 [Intervention(i.layer, i.position, i.latent, i.value) for i in req.interventions],
                                 new_tokens=req.new_tokens, freeze_attention=req.freeze_attention)
        except SaescopeError as exc:
            raise HTTPException(422, str(exc)) from None


def feature_labels(con, graph: Graph, sae_of_layer) -> dict[tuple[int, int], str]:
    """Each feature node's label (its top tokens) where the database holds its layer's dictionary."""
    labels = {}
    for layer, latent in {(int(f[0]), int(f[2])) for f in graph.features}:
        row = con.execute("SELECT top_tokens FROM latents WHERE sae = ? AND latent = ?",
                          (sae_of_layer(layer), latent)).fetchone()
        if row is not None:
            labels[(layer, latent)] = label(json.loads(row[0]))
    return labels


def feature_files(graph: Graph, db_path: str | os.PathLike, sae_of_layer, out: str | os.PathLike,
                  scan: str) -> dict[tuple[int, int], str]:
    """Each feature node's page as circuit-tracer's frontend and Neuronpedia's graph view load it
    (`out/{scan}/{feature_index}.json`: activation range, examples by quantile, top and bottom
    logits), from an explorer database holding the transcoders; `sae_of_layer(layer)` names the
    database's dictionary of that layer. Returns each feature's label (its top tokens) for the
    graph's clerps. A feature the database does not hold is a one-line error."""
    db = Path(db_path)
    if not db.is_file():
        raise SaescopeError(f"no feature database at {db}")
    con = connect(db, readonly=True)
    folder = Path(out) / scan
    vocab = {r["token"]: r["text"] for r in con.execute("SELECT token, text FROM vocab")}
    try:
        for layer, latent in sorted({(int(f[0]), int(f[2])) for f in graph.features}):
            sae = sae_of_layer(layer)
            stats = con.execute("SELECT * FROM latents WHERE sae = ? AND latent = ?", (sae, latent)).fetchone()
            if stats is None:
                raise SaescopeError(f"{db} holds no latent {latent} of {sae} (layer {layer}); build it from the "
                                    "transcoders the graph used (saescope explore build)")
            quantiles: dict[str, list] = {}
            for ex in con.execute("SELECT * FROM examples WHERE sae = ? AND latent = ? ORDER BY kind DESC, band, rank",
                                  (sae, latent)):
                acts = np.frombuffer(ex["acts"], dtype=np.float32)
                row = np.frombuffer(con.execute("SELECT tokens FROM sequences WHERE seq = ?", (ex["seq"],)).fetchone()[0],
                                    dtype=np.int32)[ex["lo"]:ex["lo"] + len(acts)]
                name = "Top activations" if ex["kind"] == "top" else f"Subsample interval {ex['band']}"
                quantiles.setdefault(name, []).append({
                    "tokens": [vocab.get(int(t), "") for t in row], "tokens_acts_list": acts.tolist(),
                    "train_token_ind": ex["pos"] - ex["lo"], "is_repeated_datapoint": False})
            logits = {sign: [vocab.get(r["token"], "") for r in con.execute(
                "SELECT token FROM logits WHERE sae = ? AND latent = ? AND sign = ? ORDER BY rank", (sae, latent, sign))]
                for sign in (1, -1)}
            write_json(folder / f"{feature_index(layer, latent)}.json", {
                "index": feature_index(layer, latent), "layer": layer, "latent": latent, "act_min": 0.0,
                "act_max": float(stats["max_act"]), "density": float(stats["density"]),
                "examples_quantiles": [{"quantile_name": k, "examples": v} for k, v in quantiles.items()],
                "top_logits": logits[1], "bottom_logits": logits[-1], "top_tokens": json.loads(stats["top_tokens"])})
        return feature_labels(con, graph, sae_of_layer)
    finally:
        con.close()
