"""Model loading: folders, wrapped modules, and one-line errors for what cannot be loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import tiny_model
from saescope import LanguageModel, SaescopeError, capture, load_model


def test_local_folder_round_trip(tmp_path, tokenizer):
    model = tiny_model("gemma2")
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    lm = load_model(tmp_path / "m")
    assert lm.tokenizer is not None and lm.n_layers == 3 and lm.d_model == 32 and lm.attn_width == 48
    ids = torch.tensor([[2, 40, 41, 42]])
    torch.testing.assert_close(capture(lm, ids, "mlp.2")["mlp.2"], capture(model, ids, "mlp.2")["mlp.2"])


def test_wrapping_is_idempotent():
    lm = load_model(tiny_model("llama"))
    assert isinstance(lm, LanguageModel) and load_model(lm) is lm and lm.block_map.style == "llama"


@pytest.mark.parametrize("spec, message", [
    ("missing/folder/model", "model not found: missing/folder/model"),
    ("./nothing-here", "model not found: ./nothing-here"),
    ("absent.gguf", "GGUF file not found"),
])
def test_missing_models(spec, message):
    with pytest.raises(SaescopeError, match=message):
        load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(SaescopeError, match="has no config.json"):
        load_model(tmp_path)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(SaescopeError, match="cannot read GGUF file .*broken.gguf"):
        load_model(bad, cache_dir=tmp_path / "cache")


def test_hub_id_offline_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "saescope", "sites", "--model", "someone/no-such-model"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith("saescope: error: cannot get model 'someone/no-such-model' from the Hugging Face hub")
    assert "offline, download it elsewhere and pass its folder" in lines[-1]
    assert "Traceback" not in proc.stderr
