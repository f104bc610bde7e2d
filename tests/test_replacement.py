"""The replacement-model evaluation (evals/replacement.py) against independent references: a
one-layer CLT against evaluate() on the same transcoder, a silent CLT against zero-ablating the
MLPs by hand, a transcoder set against the CLT with the same diagonal, and exact crosscoders."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch

from saescope import JumpReLUSAE, MultiLayerConfig, MultiLayerDictionary, SAEConfig
from saescope.config import CorpusConfig
from saescope.data import token_rows
from saescope.data.tokens import SpecialTokens, keep_mask
from saescope.evals import evaluate
from saescope.evals.replacement import evaluate_replacement
from saescope.lm import splice

D = 32  # the tiny model's width


@pytest.fixture
def rows(tiny_lm, doc_folder):
    cfg = CorpusConfig(source=str(doc_folder), seq_len=32, split="all")
    return torch.from_numpy(np.stack(list(token_rows(tiny_lm, cfg))[:6]))


def _clt(layers, width=16, seed=0) -> MultiLayerDictionary:
    d = MultiLayerDictionary(MultiLayerConfig(kind="clt", sites_in=[f"mlp_in.{i}" for i in layers],
                                              sites_out=[f"mlp.{i}" for i in layers], d_in=D, d_out=D, d_sae=width))
    d.init_weights(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        d.b_dec.copy_(torch.randn(d.b_dec.shape, generator=g) * 0.1)
        for group in d.groups:
            group.W_dec.mul_(0.5)
            group.set_threshold(torch.rand(width, generator=g) * 0.2)
        d.scale_in.copy_(torch.rand(len(layers), generator=g) + 0.5)
    return d


def test_one_layer_equals_evaluate_on_the_same_transcoder(tiny_lm, rows):
    d = _clt([1])
    sae = JumpReLUSAE(SAEConfig(d_in=D, d_sae=16, site="mlp_in.1", target_site="mlp.1"))
    f = d.fold()
    with torch.no_grad():
        sae.W_enc.copy_(f.W_enc[0])
        sae.b_enc.copy_(f.b_enc[0])
        sae.set_threshold(f.theta[0])
        sae.W_dec.copy_(f.W_dec[0][:, 0])
        sae.b_dec.copy_(f.b_dec[0])
    ours = evaluate_replacement({"clt": d}, tiny_lm, rows, batch_size=4, progress=False)["clt"]
    ref = evaluate({"tc": sae}, tiny_lm, rows, batch_size=4, progress=False)["tc"]
    [layer] = ours["layers"]
    for key in ("l0", "fvu", "delta_loss", "kl", "delta_loss_se"):
        assert layer[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    assert ours["delta_loss_all_replaced"] == pytest.approx(ref["delta_loss"], rel=1e-4, abs=1e-6)
    assert ours["n_scored"] == ref["n_scored"] and ours["ce_loss_clean"] == pytest.approx(ref["ce_loss_clean"])


def test_a_silent_clt_is_every_mlp_zero_ablated(tiny_lm, rows):
    d = _clt([0, 1, 2])
    with torch.no_grad():
        d.b_dec.zero_()
        for group in d.groups:
            group.W_dec.zero_()
    ours = evaluate_replacement({"silent": d}, tiny_lm, rows, batch_size=3, progress=False)["silent"]
    ids = rows.long()
    keep = keep_mask(ids, SpecialTokens.of(tiny_lm.tokenizer).ids)
    pred = (keep[:, :-1] & keep[:, 1:]).double()

    def ce(sites):
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for s in sites:
                stack.enter_context(splice(tiny_lm, s, lambda v: v * (~keep)[..., None].to(v.dtype)))
            logits = tiny_lm(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        return float((loss.view(ids.shape[0], -1).double() * pred).sum() / pred.sum())

    clean = ce([])
    assert ours["ce_loss_clean"] == pytest.approx(clean, rel=1e-5)
    assert ours["delta_loss_all_replaced"] == pytest.approx(ce(["mlp.0", "mlp.1", "mlp.2"]) - clean, rel=1e-4)
    for j, layer in enumerate(ours["layers"]):
        assert layer["delta_loss"] == pytest.approx(ce([f"mlp.{j}"]) - clean, rel=1e-4)
        assert layer["fvu"] == pytest.approx(1.0, abs=0.2) and layer["l0"] > 0
    quick = evaluate_replacement({"silent": d}, tiny_lm, rows, batch_size=3, progress=False, layers_alone=False)["silent"]
    assert quick["delta_loss_all_replaced"] == ours["delta_loss_all_replaced"] and math.isnan(quick["layers"][0]["delta_loss"])
    assert [x["fvu"] for x in quick["layers"]] == [x["fvu"] for x in ours["layers"]]


def test_a_transcoder_set_equals_the_clt_with_the_same_diagonal(tiny_lm, rows):
    d = _clt([0, 2])
    with torch.no_grad():
        d.groups[0].W_dec.view(16, 2, D)[:, 1].zero_()  # no cross-layer writes
    f = d.fold()
    saes = []
    for i, layer in enumerate((0, 2)):
        sae = JumpReLUSAE(SAEConfig(d_in=D, d_sae=16, site=f"mlp_in.{layer}", target_site=f"mlp.{layer}"))
        with torch.no_grad():
            sae.W_enc.copy_(f.W_enc[i])
            sae.b_enc.copy_(f.b_enc[i])
            sae.set_threshold(f.theta[i])
            sae.W_dec.copy_(f.W_dec[i][:, 0])
            sae.b_dec.copy_(f.b_dec[i])
        saes.append(sae)
    out = evaluate_replacement({"clt": d, "set": saes[::-1]}, tiny_lm, rows, batch_size=4, progress=False)
    assert out["set"]["kind"] == "transcoders" and out["set"]["sites_in"] == ["mlp_in.0", "mlp_in.2"]
    for key in ("delta_loss_all_replaced", "kl_all_replaced", "fvu_mean", "l0_per_layer"):
        assert out["set"][key] == pytest.approx(out["clt"][key], rel=1e-4, abs=1e-6), key


def test_an_exact_crosscoder_replaces_without_loss_and_a_wrong_later_write_shows_only_all_at_once(tiny_lm, rows):
    """Each group codes its residual as ReLU(x)·[I; −I] (exact); moving a cross-layer block makes
    layer 2's output wrong by what layer 0 wrote, in both modes, and layer 0 stays exact."""
    d = MultiLayerDictionary(MultiLayerConfig(kind="crosscoder", sites_in=["resid.0", "resid.2"],
                                              sites_out=["resid.0", "resid.2"], d_in=D, d_out=D, d_sae=2 * D))
    eye = torch.eye(D)
    with torch.no_grad():
        for i, group in enumerate(d.groups):
            group.W_enc.copy_(torch.cat([eye, -eye], 1))
            group.set_threshold(torch.full((2 * D,), 1e-9))
            group.W_dec.view(2 * D, 2 - i, D)[:, 0].copy_(torch.cat([eye, -eye], 0))
    out = evaluate_replacement({"exact": d}, tiny_lm, rows, batch_size=4, progress=False)["exact"]
    assert abs(out["delta_loss_all_replaced"]) < 1e-4 and out["kl_all_replaced"] < 1e-6
    assert all(layer["fvu"] < 1e-8 for layer in out["layers"])
    with torch.no_grad():
        d.groups[0].W_dec.view(2 * D, 2, D)[:, 1].copy_(torch.cat([eye, -eye], 0) * 0.1)
    out = evaluate_replacement({"leaky": d}, tiny_lm, rows, batch_size=4, progress=False)["leaky"]
    assert out["layers"][0]["fvu"] < 1e-8 and out["layers"][1]["fvu"] > 1e-4
    assert out["kl_all_replaced"] > 0


def test_saescope_eval_reports_a_clt_as_the_replacement_model(model_dir, doc_folder, tmp_path, capsys):
    """A folder with a CLT and no single-layer SAE: the CLI prints the replacement table; evaluating
    other dictionaries into the same file drops the stale replacement results."""
    from saescope import save_dictionary, save_sae
    from saescope.cli import main

    save_dictionary(_clt([0, 1]), tmp_path / "dicts" / "clt", format="native")
    args = ["--model", str(model_dir), "--tokens", "192", "--seq-len", "32", "--corpus", str(doc_folder),
            "--holdout-fraction", "0.5", "--out", str(tmp_path / "eval.json")]
    assert main(["-q", "eval", "--sae", str(tmp_path / "dicts"), *args]) == 0
    printed = capsys.readouterr().out
    assert "delta loss, all replaced" in printed and "| clt | clt | 2 |" in printed
    assert (tmp_path / "eval_replacement.json").is_file()
    save_sae(JumpReLUSAE(SAEConfig(d_in=D, d_sae=8, site="resid.1")), tmp_path / "sae", format="native")
    assert main(["-q", "eval", "--sae", str(tmp_path / "sae"), *args]) == 0
    assert not (tmp_path / "eval_replacement.json").exists()


def test_every_mlp_replaced_at_once_equals_a_hand_rolled_sequential_splice(tiny_lm, rows):
    """A CLT with cross-layer writes: the all-at-once delta loss against hooks written here from the
    dictionary's public encode/decode (later groups' codes zero: causality), read live."""
    d = _clt([0, 1, 2])
    ids = rows.long()
    keep = keep_mask(ids, SpecialTokens.of(tiny_lm.tokenizer).ids)
    pred = (keep[:, :-1] & keep[:, 1:]).double()
    codes = {}

    def read(site):
        return lambda v: codes.__setitem__(site, d.encode({s: v if s == site else v * 0 for s in d.cfg.sites_in})[site]) or v

    def write(j):
        def fn(v):
            full = {s: codes.get(s, torch.zeros(*v.shape[:-1], 16)) for s in d.cfg.sites_in}
            return torch.where(keep[..., None], d.decode(full)[f"mlp.{j}"].to(v.dtype), v)
        return fn

    def ce(replace: bool) -> float:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for j in range(3) if replace else ():
                stack.enter_context(splice(tiny_lm, f"mlp_in.{j}", read(f"mlp_in.{j}")))
                stack.enter_context(splice(tiny_lm, f"mlp.{j}", write(j)))
            logits = tiny_lm(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        return float((loss.view(ids.shape[0], -1).double() * pred).sum() / pred.sum())

    assert any(block[:, 1:].abs().sum() > 0 for block in d.W_dec[:2])  # cross-layer writes in play
    ours = evaluate_replacement({"clt": d}, tiny_lm, rows, batch_size=len(rows), progress=False)["clt"]
    assert ours["delta_loss_all_replaced"] == pytest.approx(ce(True) - ce(False), rel=1e-4, abs=1e-6)
