"""The feature database against direct computation on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saescope import capture
from saescope.data import SpecialTokens
from saescope.explore import connect


@pytest.fixture
def setup(feature_db):
    rows, saes, info, path = feature_db
    return rows, saes, info, connect(path, readonly=True)


def test_statistics_match_direct_computation(tiny_lm, setup):
    rows, saes, info, con = setup
    keep = ~torch.isin(rows.long(), torch.tensor(SpecialTokens.of(tiny_lm.tokenizer).ids)).reshape(-1)
    assert info["tokens"] == int(keep.sum()) and info["bytes"] > 0
    for name, (sae, _) in saes.items():
        x = capture(tiny_lm, rows.long(), name)[name].reshape(-1, sae.cfg.d_in)
        f = sae.encode(x).detach()
        f[~keep] = 0
        density = ((f > 0).sum(0).double() / keep.sum()).tolist()
        got = con.execute("SELECT latent, density, max_act FROM latents WHERE sae = ? ORDER BY latent", (name,)).fetchall()
        assert [r["latent"] for r in got] == list(range(24))
        assert [r["density"] for r in got] == pytest.approx(density)
        assert [r["max_act"] for r in got] == pytest.approx(f.max(0).values.tolist(), rel=1e-5)
        j = int(torch.tensor(density).argmax())
        top = con.execute("SELECT seq, pos, act FROM examples WHERE sae = ? AND latent = ? AND kind = 'top' "
                          "ORDER BY rank", (name, j)).fetchall()
        expected = f[:, j].topk(5)
        assert [r["act"] for r in top] == pytest.approx(expected.values.tolist(), rel=1e-5)
        assert [float(f[r["seq"] * 32 + r["pos"], j]) for r in top] == pytest.approx([r["act"] for r in top])
        quant = con.execute("SELECT band, act FROM examples WHERE sae = ? AND latent = ? AND kind = 'quantile' "
                            "ORDER BY band, rank", (name, j)).fetchall()
        acts = [r["act"] for r in quant]
        assert acts == sorted(acts) and all(0 < a <= expected.values[0] + 1e-6 for a in acts)
        assert {r["band"] for r in quant} == {0, 1, 2, 3}
        hist = json.loads(con.execute("SELECT histogram FROM latents WHERE sae = ? AND latent = ?", (name, j)).fetchone()[0])
        assert sum(hist["counts"]) == hist["sample"] == min(16, hist["firings"])
        neigh = con.execute("SELECT other, cosine FROM neighbours WHERE sae = ? AND latent = 0 ORDER BY rank",
                            (name,)).fetchall()
        dec = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
        cos = dec @ dec[0]
        cos[0] = -2
        assert neigh[0]["other"] == int(cos.argmax()) and neigh[0]["cosine"] == pytest.approx(float(cos.max()), rel=1e-5)


def test_logits_and_context(tiny_lm, setup):
    rows, saes, _, con = setup
    sae, _ = saes["resid.1"]
    logits = sae.W_dec.detach() @ tiny_lm.model.get_output_embeddings().weight.detach().T
    best = con.execute("SELECT token, value FROM logits WHERE sae = 'resid.1' AND latent = 3 AND sign = 1 "
                       "ORDER BY rank").fetchall()
    assert best[0]["token"] == int(logits[3].argmax()) and best[0]["value"] == pytest.approx(float(logits[3].max()), rel=1e-4)
    worst = con.execute("SELECT token FROM logits WHERE sae = 'resid.1' AND latent = 3 AND sign = -1 ORDER BY rank").fetchone()
    assert worst["token"] == int(logits[3].argmin())
    stored = con.execute("SELECT tokens FROM sequences WHERE seq = 4").fetchone()["tokens"]
    assert np.frombuffer(stored, dtype=np.int32).tolist() == rows[4].tolist()
    text = dict(con.execute("SELECT token, text FROM vocab").fetchall())
    assert all(int(t) in text for t in rows.flatten().tolist())
    assert con.execute("SELECT value FROM meta WHERE key = 'logits'").fetchone()[0].startswith("top logits")
    with pytest.raises(Exception):
        con.execute("DELETE FROM latents")  # the server's connection is read-only
