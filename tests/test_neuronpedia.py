"""The Neuronpedia export against the feature database it reads, table by table."""

from __future__ import annotations

import gzip
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest

from saescope.errors import SaescopeError
from saescope.explore import connect
from saescope.explore.neuronpedia import export_neuronpedia

SOURCES = {"attn.0": "0-saescope__attn_0", "resid.1": "1-saescope__resid_1"}
USER = {"resid.1": {3: "fires on my favourite tokens"}}


def _export(db: Path, out: Path) -> dict:
    return export_neuronpedia(db, out, batch_size=10, progress=False, explanations=USER, url="https://example.org")


def _lines(folder: Path, kind: str) -> list[dict]:
    return [json.loads(line) for path in sorted(folder.glob(f"{kind}/batch-*.jsonl.gz"))
            for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


@pytest.fixture
def exported(feature_db, tmp_path):
    *_, db = feature_db
    out = tmp_path / "neuronpedia"
    return _export(db, out), out, connect(db, readonly=True), db


def test_layout_and_headers(exported):
    summary, out, con, _ = exported
    root = out / "tiny-gemma3"
    assert summary["out"] == str(root) and summary["sources"] == sorted(SOURCES.values())
    assert sorted(p.name for p in root.iterdir()) == sorted(SOURCES.values())
    n_seq = con.execute("SELECT COUNT(*) FROM sequences").fetchone()[0]
    for sae, source in SOURCES.items():
        folder = root / source
        headers = {}
        for name in ("release", "model", "sourceset", "source"):
            lines = (folder / f"{name}.jsonl").read_text().splitlines()
            assert len(lines) == 1
            headers[name] = json.loads(lines[0])
        assert headers["source"]["id"] == source and headers["source"]["setName"] == "saescope"
        assert headers["source"]["num_prompts"] == n_seq == 10 and headers["source"]["num_tokens_in_prompt"] == 32
        hook = {"attn.0": "blocks.0.attn.hook_z", "resid.1": "blocks.1.hook_resid_post"}[sae]
        assert hook in headers["source"]["notes"]
        assert headers["model"]["id"] == "tiny-gemma3" and headers["model"]["dimension"] == 32
        assert headers["release"]["urls"] == ["https://example.org"]
        assert headers["release"]["defaultSourceId"] == headers["model"]["defaultSourceId"] == SOURCES["attn.0"]
        assert headers["sourceset"]["releaseName"] == headers["release"]["name"]
        for kind in ("features", "activations", "explanations"):  # 24 latents in batches of 10
            assert sorted(p.name for p in (folder / kind).iterdir()) == [f"batch-{n}.jsonl.gz" for n in range(3)]
    assert summary["features"] == 48


def test_features_match_database(exported):
    _, out, con, _ = exported
    vocab = dict(con.execute("SELECT token, text FROM vocab").fetchall())
    for sae, source in SOURCES.items():
        features = _lines(out / "tiny-gemma3" / source, "features")
        assert [f["index"] for f in features] == [str(j) for j in range(24)]
        assert {f["layer"] for f in features} == {source} and {f["modelId"] for f in features} == {"tiny-gemma3"}
        rows = con.execute("SELECT * FROM latents WHERE sae = ? ORDER BY latent", (sae,)).fetchall()
        for f, row in zip(features, rows, strict=True):
            j = row["latent"]
            assert f["frac_nonzero"] == row["density"] and f["maxActApprox"] == row["max_act"]
            hist = json.loads(row["histogram"])
            assert f["freq_hist_data_bar_heights"] == hist["counts"]
            assert f["freq_hist_data_bar_values"] == pytest.approx(np.convolve(hist["edges"], [0.5, 0.5], "valid"))
            neighbours = con.execute("SELECT other, cosine FROM neighbours WHERE sae = ? AND latent = ? ORDER BY rank",
                                     (sae, j)).fetchall()
            assert f["topkCosSimIndices"] == [r["other"] for r in neighbours] and len(neighbours) > 0
            for sign, key in ((1, "pos"), (-1, "neg")):
                logits = con.execute("SELECT token, value FROM logits WHERE sae = ? AND latent = ? AND sign = ? "
                                     "ORDER BY rank", (sae, j, sign)).fetchall()
                assert f[f"{key}_str"] == [vocab[r["token"]] for r in logits] and len(logits) > 0
                assert f[f"{key}_values"] == [r["value"] for r in logits]


def test_activations_match_examples(exported):
    summary, out, con, _ = exported
    vocab = dict(con.execute("SELECT token, text FROM vocab").fetchall())
    seqs = {r["seq"]: np.frombuffer(r["tokens"], np.int32) for r in con.execute("SELECT * FROM sequences")}
    total = 0
    for sae, source in SOURCES.items():
        got = {(a["index"], a["id"]): a for a in _lines(out / "tiny-gemma3" / source, "activations")}
        examples = con.execute("SELECT * FROM examples WHERE sae = ?", (sae,)).fetchall()
        assert len(got) == len(examples) > 0
        total += len(examples)
        seen = set()
        for e in examples:
            tag = "top" if e["kind"] == "top" else f"q{e['band']}"
            a = got[(str(e["latent"]), f"{source}-{e['latent']}-{tag}-{e['rank']}")]
            seen.add(a["id"])
            values = np.frombuffer(e["acts"], np.float32).tolist()
            assert a["values"] == values and a["layer"] == source and a["dataIndex"] == str(e["seq"])
            assert a["tokens"] == [vocab[t] for t in seqs[e["seq"]][e["lo"]:e["lo"] + len(values)].tolist()]
            assert a["maxValue"] == max(values) == values[a["maxValueTokenIndex"]] and a["minValue"] == min(values)
            assert values[a["qualifyingTokenIndex"]] == pytest.approx(e["act"])
            if e["kind"] == "top":
                assert a["binMin"] is a["binMax"] is a["binContains"] is None
            else:
                band = [r[0] for r in con.execute("SELECT act FROM examples WHERE sae = ? AND latent = ? AND band = ?",
                                                  (sae, e["latent"], e["band"]))]
                assert (a["binMin"], a["binMax"], a["binContains"]) == (min(band), max(band), 1 / 4)
        assert len(seen) == len(examples)  # ids are unique
    assert summary["activations"] == total


def test_explanations_label_top_tokens_and_take_the_users(exported):
    summary, out, con, _ = exported
    n = 0
    for sae, source in SOURCES.items():
        explanations = {e["index"]: e for e in _lines(out / "tiny-gemma3" / source, "explanations")}
        for row in con.execute("SELECT latent, top_tokens FROM latents WHERE sae = ?", (sae,)):
            e = explanations.get(str(row["latent"]))
            tokens = json.loads(row["top_tokens"])
            if row["latent"] in USER.get(sae, {}):
                assert e["description"] == USER[sae][row["latent"]] and e["typeName"] == "user"
            elif tokens:
                assert e["typeName"] == "saescope-top-tokens" and "not an LLM explanation" in e["notes"]
                assert e["description"] == "top tokens: " + ", ".join(json.dumps(t, ensure_ascii=False) for t in tokens)
            else:
                assert e is None
        n += len(explanations)
    assert summary["explanations"] == n > 0


def test_export_is_deterministic(exported, tmp_path):
    summary, out, _, db = exported
    again = tmp_path / "again"
    assert _export(db, again) == {**summary, "out": str(again / "tiny-gemma3")}
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (out / f).read_bytes() == (again / f).read_bytes(), f


def test_reexport_with_larger_batches_leaves_no_stale_batches(exported):
    _, out, _, db = exported
    export_neuronpedia(db, out, batch_size=128, progress=False)
    for source in SOURCES.values():
        assert sorted(p.name for p in (out / "tiny-gemma3" / source / "features").iterdir()) == ["batch-0.jsonl.gz"]
        assert len(_lines(out / "tiny-gemma3" / source, "features")) == 24


def test_latent_that_never_fired_gets_a_feature_only(exported, tmp_path):
    _, _, _, db = exported
    copy = tmp_path / "dead.db"
    copy.write_bytes(db.read_bytes())
    with closing(sqlite3.connect(copy)) as con, con:
        con.execute("DELETE FROM examples WHERE sae = 'resid.1' AND latent = 7")
        con.execute("UPDATE latents SET density = 0, max_act = 0, top_tokens = '[]' "
                    "WHERE sae = 'resid.1' AND latent = 7")
    export_neuronpedia(copy, tmp_path / "out", batch_size=10, progress=False)
    folder = tmp_path / "out" / "tiny-gemma3" / SOURCES["resid.1"]
    feature = next(f for f in _lines(folder, "features") if f["index"] == "7")
    assert feature["frac_nonzero"] == 0 and feature["maxActApprox"] == 0
    assert not [a for a in _lines(folder, "activations") if a["index"] == "7"]
    assert not [e for e in _lines(folder, "explanations") if e["index"] == "7"]


def test_errors_are_one_line(tmp_path, feature_db):
    missing = tmp_path / "nope.db"
    with pytest.raises(SaescopeError) as exc:
        export_neuronpedia(missing, tmp_path / "out", progress=False)
    assert str(exc.value) == f"no feature database at {missing}"
    with pytest.raises(SaescopeError, match="explanations name SAEs not in"):
        export_neuronpedia(feature_db[-1], tmp_path / "out", progress=False, explanations={"mlp.9": {0: "x"}})
    with pytest.raises(SaescopeError, match="source_set"):
        export_neuronpedia(feature_db[-1], tmp_path / "out", progress=False, source_set="has space")
