"""The activation store: round trip against capture(), shuffling, resume, corruption, streaming."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saescope import (ActivationStore, CorpusConfig, HarvestConfig, HarvestStream, SaescopeError, capture, harvest,
                      splice)
from saescope.data import SpecialTokens, StoreWriter, token_rows

SITES = ["resid.1", "attn.1", "mlp.0"]


def _cfg(doc_folder, **kw):
    values = dict(sites=SITES, tokens=640, batch_size=3, shard_mb=0.02,
                  corpus=CorpusConfig(source=str(doc_folder), seq_len=32, holdout_fraction=0.2))
    values.update(kw)
    return HarvestConfig(**values)


def _store_rows(store, site):
    return torch.cat([s["acts"].float() for s in store.iter_shards(site)])


def test_round_trip_matches_capture(tiny_lm, doc_folder, tmp_path):
    cfg = _cfg(doc_folder)
    store = harvest(cfg, tmp_path / "store", lm=tiny_lm, progress=False)
    assert store.record["complete"] and store.n_shards > 2
    rows = torch.from_numpy(np.stack(list(token_rows(tiny_lm, cfg.corpus))[:20]))
    assert store.record["n_sequences"] == 20 and store.record["n_tokens"] == 640
    assert torch.equal(torch.cat([store.sequences(k) for k in range(store.n_shards)]), rows.to(torch.int32))
    special = SpecialTokens.of(tiny_lm.tokenizer).ids
    keep = ~torch.isin(rows, torch.tensor(special))
    acts = capture(tiny_lm, rows, SITES)
    for site in SITES:
        shards = list(store.iter_shards(site))
        got = torch.cat([s["acts"] for s in shards])
        torch.testing.assert_close(got, acts[site][keep], rtol=1e-5, atol=1e-6)
        seq = torch.cat([s["sequence"] for s in shards]).long()
        pos = torch.cat([s["position"] for s in shards]).long()
        tok = torch.cat([s["token_id"] for s in shards]).long()
        assert torch.equal(tok, rows[seq, pos]) and not torch.isin(tok, torch.tensor(special)).any()
        assert store.n_rows(site) == int(keep.sum())
        c = store.norm_scalar(site)
        assert c == pytest.approx(float(got.double().pow(2).sum(1).mean().sqrt()), rel=1e-6)
        m = json.loads((tmp_path / "store" / site / "manifest.json").read_text())
        assert {"model", "site", "d_in", "dtype", "n_rows", "norm_scalar", "shards"} <= set(m)
        assert all(len(e["sha256"]) == 64 for e in m["shards"])
    assert store.d_in("attn.1") == 48 and store.d_in("blocks.1.hook_resid_post") == 32


def test_bfloat16_store(tiny_lm, doc_folder, tmp_path):
    store = harvest(_cfg(doc_folder, dtype="bfloat16", tokens=128), tmp_path / "bf", lm=tiny_lm, progress=False)
    ref = harvest(_cfg(doc_folder, tokens=128), tmp_path / "f32", lm=tiny_lm, progress=False)
    assert store.shard("resid.1", 0)["acts"].dtype == torch.bfloat16
    torch.testing.assert_close(_store_rows(store, "resid.1"), _store_rows(ref, "resid.1"), rtol=1e-2, atol=1e-2)
    batch = next(store.batches(8, sites=["resid.1"]))
    assert batch["resid.1"].dtype == torch.float32


@pytest.fixture
def store(tiny_lm, doc_folder, tmp_path):
    return harvest(_cfg(doc_folder), tmp_path / "store", lm=tiny_lm, progress=False)


def _key(x: torch.Tensor) -> list[bytes]:
    return [r.numpy().tobytes() for r in x]


def test_shuffled_batches_cover_every_row_once_per_epoch(store):
    for buffer_rows in (64, 10_000):
        batches = list(store.batches(50, sites=["resid.1", "mlp.0"], seed=3, epochs=2, buffer_rows=buffer_rows))
        got = torch.cat([b["resid.1"] for b in batches])
        assert sorted(_key(got)) == sorted(_key(_store_rows(store, "resid.1")) * 2)
        assert all(len(b["resid.1"]) == 50 for b in batches[:-1])
        # rows stay aligned across sites: each resid row comes with its own mlp row
        pair = {r: m for r, m in zip(_key(_store_rows(store, "resid.1")), _key(_store_rows(store, "mlp.0")))}
        assert all(pair[r] == m for b in batches for r, m in zip(_key(b["resid.1"]), _key(b["mlp.0"])))


def test_shuffle_is_deterministic_for_a_seed(store):
    def first(seed):
        return torch.cat([b["attn.1"] for b in store.batches(32, sites=["attn.1"], seed=seed, buffer_rows=100)])

    assert torch.equal(first(5), first(5))
    assert not torch.equal(first(5), first(6))
    ordered = _store_rows(store, "attn.1")
    assert not torch.equal(first(5), ordered)
    assert len(list(store.batches(32, sites=["attn.1"], drop_last=True))) == len(ordered) // 32


def test_resume_after_interrupted_harvest(tiny_lm, doc_folder, tmp_path, monkeypatch):
    cfg = _cfg(doc_folder)
    whole = harvest(cfg, tmp_path / "whole", lm=tiny_lm, progress=False)

    real_commit = StoreWriter.commit_shard
    calls = {"n": 0}

    def dying_commit(self):
        calls["n"] += 1
        if calls["n"] == 3:  # die mid-commit: one site's shard renamed into place, the others half-written
            next(iter(self._open.values())).commit()
            raise KeyboardInterrupt
        return real_commit(self)

    monkeypatch.setattr(StoreWriter, "commit_shard", dying_commit)
    monkeypatch.setattr(StoreWriter, "abandon", lambda self: None)  # as after kill -9: nothing cleaned up
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg, tmp_path / "cut", lm=tiny_lm, progress=False)
    cut = ActivationStore(tmp_path / "cut")
    assert not cut.record["complete"] and cut.n_shards == 2
    assert (tmp_path / "cut" / "resid.1" / "00002.safetensors").exists()
    assert list((tmp_path / "cut" / "attn.1").glob(".*partial"))
    (tmp_path / "cut" / ".store.json.k1lled").write_text('{"half": ')  # the record's write, killed before its rename
    monkeypatch.undo()
    resumed = harvest(cfg, tmp_path / "cut", lm=tiny_lm, progress=False)
    assert not list((tmp_path / "cut").glob(".*"))
    assert resumed.record["complete"] and resumed.n_shards == whole.n_shards
    for site in SITES:
        assert [e["sha256"] for e in resumed.manifests[site]["shards"]] == [e["sha256"] for e in whole.manifests[site]["shards"]]
        assert resumed.norm_scalar(site) == pytest.approx(whole.norm_scalar(site))
        assert not list((tmp_path / "cut" / site).glob(".*"))
    assert resumed.record["shards"] == whole.record["shards"]


def test_non_finite_activations_stop_the_harvest(tiny_lm, doc_folder, tmp_path):
    calls = {"n": 0}

    def poison(x):
        calls["n"] += 1
        return x * float("nan") if calls["n"] == 3 else x

    with splice(tiny_lm, "resid.0", poison), pytest.raises(SaescopeError, match=r"non-finite activations at .* in shard 2; the store keeps its first 2 shards"):
        harvest(_cfg(doc_folder, batch_size=1), tmp_path / "nan", lm=tiny_lm, progress=False)
    store = ActivationStore(tmp_path / "nan")
    assert store.n_shards == 2 and not store.record["complete"]
    assert torch.isfinite(store.shard("resid.1", 0)["acts"]).all()
    assert not list((tmp_path / "nan" / "resid.1").glob(".*"))


def test_corrupt_and_truncated_shards_are_named(store, tmp_path):
    path = tmp_path / "store" / "mlp.0" / "00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SaescopeError, match=r"shard .*mlp\.0/00001\.safetensors is corrupt: sha256"):
        list(store.batches(16, sites=["mlp.0"]))
    path.write_bytes(bytes(data[:100]))
    with pytest.raises(SaescopeError, match=r"shard .*mlp\.0/00001\.safetensors is truncated"):
        store.shard("mlp.0", 1)
    path.unlink()
    with pytest.raises(SaescopeError, match=r"shard missing: .*mlp\.0/00001\.safetensors"):
        store.shard("mlp.0", 1)
    store.shard("resid.1", 1)  # the other sites are unharmed


def test_store_refuses_other_settings_and_foreign_folders(tiny_lm, doc_folder, store, tmp_path):
    with pytest.raises(SaescopeError, match=r"holds a store made with other settings \(dtype: 'float32' → 'bfloat16'\)"):
        harvest(_cfg(doc_folder, dtype="bfloat16"), tmp_path / "store", lm=tiny_lm, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SaescopeError, match="exists and is not an activation store"):
        harvest(_cfg(doc_folder), tmp_path / "other", lm=tiny_lm, progress=False)
    with pytest.raises(SaescopeError, match="is not an activation store"):
        ActivationStore(tmp_path / "other")
    with pytest.raises(SaescopeError, match=r"site mlp\.1 is not in store .*; it holds resid\.1, attn\.1, mlp\.0"):
        store.d_in("mlp.1")
    single = ActivationStore(tmp_path / "store" / "attn.1")  # a site folder reads on its own
    assert single.sites == ["attn.1"] and single.n_rows() == store.n_rows("attn.1")


def test_streaming_harvest_gives_the_store_rows(tiny_lm, doc_folder, store):
    stream = HarvestStream(_cfg(doc_folder), lm=tiny_lm, estimate_rows=100)
    c = stream.norm_scalar("resid.1")
    first = _store_rows(store, "resid.1")[:100]
    assert c > 0 and stream.d_in("attn.1") == 48
    got = torch.cat([b["resid.1"] for b in stream.batches(40, sites=["resid.1"], seed=1, progress=False)])
    torch.testing.assert_close(torch.tensor(sorted(got.sum(1).tolist())),
                               torch.tensor(sorted(_store_rows(store, "resid.1").sum(1).tolist())), rtol=1e-5, atol=1e-5)
    assert c == pytest.approx(float(first.double().pow(2).sum(1).mean().sqrt()), rel=0.5)
