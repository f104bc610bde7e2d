"""The explorer's JSON API on a feature database built from a tiny model."""

from __future__ import annotations

from pathlib import Path

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
    assert client.post("/api/saes/resid.1/steer", json={"prompt": "a" * (MAX_TEXT + 1), "latent": 1,
                                                        "alpha": 1}).status_code == 422
    r = client.post("/api/saes/resid.1/steer", json={"prompt": "a", "latent": 24, "alpha": 1})
    assert r.status_code == 404 and "latent 24 out of range" in r.json()["detail"]
    assert client.post("/api/saes/nope/steer", json={"prompt": "a", "latent": 1, "alpha": 1}).status_code == 404
    assert client.post("/api/saes/nope/activations", json={"text": "a"}).status_code == 404


def test_openapi_lists_every_route(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/run", "/api/saes", "/api/saes/{sae_id}/latents", "/api/saes/{sae_id}/latents/{latent}",
            "/api/saes/{sae_id}/activations", "/api/saes/{sae_id}/steer", "/api/graphs", "/api/graphs/{slug}",
            "/api/graphs/{slug}/intervene"} == set(paths)


def test_latent_list_sorts_searches_and_pages(client):
    page = client.get("/api/saes/resid.1/latents", params={"sort": "density", "order": "desc", "limit": 5}).json()
    assert page["total"] == 24 and len(page["latents"]) == 5
    densities = [r["density"] for r in page["latents"]]
    assert densities == sorted(densities, reverse=True)
    everything = client.get("/api/saes/resid.1/latents", params={"sort": "max_act", "order": "asc", "limit": 1000}).json()
    maxes = [r["max_act"] for r in everything["latents"]]
    assert maxes == sorted(maxes) and sorted(r["latent"] for r in everything["latents"]) == list(range(24))
    second = client.get("/api/saes/resid.1/latents", params={"sort": "latent", "order": "asc", "offset": 5, "limit": 5}).json()
    assert [r["latent"] for r in second["latents"]] == [5, 6, 7, 8, 9]
    assert [r["latent"] for r in client.get("/api/saes/resid.1/latents", params={"q": "7"}).json()["latents"]][:1] == [7]
    with_tokens = next(r for r in everything["latents"] if r["top_tokens"])
    word = with_tokens["top_tokens"][0]
    found = client.get("/api/saes/resid.1/latents", params={"q": word, "limit": 1000}).json()["latents"]
    assert with_tokens["latent"] in [r["latent"] for r in found]
    assert all(any(word.lower() in t.lower() for t in r["top_tokens"]) or str(r["latent"]) == word for r in found)
    for bad in ({"sort": "density; DROP TABLE latents"}, {"order": "sideways"}, {"limit": 0}, {"q": "x" * 201}):
        assert client.get("/api/saes/resid.1/latents", params=bad).status_code == 422
    assert client.get("/api/saes/nope/latents").status_code == 404


def test_examples_carry_shaded_windows(client):
    body = client.get("/api/saes/resid.1/latents/3").json()
    for ex in body["top_examples"] + body["quantile_examples"]:
        assert len(ex["acts"]) == len(ex["tokens"]) and ex["acts"][ex["highlight"]] == pytest.approx(ex["act"])


def test_pages_plots_and_file_traversal(tiny_lm, feature_db, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "pareto.png").write_bytes(b"\x89PNG fake")
    (run / "secret.txt").write_text("not for the web")
    client = TestClient(create_app(feature_db[3], lm=None, run_dir=run))
    assert client.get("/api/run").json() == {"model": tiny_lm.name, "plots": ["/plots/pareto.png"], "live": False}
    assert client.get("/plots/pareto.png").content == b"\x89PNG fake"
    index = client.get("/")
    assert index.status_code == 200 and "/static/app.js" in index.text
    for asset in ("/static/app.js", "/static/style.css", "/static/index.html"):
        assert client.get(asset).status_code == 200
    for path in ("/plots/secret.txt", "/plots/..%2Fsecret.txt", "/plots/../run/secret.txt", "/static/../server.py",
                 "/static/..%2Fserver.py", "/static/%2e%2e/db.py", "/static/..%2F..%2F..%2Fetc%2Fpasswd", "/etc/passwd",
                 "/plots/%2e%2e%2f%2e%2e%2fetc%2fpasswd"):
        r = client.get(path)
        assert r.status_code == 404 and b"not for the web" not in r.content and b"import" not in r.content, path
    r = client.post("/api/saes/resid.1/activations", json={"text": "hello"})
    assert r.status_code == 503 and "without a model" in r.json()["detail"]
    assert client.get("/api/saes").json()[0]["metrics"] is None


def test_steering_never_leaks_into_concurrent_requests(client):
    from concurrent.futures import ThreadPoolExecutor

    text = {"text": "The quick brown fox jumps over the lazy dog", "latent": 3}
    clean = client.post("/api/saes/resid.1/activations", json=text).json()["activations"]
    steer = {"prompt": "The quick", "latent": 3, "alpha": 500.0, "max_new_tokens": 16}
    with ThreadPoolExecutor(6) as pool:
        steering = [pool.submit(client.post, "/api/saes/resid.1/steer", json=steer) for _ in range(3)]
        reads = [pool.submit(client.post, "/api/saes/resid.1/activations", json=text) for _ in range(24)]
        assert all(f.result().status_code == 200 for f in steering)
        assert all(f.result().json()["activations"] == pytest.approx(clean) for f in reads)


def test_a_copied_run_serves_from_another_directory(tiny_lm, feature_db, tmp_path, monkeypatch):
    """The database records each SAE's folder relative to its own: a copied run whose original is
    gone serves live text from any working directory; an SAE whose files went missing answers with
    a message naming them, not a bare 500."""
    import os
    import shutil

    db = feature_db[3]
    copy = tmp_path / "copied" / "run"
    shutil.copytree(db.parent / "saes", copy / "saes")
    shutil.copy(db, copy / "features.db")
    shutil.move(db.parent / "saes", tmp_path / "gone")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    client = TestClient(create_app(Path(os.path.relpath(copy / "features.db")), lm=tiny_lm))
    r = client.post("/api/saes/resid.1/activations", json={"text": "The quick brown fox"})
    assert r.status_code == 200 and r.json()["top_latents"]
    shutil.rmtree(copy / "saes" / "attn.0")
    r = client.post("/api/saes/attn.0/activations", json={"text": "The quick"})
    assert r.status_code == 503
    assert "the files of SAE 'attn.0' are missing" in r.json()["detail"] and str(copy / "saes" / "attn.0") in r.json()["detail"]
