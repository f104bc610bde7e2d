"""The embedded Gemma 3 270M: real sites, the massive residual offsets SPEC §4 describes, a small harvest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope import CorpusConfig, HarvestConfig, capture, harvest, load_model, pack
from saescope.data import builtin_documents

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def gemma():
    return load_model("gemma-3-270m-q4km")


@pytest.fixture(scope="module")
def rows(gemma):
    docs = list(builtin_documents())[200:260]
    return torch.from_numpy(np.stack(list(pack(docs, gemma.tokenizer, seq_len=128))[:2])).long()


def test_structure(gemma):
    assert gemma.name == "gemma-3-270m-q4km" and load_model("gemma-3-270m").name == "gemma-3-270m-q4km"
    assert (gemma.n_layers, gemma.d_model, gemma.attn_width) == (18, 640, 1024)
    assert gemma.block_map.style == "gemma"
    assert gemma.tokenizer.bos_token_id == 2


def test_every_export_says_the_embedded_model_is_a_dequantised_gguf(gemma, tmp_path):
    """SAELens and Gemma Scope 2 files name the model and carry the GGUF's provenance."""
    import json

    from saescope import JumpReLUSAE, SAEConfig, save_sae

    sae = JumpReLUSAE(SAEConfig(d_in=640, d_sae=16, site="resid.6", model=gemma.name))
    sae.init_weights()
    for fmt, config in (("saelens", "cfg.json"), ("gemmascope2", "config.json")):
        cfg = json.loads((save_sae(sae, tmp_path / fmt, format=fmt) / config).read_text())
        assert cfg["model_name"] == "gemma-3-270m-q4km"
        source = cfg["saescope"]["model_source"]
        assert source["file"] == "gemma-3-270m-q4_k_m.gguf" and len(source["sha256"]) == 64
        assert "Q4_K_M" in source["weights"] and source["original"] == "google/gemma-3-270m"


def test_sites_on_the_real_model(gemma, rows):
    acts = capture(gemma, rows, ["resid.6", "attn.6", "mlp.6", "mlp_in.6"])
    with torch.no_grad():
        hidden = gemma.model.model(input_ids=rows, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["resid.6"], hidden[7])
    block = gemma.layers[6]
    with torch.no_grad():  # the block's own tail, from the captured mlp_in
        mlp = block.post_feedforward_layernorm(block.mlp(acts["mlp_in.6"]))
        mid = acts["resid.6"] - acts["mlp.6"]
        torch.testing.assert_close(block.pre_feedforward_layernorm(mid), acts["mlp_in.6"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(mlp, acts["mlp.6"], rtol=1e-4, atol=1e-3)
    assert acts["attn.6"].shape == (2, 128, 1024)
    # SPEC §4: dims 163, 87, 400 of resid.6 carry huge constant offsets (~2300, ~1900, ~1100)
    means = acts["resid.6"][:, 1:].reshape(-1, 640).mean(0)
    assert means[163] > 1000 and means[87] > 1000 and means[400] > 500
    assert 2000 < acts["resid.6"][:, 1:].norm(dim=-1).mean() < 5000


def test_harvest_a_few_hundred_tokens(gemma, tmp_path):
    cfg = HarvestConfig(sites=["resid.6", "mlp_in.6"], tokens=384, batch_size=3,
                        corpus=CorpusConfig(seq_len=128))
    store = harvest(cfg, tmp_path / "store", lm=gemma, progress=False)
    assert store.record["n_tokens"] == 384 and 370 < store.n_rows("resid.6") < 384
    assert 2000 < store.norm_scalar("resid.6") < 5000
    batch = next(store.batches(64, seed=0))
    assert batch["resid.6"].shape == (64, 640) and torch.isfinite(batch["mlp_in.6"]).all()


def test_first_letter_absorption_runs_on_gemma(gemma):
    from saescope import JumpReLUSAE, SAEConfig
    from saescope.evals.absorption import absorption, word_tokens

    words = word_tokens(gemma.tokenizer, max_per_letter=10)
    assert len({c for _, c in words}) >= 20
    text = gemma.tokenizer.convert_tokens_to_string([gemma.tokenizer.convert_ids_to_tokens(words[0][0])])
    assert text.startswith(" ") and text[1] == words[0][1]
    sae = JumpReLUSAE(SAEConfig(d_in=640, d_sae=256, site="resid.6"))
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.norm_scalar.fill_(4000.0)
    result = absorption(sae, gemma, max_per_letter=10)
    assert result["probe_accuracy"] > 1 / 26 * 3  # the letter is linearly readable, well above chance
    assert 0.0 <= result["absorption_rate"] <= 1.0 and len(result["letters"]) >= 20
