"""The explorer's JSON API over a feature database (pages come next). FastAPI writes /openapi.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from ..lm import LanguageModel, capture, splice
from ..sae.formats import load_sae
from .db import connect

MAX_TEXT = 4000        # characters accepted by the live-text and steering routes
MAX_NEW_TOKENS = 64
CONTEXT = 12           # tokens shown on each side of an example


class TextRequest(BaseModel):
    text: str = Field(..., min_length=1, max_length=MAX_TEXT)
    latent: int | None = Field(None, ge=0)


class SteerRequest(BaseModel):
    prompt: str = Field(..., min_length=1, max_length=MAX_TEXT)
    latent: int = Field(..., ge=0)
    alpha: float = Field(..., ge=-1e4, le=1e4)
    max_new_tokens: int = Field(20, ge=1, le=MAX_NEW_TOKENS)


def create_app(db_path: str | Path, lm: LanguageModel | None = None) -> FastAPI:
    """The API for one database; live text and steering need the model (`lm`)."""
    con = connect(db_path, readonly=True)
    saes = {r["id"]: dict(r) for r in con.execute("SELECT * FROM saes ORDER BY id")}
    vocab = dict(con.execute("SELECT token, text FROM vocab").fetchall())
    loaded: dict[str, object] = {}
    app = FastAPI(title="saescope explorer", version="1")

    def sae_row(sae_id: str) -> dict:
        if sae_id not in saes:
            raise HTTPException(404, f"unknown SAE '{sae_id}'")
        return saes[sae_id]

    def model_sae(sae_id: str):
        row = sae_row(sae_id)
        if lm is None:
            raise HTTPException(503, "this server was started without a model; live text and steering need one")
        if sae_id not in loaded:
            loaded[sae_id] = load_sae(row["path"]).to(lm.device)
        return loaded[sae_id], row

    def text_of(token: int) -> str:
        return vocab.get(token) or (lm.tokenizer.decode([token]) if lm is not None else f"<{token}>")

    def sequence(seq: int) -> np.ndarray:
        return np.frombuffer(con.execute("SELECT tokens FROM sequences WHERE seq = ?", (seq,)).fetchone()[0], dtype=np.int32)

    @app.get("/api/saes")
    def list_saes() -> list[dict]:
        return [{k: v for k, v in r.items() if k != "path"} for r in saes.values()]

    @app.get("/api/saes/{sae_id}/latents/{latent}")
    def latent(sae_id: str, latent: int) -> dict:
        row = sae_row(sae_id)
        if not 0 <= latent < row["d_sae"]:
            raise HTTPException(404, f"latent {latent} out of range; {sae_id} has 0..{row['d_sae'] - 1}")
        stats = con.execute("SELECT * FROM latents WHERE sae = ? AND latent = ?", (sae_id, latent)).fetchone()
        examples = {"top": [], "quantile": []}
        for ex in con.execute("SELECT * FROM examples WHERE sae = ? AND latent = ? ORDER BY kind, band, rank",
                              (sae_id, latent)):
            tokens = sequence(ex["seq"])
            lo, hi = max(0, ex["pos"] - CONTEXT), min(len(tokens), ex["pos"] + CONTEXT + 1)
            examples[ex["kind"]].append({
                "act": ex["act"], "band": ex["band"], "seq": ex["seq"], "pos": ex["pos"],
                "tokens": [text_of(int(t)) for t in tokens[lo:hi]], "highlight": ex["pos"] - lo})
        logits = {"positive": [], "negative": []}
        for lg in con.execute("SELECT * FROM logits WHERE sae = ? AND latent = ? ORDER BY sign DESC, rank",
                              (sae_id, latent)):
            logits["positive" if lg["sign"] > 0 else "negative"].append({"token": text_of(lg["token"]), "value": lg["value"]})
        neighbours = [{"latent": n["other"], "cosine": n["cosine"]} for n in con.execute(
            "SELECT other, cosine FROM neighbours WHERE sae = ? AND latent = ? ORDER BY rank", (sae_id, latent))]
        return {"sae": sae_id, "latent": latent, "density": stats["density"], "max_act": stats["max_act"],
                "mean_act": stats["mean_act"], "histogram": json.loads(stats["histogram"]),
                "top_tokens": [text_of(t) for t in json.loads(stats["top_tokens"])],
                "top_examples": examples["top"], "quantile_examples": examples["quantile"], "logits": logits,
                "neighbours": neighbours,
                "logit_note": con.execute("SELECT value FROM meta WHERE key = 'logits'").fetchone()[0]}

    @app.post("/api/saes/{sae_id}/activations")
    def activations(sae_id: str, req: TextRequest) -> dict:
        sae, row = model_sae(sae_id)
        if req.latent is not None and req.latent >= row["d_sae"]:
            raise HTTPException(404, f"latent {req.latent} out of range; {sae_id} has 0..{row['d_sae'] - 1}")
        ids = lm.tokenizer(req.text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
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

        plain = generate()
        with splice(lm, site, lambda v: v + req.alpha * direction.to(v.dtype)):
            steered = generate()
        return {"prompt": req.prompt, "latent": req.latent, "alpha": req.alpha, "site": site,
                "unsteered": plain, "steered": steered}

    return app
