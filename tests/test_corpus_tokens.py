"""Corpora (built-in, files, folders, datasets offline) and packing into BOS-led rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import SAMPLE_DOCS
from saescope import CorpusConfig, SaescopeError, iter_documents, pack
from saescope.data import SpecialTokens, builtin_documents, keep_mask


def test_builtin_corpus_is_about_two_megabytes_and_fixed():
    docs = list(builtin_documents())
    size = sum(len(d) for d in docs)
    assert 1.5e6 < size < 3e6
    assert all(d.strip() for d in docs)
    assert docs[:50] == list(builtin_documents())[:50]


def test_split_is_disjoint_and_complete(doc_folder):
    def docs(split):
        return sorted(iter_documents(CorpusConfig(source=str(doc_folder), split=split, holdout_fraction=0.3)))

    train, held, every = docs("train"), docs("heldout"), docs("all")
    assert held and train and not set(train) & set(held)
    assert sorted(train + held) == every


def test_seed_shuffles_deterministically(doc_folder):
    def order(seed):
        return list(iter_documents(CorpusConfig(source=str(doc_folder), seed=seed, split="all")))

    assert order(1) == order(1)
    assert order(1) != order(2)
    assert sorted(order(1)) == sorted(order(2))


def test_file_kinds(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("plain text file")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "json line"}) + "\n\n" + json.dumps({"body": "second"}) + "\n")
    pq.write_table(pa.table({"body": ["parquet row", None, "another"]}), tmp_path / "c.parquet")
    cfg = dict(split="all", shuffle_documents=0)
    assert list(iter_documents(CorpusConfig(source=str(tmp_path / "a.txt"), **cfg))) == ["plain text file"]
    got = list(iter_documents(CorpusConfig(source=str(tmp_path), text_field="body", **cfg)))
    assert got == ["plain text file", "json line", "second", "parquet row", "another"]


@pytest.mark.parametrize("content, message", [
    ('{"text": "ok"}\n{"txt": "no"}\n', r"bad\.jsonl:2: no string field 'text'"),
    ('{"text": "ok"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(SaescopeError, match=message):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "bad.jsonl"), split="all")))


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(SaescopeError, match="corpus not found"):
        list(iter_documents(CorpusConfig(source=str(tmp_path / "nope.txt"))))
    with pytest.raises(SaescopeError, match="holds no .txt/.jsonl/.parquet files"):
        list(iter_documents(CorpusConfig(source=str(tmp_path))))


def test_hf_dataset_offline_is_one_line():
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    code = ("from saescope import CorpusConfig, iter_documents\n"
            "list(iter_documents(CorpusConfig(source='hf:someone/no-such-dataset')))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0
    assert last.startswith("saescope.errors.SaescopeError: cannot stream dataset 'someone/no-such-dataset'")


def test_pack_rows(tokenizer):
    docs = SAMPLE_DOCS * 3
    rows = list(pack(docs, tokenizer, seq_len=16))
    special = SpecialTokens.of(tokenizer)
    assert all(r.shape == (16,) and r.dtype == np.int32 and r[0] == special.bos for r in rows)
    stream = np.concatenate([r[1:] for r in rows])
    expected = [t for d in docs for t in tokenizer(d, add_special_tokens=False)["input_ids"] + [special.eos]]
    assert stream[:len(expected)].tolist() == expected  # nothing dropped at row boundaries
    assert (stream[len(expected):] == special.pad).all()  # only the last row is padded
    assert len(stream) - len(expected) < 15


def test_keep_mask_excludes_specials(tokenizer):
    import torch

    special = SpecialTokens.of(tokenizer)
    ids = np.array([[special.bos, 10, special.eos, 11, special.pad]])
    assert keep_mask(ids, special.ids).tolist() == [[False, True, False, True, False]]
    assert keep_mask(torch.from_numpy(ids), special.ids).tolist() == [[False, True, False, True, False]]


def test_which_corpus_settings_share_documents():
    """Held-out membership is by text hash, so two settings share documents exactly when they read
    the same source and their hash buckets meet."""
    from saescope.data.corpus import shares_documents

    def c(**kw):
        return CorpusConfig(**{"source": "docs", **kw})

    trained = c(split="train", holdout_fraction=0.05)
    assert not shares_documents(trained, c(split="heldout", holdout_fraction=0.05))
    assert not shares_documents(trained, c(split="heldout", holdout_fraction=0.01, seed=3, seq_len=64))
    assert shares_documents(trained, c(split="heldout", holdout_fraction=0.06))
    assert shares_documents(trained, c(split="all"))
    assert shares_documents(trained, c(split="train", holdout_fraction=0.5))
    assert not shares_documents(trained, c(source="other", split="all"))
    assert shares_documents(c(split="all"), c(split="heldout", holdout_fraction=0.05))
    assert shares_documents(c(split="train", holdout_fraction=0.0), c(split="heldout", holdout_fraction=0.05))
    assert not shares_documents(c(split="heldout", holdout_fraction=0.0), c(split="all"))  # reads nothing
