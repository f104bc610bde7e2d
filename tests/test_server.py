"""The explorer's JSON API on a feature database built from a tiny model."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from saescope.explore.server import MAX_TEXT, create_app


@pytest.fixture
def client(tiny_lm, feature_db):
    return TestClient(create_app(feature_db[3], lm=tiny_lm))


def test_saes_and_latent_pages(client):
    saes = client.get("/api/saes").json()
    assert [(s["id"], s["site"], s["d_sae"]) for s in saes] == [("attn.0", "attn.0", 24), ("resid.1", "resid.1", 24)]
    body = client.get("/api/saes/resid.1/latents/3").json()
    for key in ("density", "histogram", "top_examples", "quantile_examples", "logits", "neighbours", "top_tokens"):
        assert key in body
    if body["top_examples"]:
        ex = body["top_examples"][0]
        assert ex["act"] == pytest.approx(body["max_act"]) and 0 <= ex["highlight"] < len(ex["tokens"])
    assert len(body["logits"]["positive"]) == 10 and len(body["neighbours"]) == 10
    assert "final norm is not applied" in body["logit_note"]


@pytest.mark.parametrize("path, message", [
    ("/api/saes/nope/latents/0", "unknown SAE 'nope'"),
    ("/api/saes/resid.1/latents/24", "latent 24 out of range; resid.1 has 0..23"),
    ("/api/saes/..%2F..%2Fetc/latents/0", ""),  # traversal: no route, 404
])
def test_unknown_ids_are_404(client, path, message):
    r = client.get(path)
    assert r.status_code == 404 and message in r.json()["detail"]


def test_live_text_and_steering(client):
    r = client.post("/api/saes/resid.1/activations", json={"text": "The quick brown fox"}).json()
    assert r["tokens"][0] and len(r["per_token"]) == len(r["tokens"]) and r["top_latents"]
    one = client.post("/api/saes/resid.1/activations", json={"text": "The quick brown fox", "latent": 5}).json()
    assert len(one["activations"]) == len(one["tokens"])
    assert client.post("/api/saes/resid.1/activations", json={"text": "x" * (MAX_TEXT + 1)}).status_code == 422
    assert client.post("/api/saes/resid.1/activations", json={"text": "hi", "latent": 99}).status_code == 404
    s = client.post("/api/saes/resid.1/steer", json={"prompt": "The quick", "latent": 3, "alpha": 80.0,
                                                     "max_new_tokens": 6}).json()
    assert set(s) >= {"unsteered", "steered"} and s["steered"] != s["unsteered"]
    assert client.post("/api/saes/resid.1/steer", json={"prompt": "a", "latent": 1, "alpha": 1,
                                                        "max_new_tokens": 10_000}).status_code == 422


def test_openapi_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/saes", "/api/saes/{sae_id}/latents/{latent}", "/api/saes/{sae_id}/activations",
            "/api/saes/{sae_id}/steer"} <= set(paths)
