"""The explorer under load (bench/serve_load.py): 20 concurrent clients for 30 s over every route,
malformed and over-long requests mixed in, on a real server process; zero errors allowed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from saescope.explore.server import MAX_BODY, create_app

BENCH = Path(__file__).resolve().parent.parent / "bench" / "serve_load.py"


@pytest.mark.slow
def test_twenty_clients_for_thirty_seconds_without_an_error(feature_db, model_dir, tmp_path):
    out = tmp_path / "load.json"
    done = subprocess.run([sys.executable, str(BENCH), str(feature_db[3].parent), "--model", str(model_dir),
                           "--clients", "20", "--seconds", "30", "--out", str(out)], capture_output=True, text=True)
    result = json.loads(out.read_text())
    print(done.stdout)  # the latency table, in the test log
    assert done.returncode == 0 and result["errors"] == 0 and result["server_alive"], done.stdout + done.stderr
    assert result["requests"] > 500 and len(result["routes"]) == 22
    assert all(r["n"] > 10 for r in result["routes"].values())


def test_bodies_must_be_bounded(tiny_lm, feature_db):
    client = TestClient(create_app(feature_db[3], lm=tiny_lm))
    r = client.post("/api/saes/resid.1/activations", content=b"{" + b" " * MAX_BODY + b"}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "over 65536 bytes" in r.json()["detail"]
    r = client.post("/api/saes/resid.1/activations", content=iter([b'{"text": "hi"}']),
                    headers={"content-type": "application/json"})  # chunked: no length given
    assert r.status_code == 411
    assert client.post("/api/saes/resid.1/activations", json={"text": "hi"}).status_code == 200
