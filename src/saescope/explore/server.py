"""The explorer: a JSON API over a feature database and the pages that use it (static/, no CDN).

Pages are one vanilla-JS app (static/app.js) routed by the URL fragment, so every asset is a
file in this package. FastAPI writes /openapi.json. The only files served from disk outside the
package are the run's report plots, by name from a fixed list: nothing a request names is ever
joined onto a path."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from ..errors import SaescopeError
from ..evals.report import TABLE_KEYS, WITH_SE
from ..files import read_json, recorded_path
from ..lm import LanguageModel, capture, splice
from ..sae.formats import load_dictionary
from ..sae.multilayer import MultiLayerDictionary
from .db import connect
from .graphs import add_graph_routes

MAX_TEXT = 4000        # characters accepted by the live-text and steering routes
MAX_BODY = 64 * 1024   # bytes of a request body: MAX_TEXT characters of JSON-escaped UTF-8 fit
MAX_NEW_TOKENS = 64
PLOTS = ("pareto.png", "architectures.png", "firing_frequency.png", "by_position.png")  # written by the report
STATIC = Path(__file__).parent / "static"
Sort = Literal["latent", "density", "max_act", "mean_act"]  # the latent columns the list may be ordered by


class TextRequest(BaseModel):
    text: str = Field(..., min_length=1, max_length=MAX_TEXT)
    latent: int | None = Field(None, ge=0)


class SteerRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=MAX_TEXT)
    latent: int = Field(..., ge=0)
    alpha: float = Field(..., ge=-1e4, le=1e4)
    max_new_tokens: int = Field(20, ge=1, le=MAX_NEW_TOKENS)


def create_app(db_path: str | Path, lm: LanguageModel | None = None, run_dir: str | Path | None = None,
               transcoders=None, transcoders_name: str | None = None) -> FastAPI:
    """The app for one database; live text and steering need the model (`lm`). `run_dir` (default:
    the database's folder) is where the report's eval.json and plots and the graphs/ folder are
    looked for; `transcoders` (a set or CLT, named `transcoders_name`) make new graphs there."""
    db_path = Path(db_path)
    con = connect(db_path, readonly=True)
    saes = {r["id"]: dict(r) for r in con.execute("SELECT * FROM saes ORDER BY id")}
    vocab = dict(con.execute("SELECT token, text FROM vocab").fetchall())
    model_name = (con.execute("SELECT value FROM meta WHERE key = 'model'").fetchone() or ["?"])[0]
    run_dir = Path(run_dir) if run_dir else db_path.parent
    metrics = {r["sae"]: {k: r.get(k) for k in (*TABLE_KEYS, *(f"{k}_se" for k in WITH_SE))} for r in
               (read_json(run_dir / "eval.json") if (run_dir / "eval.json").is_file() else [])}
    plots = {name: run_dir / name for name in PLOTS if (run_dir / name).is_file()}
    loaded: dict[str, object] = {}
    model_lock = threading.Lock()  # steering hooks the shared model: no other forward may pass meanwhile
    app = FastAPI(title="saescope explorer", version="1")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        """Refuse an over-long body before reading it (413), or one of unstated length (411)."""
        size = request.headers.get("content-length")
        if request.method in ("POST", "PUT", "PATCH"):
            if size is None or not size.isdigit():
                return JSONResponse({"detail": "a request body needs a Content-Length"}, status_code=411)
            if int(size) > MAX_BODY:
                return JSONResponse({"detail": f"request body over {MAX_BODY} bytes"}, status_code=413)
        return await call_next(request)

    def sae_row(sae_id: str) -> dict:
        if sae_id not in saes:
            raise HTTPException(404, f"unknown SAE '{sae_id}'")
        return saes[sae_id]

    def model_sae(sae_id: str):
        row = sae_row(sae_id)
        if lm is None:
            raise HTTPException(503, "this server was started without a model; live text and steering need one")
        with model_lock:
            if sae_id not in loaded:
                path = recorded_path(db_path.parent, row["path"])
                if not path.exists():
                    raise HTTPException(503, f"the files of SAE '{sae_id}' are missing: {path} (moved or deleted "
                                             "since the database was built); put them back or rebuild the database")
                try:
                    sae = load_dictionary(path)
                except SaescopeError as exc:
                    raise HTTPException(503, f"SAE '{sae_id}' cannot be loaded from {path}: {exc}") from None
                if isinstance(sae, MultiLayerDictionary):  # a CLT's latents of one layer, as explore/build.py lists them
                    sae = sae.layer_view(sae.cfg.sites_in.index(row["site"]))
                loaded[sae_id] = sae.to(lm.device)
        return loaded[sae_id], row

    def text_of(token: int) -> str:
        return vocab.get(token) or (lm.tokenizer.decode([token]) if lm is not None else f"<{token}>")

    def sequence(seq: int) -> np.ndarray:
        return np.frombuffer(con.execute("SELECT tokens FROM sequences WHERE seq = ?", (seq,)).fetchone()[0], dtype=np.int32)

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/plots/{name}", include_in_schema=False)
    def plot(name: str) -> FileResponse:
        if name not in plots:
            raise HTTPException(404, f"no plot '{name}'")
        return FileResponse(plots[name])

    @app.get("/api/run")
    def run_info() -> dict:
        """The model, and the report's plots (URLs) when the run folder has them."""
        return {"model": model_name, "plots": [f"/plots/{name}" for name in plots], "live": lm is not None}

    @app.get("/api/saes")
    def list_saes() -> list[dict]:
        return [{**{k: v for k, v in r.items() if k != "path"}, "metrics": metrics.get(r["id"])} for r in saes.values()]

    @app.get("/api/saes/{sae_id}/latents")
    def list_latents(sae_id: str, sort: Sort = "density",
                     order: Literal["asc", "desc"] = "desc", q: str = Query("", max_length=200),
                     offset: int = Query(0, ge=0), limit: int = Query(100, ge=1, le=1000)) -> dict:
        """One page of latents, sorted; `q` keeps those whose number or top tokens contain it."""
        sae_row(sae_id)
        where, args = "sae = ?", [sae_id]
        if q:
            where += " AND (CAST(latent AS TEXT) = ? OR instr(lower(top_tokens), lower(?)) > 0)"
            args += [q.strip(), json.dumps(q, ensure_ascii=False)[1:-1]]
        total = con.execute(f"SELECT count(*) FROM latents WHERE {where}", args).fetchone()[0]
        rows = con.execute(f"SELECT latent, density, max_act, mean_act, top_tokens FROM latents WHERE {where} "
                           f"ORDER BY {sort} {order.upper()}, latent LIMIT ? OFFSET ?", args + [limit, offset])
        return {"total": total, "offset": offset, "latents": [
            {**{k: r[k] for k in ("latent", "density", "max_act", "mean_act")},
             "top_tokens": json.loads(r["top_tokens"])} for r in rows]}

    @app.get("/api/saes/{sae_id}/latents/{latent}")
    def latent(sae_id: str, latent: int) -> dict:
        row = sae_row(sae_id)
        if not 0 <= latent < row["d_sae"]:
            raise HTTPException(404, f"latent {latent} out of range; {sae_id} has 0..{row['d_sae'] - 1}")
        stats = con.execute("SELECT * FROM latents WHERE sae = ? AND latent = ?", (sae_id, latent)).fetchone()
        examples = {"top": [], "quantile": []}
        for ex in con.execute("SELECT * FROM examples WHERE sae = ? AND latent = ? ORDER BY kind, band, rank",
                              (sae_id, latent)):
            acts = np.frombuffer(ex["acts"], dtype=np.float32)
            tokens = sequence(ex["seq"])[ex["lo"]:ex["lo"] + len(acts)]
            examples[ex["kind"]].append({
                "act": ex["act"], "band": ex["band"], "seq": ex["seq"], "pos": ex["pos"],
                "tokens": [text_of(int(t)) for t in tokens], "acts": acts.tolist(), "highlight": ex["pos"] - ex["lo"]})
        logits = {"positive": [], "negative": []}
        for lg in con.execute("SELECT * FROM logits WHERE sae = ? AND latent = ? ORDER BY sign DESC, rank",
                              (sae_id, latent)):
            logits["positive" if lg["sign"] > 0 else "negative"].append({"token": text_of(lg["token"]), "value": lg["value"]})
        neighbours = [{"latent": n["other"], "cosine": n["cosine"]} for n in con.execute(
            "SELECT other, cosine FROM neighbours WHERE sae = ? AND latent = ? ORDER BY rank", (sae_id, latent))]
        return {"sae": sae_id, "latent": latent, "density": stats["density"], "max_act": stats["max_act"],
                "mean_act": stats["mean_act"], "histogram": json.loads(stats["histogram"]),
                "top_tokens": json.loads(stats["top_tokens"]),
                "top_examples": examples["top"], "quantile_examples": examples["quantile"], "logits": logits,
                "neighbours": neighbours,
                "logit_note": con.execute("SELECT value FROM meta WHERE key = 'logits'").fetchone()[0]}

    @app.post("/api/saes/{sae_id}/activations")
    def activations(sae_id: str, req: TextRequest) -> dict:
        sae, row = model_sae(sae_id)
        if req.latent is not None and req.latent >= row["d_sae"]:
            raise HTTPException(404, f"latent {req.latent} out of range; {sae_id} has 0..{row['d_sae'] - 1}")
        ids = lm.tokenizer(req.text, return_tensors="pt")["input_ids"]
        with torch.no_grad(), model_lock:
            f = sae.encode(capture(lm, ids, row["site"])[row["site"]][0]).cpu()
        tokens = [lm.tokenizer.decode([t]) for t in ids[0].tolist()]
        if req.latent is not None:
            return {"tokens": tokens, "latent": req.latent, "activations": f[:, req.latent].tolist()}
        fired = torch.nonzero(f.sum(0) > 0).flatten()
        per_token = [{int(j): float(f[t, j]) for j in torch.nonzero(f[t] > 0).flatten()} for t in range(len(tokens))]
        top = f[:, fired].max(0).values.argsort(descending=True)[:20]
        return {"tokens": tokens, "per_token": per_token,
                "top_latents": [{"latent": int(fired[i]), "max_act": float(f[:, fired[i]].max())} for i in top]}

    @app.post("/api/saes/{sae_id}/steer")
    def steer(sae_id: str, req: SteerRequest) -> dict:
        sae, row = model_sae(sae_id)
        if req.latent >= row["d_sae"]:
            raise HTTPException(404, f"latent {req.latent} out of range; {sae_id} has 0..{row['d_sae'] - 1}")
        ids = lm.tokenizer(req.prompt, return_tensors="pt")["input_ids"].to(lm.device)
        direction = sae.W_dec[req.latent].detach()
        site = row["target_site"] or row["site"]

        def generate():
            with torch.no_grad():
                out = lm.model.generate(ids, max_new_tokens=req.max_new_tokens, do_sample=False)
            return lm.tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)

        with model_lock:
            plain = generate()
            with splice(lm, site, lambda v: v + req.alpha * direction.to(v.dtype)):
                steered = generate()
        return {"prompt": req.prompt, "latent": req.latent, "alpha": req.alpha, "site": site,
                "unsteered": plain, "steered": steered}

    if lm is not None:
        add_graph_routes(app, run_dir / "graphs", lm, transcoders, transcoders_name, set(saes), model_lock, con)
    return app
