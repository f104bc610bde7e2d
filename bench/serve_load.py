"""The explorer under load: `saescope serve` on loopback, concurrent clients over every route for a
bounded time, with malformed and over-long requests mixed in; latency percentiles and errors.

    python bench/serve_load.py DIR [--model M] [--clients 20] [--seconds 30] [--out FILE.json]

DIR holds features.db (from `saescope explore build`). Each client loops over the routes in its
own shuffled order. A response is an error when its status is not the one that request must get
(200, or the 404/422 a bad request must get), or when the connection fails or times out; 5xx are
always errors. The server runs as its own process, as users run it."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from saescope.explore.server import MAX_TEXT


def _requests(sae: str, d_sae: int) -> list[tuple[str, str, str, dict | str | None, int]]:
    """(name, method, path, body, expected status)."""
    good = [
        ("page", "GET", "/", None, 200),
        ("run", "GET", "/api/run", None, 200),
        ("saes", "GET", "/api/saes", None, 200),
        ("latents", "GET", f"/api/saes/{sae}/latents?sort=max_act&order=desc&limit=50", None, 200),
        ("latents search", "GET", f"/api/saes/{sae}/latents?q=the&limit=20", None, 200),
        ("latent", "GET", f"/api/saes/{sae}/latents/{d_sae - 1}", None, 200),
        ("latent", "GET", f"/api/saes/{sae}/latents/0", None, 200),
        ("live text", "POST", f"/api/saes/{sae}/activations", {"text": "The quick brown fox jumps."}, 200),
        ("live text", "POST", f"/api/saes/{sae}/activations", {"text": "sparse features", "latent": 1}, 200),
        ("steer", "POST", f"/api/saes/{sae}/steer", {"prompt": "The quick", "latent": 1, "alpha": 20, "max_new_tokens": 4}, 200),
        ("openapi", "GET", "/openapi.json", None, 200),
    ]
    bad = [
        ("bad: unknown SAE", "GET", "/api/saes/nope/latents/0", None, 404),
        ("bad: latent range", "GET", f"/api/saes/{sae}/latents/{d_sae}", None, 404),
        ("bad: negative latent", "GET", f"/api/saes/{sae}/latents/-1", None, 404),
        ("bad: sort column", "GET", f"/api/saes/{sae}/latents?sort=1;DROP TABLE latents", None, 422),
        ("bad: limit", "GET", f"/api/saes/{sae}/latents?limit=100000", None, 422),
        ("bad: long query", "GET", f"/api/saes/{sae}/latents?q=" + "x" * 5000, None, 422),
        ("bad: long text", "POST", f"/api/saes/{sae}/activations", {"text": "x" * (MAX_TEXT + 1)}, 422),
        ("bad: huge body", "POST", f"/api/saes/{sae}/activations", {"text": "x" * 2_000_000}, 413),
        ("bad: not JSON", "POST", f"/api/saes/{sae}/activations", "{not json", 422),
        ("bad: wrong types", "POST", f"/api/saes/{sae}/steer", {"prompt": 3, "latent": "a", "alpha": None}, 422),
        ("bad: too many tokens", "POST", f"/api/saes/{sae}/steer", {"prompt": "a", "latent": 1, "alpha": 1,
                                                                     "max_new_tokens": 10**6}, 422),
        ("bad: traversal", "GET", "/plots/..%2F..%2Fetc%2Fpasswd", None, 404),
        ("bad: method", "DELETE", "/api/saes", None, 405),
    ]
    return good + bad


async def _client(base: str, requests, until: float, seed: int, samples: dict, errors: list) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while time.monotonic() < until:
            order = requests[:]
            rng.shuffle(order)
            for name, method, path, body, expected in order:
                if time.monotonic() >= until:
                    return
                kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) \
                    else {"json": body} if body is not None else {}
                start = time.perf_counter()
                try:
                    r = await http.request(method, path, **kwargs)
                    status = r.status_code
                except httpx.HTTPError as exc:
                    status = f"{type(exc).__name__}"
                samples.setdefault(name, []).append(time.perf_counter() - start)
                if status != expected:
                    errors.append(f"{method} {path[:80]}: {status}, expected {expected}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", help="a folder holding features.db")
    p.add_argument("--model", default=None, help="the model for live text and steering (default: the database's)")
    p.add_argument("--clients", type=int, default=20)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args()
    con = sqlite3.connect(f"file:{Path(a.dir) / 'features.db'}?mode=ro", uri=True)
    sae, d_sae = con.execute("SELECT id, d_sae FROM saes ORDER BY id LIMIT 1").fetchone()
    con.close()
    port = _free_port()
    cmd = [sys.executable, "-m", "saescope", "-q", "serve", a.dir, "--port", str(port)] + (["--model", a.model] if a.model else [])
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # up once /api/run answers
            try:
                if httpx.get(base + "/api/run", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.2)
        samples: dict[str, list[float]] = {}
        errors: list[str] = []
        requests = _requests(sae, d_sae)
        until = time.monotonic() + a.seconds

        async def clients():
            await asyncio.gather(*(_client(base, requests, until, seed, samples, errors) for seed in range(a.clients)))

        started = time.monotonic()
        asyncio.run(clients())
        took = time.monotonic() - started
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=30)
    every = [t for ts in samples.values() for t in ts]
    result = {"clients": a.clients, "seconds": took, "requests": len(every), "requests_per_s": len(every) / took,
              "errors": len(errors), "error_examples": errors[:10], "server_alive": alive,
              "p50_ms": 1000 * _pct(every, 50), "p99_ms": 1000 * _pct(every, 99),
              "routes": {name: {"n": len(ts), "p50_ms": 1000 * _pct(ts, 50), "p99_ms": 1000 * _pct(ts, 99)}
                         for name, ts in sorted(samples.items())}}
    print(f"explorer load: {a.clients} clients for {took:.0f} s on loopback, {len(every)} requests "
          f"({result['requests_per_s']:.0f}/s), {len(errors)} errors, server {'up' if alive else 'DOWN'} at the end")
    print("| route | n | p50 ms | p99 ms |")
    print("|---|---|---|---|")
    for name, r in result["routes"].items():
        print(f"| {name} | {r['n']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |")
    print(f"| all | {len(every)} | {result['p50_ms']:.1f} | {result['p99_ms']:.1f} |")
    for e in errors[:10]:
        print("error:", e)
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0 if not errors and alive else 1


if __name__ == "__main__":
    sys.exit(main())
