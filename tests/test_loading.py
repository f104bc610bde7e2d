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


def test_a_bfloat16_model_with_float32_saes(model_dir):
    """Weights in bfloat16 halve a large model's memory; an SAE reads its activations in its own
    float32, spliced back in the model's dtype."""
    from saescope import JumpReLUSAE, SAEConfig, splice
    from saescope.evals.metrics import evaluate

    lm = load_model(model_dir, dtype="bfloat16")
    assert next(lm.model.parameters()).dtype == torch.bfloat16
    ids = torch.randint(4, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 2
    acts = capture(lm, ids, "resid.1")["resid.1"]
    assert acts.dtype == torch.bfloat16
    sae = JumpReLUSAE(SAEConfig(d_in=32, d_sae=16, site="resid.1"))
    sae.init_weights(torch.Generator().manual_seed(1))
    assert sae(acts).dtype == torch.float32 and sae.encode(acts).dtype == torch.float32
    torch.testing.assert_close(sae(acts), sae(acts.float()))
    with torch.no_grad(), splice(lm, "resid.1", sae):
        assert lm(ids).dtype == torch.bfloat16
    record = evaluate({"s": sae}, lm, ids, progress=False)["s"]
    assert record["n_tokens"] > 0 and record["fvu"] == record["fvu"]  # not NaN
    with pytest.raises(SaescopeError, match="model dtype must be one of float32, bfloat16, float16, got 'int8'"):
        load_model(model_dir, dtype="int8")


def test_google_weights_come_from_a_local_hugging_face_cache(tmp_path, tokenizer):
    """`google/gemma-3-270m` is Google's weights where a user has them (here a tiny stand-in in
    the cache's layout), never the embedded GGUF; found without the network."""
    import json

    snapshot = tmp_path / "hub" / "models--google--gemma-3-270m" / "snapshots" / "abc123"
    tiny_model("gemma3").save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--google--gemma-3-270m" / "refs").mkdir()
    (tmp_path / "hub" / "models--google--gemma-3-270m" / "refs" / "main").write_text("abc123")
    code = ("import json, saescope; lm = saescope.load_model('google/gemma-3-270m'); "
            "print(json.dumps([lm.name, lm.n_layers, lm.d_model]))")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["google/gemma-3-270m", 3, 32]
