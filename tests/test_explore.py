"""The feature database against direct computation on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saescope import capture
from saescope.data import SpecialTokens
from saescope.explore import connect
from saescope.explore.build import firing_histogram


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
        for r in con.execute("SELECT seq, pos, lo, acts FROM examples WHERE sae = ? AND latent = ?", (name, j)):
            window = np.frombuffer(r["acts"], dtype=np.float32)  # the latent around the example, for shading
            assert r["lo"] == max(0, r["pos"] - 12) and r["lo"] + len(window) == min(32, r["pos"] + 13)
            start = r["seq"] * 32 + r["lo"]
            assert window.tolist() == pytest.approx(f[start:start + len(window), j].tolist(), rel=1e-5, abs=1e-7)
        quant = con.execute("SELECT band, act FROM examples WHERE sae = ? AND latent = ? AND kind = 'quantile' "
                            "ORDER BY band, rank", (name, j)).fetchall()
        acts = [r["act"] for r in quant]
        assert acts == sorted(acts) and all(0 < a <= expected.values[0] + 1e-6 for a in acts)
        assert {r["band"] for r in quant} == {0, 1, 2, 3}
        hist = json.loads(con.execute("SELECT histogram FROM latents WHERE sae = ? AND latent = ?", (name, j)).fetchone()[0])
        assert sum(hist["counts"]) == hist["sample"] == min(16, hist["firings"])
        assert hist["edges"][0] == pytest.approx(acts[0], rel=1e-5)  # from the weakest sampled firing up
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


def test_a_latent_with_near_equal_firings_gets_its_histogram():
    """Two firings a float32 step apart, as a latent that fires on one repeated context gives: 32
    bins between them do not fit in float32 (numpy refused, and the whole build failed)."""
    a = np.float32(3.2)
    vals = np.array([a, np.nextafter(a, np.float32(4))] * 5, dtype=np.float32)
    vals.sort()
    counts, edges = firing_histogram(vals, 32)
    assert counts.sum() == 10 and counts[0] == 5 and counts[-1] == 5
    assert edges[0] == float(vals[0]) and edges[-1] == float(vals[-1])
    counts, _ = firing_histogram(np.full(4, a), 32)  # all equal: one bin holds them
    assert counts.sum() == 4 and counts.max() == 4


def test_running_state_is_bounded_and_merges_exactly():
    """Top-k and the priority sample over sparse firings, merged every few entries or once, equal
    a brute-force top-k and each other (the random keys do not depend on when merges happen)."""
    from saescope.explore.build import _Running

    rng = np.random.default_rng(0)
    m, k, r = 7, 3, 4
    batches = []
    for b in range(6):
        acts = rng.random((10, m)) * (rng.random((10, m)) < 0.4)
        row, col = acts.nonzero()
        batches.append((col, acts[row, col].astype(np.float32), b * 10 + row))
    often, once = _Running(m, k, r, seed=1, merge_every=5), _Running(m, k, r, seed=1, merge_every=10**9)
    for batch in batches:
        often.update(*batch)
        once.update(*batch)
        assert len(often.top[0]) <= m * k and len(often.sample[0]) <= m * r
    latent, val, tok = (np.concatenate(x) for x in zip(*batches))
    for (j, (tv, tt), (sv, st)), (_, (tv2, _), (sv2, st2)) in zip(often.latents(), once.latents()):
        mine = val[latent == j]
        assert tv.tolist() == sorted(mine, reverse=True)[:k] and tv.tolist() == tv2.tolist()
        assert all(val[(latent == j) & (tok == t)][0] == v for v, t in zip(tv, tt))
        assert len(sv) == min(r, len(mine)) and sv.tolist() == sorted(sv.tolist())
        assert sv.tolist() == sv2.tolist() and st.tolist() == st2.tolist()
    assert often.count.tolist() == np.bincount(latent, minlength=m).tolist()
