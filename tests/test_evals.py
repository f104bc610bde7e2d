"""Metrics against hand-computed values, and splice sanity: identity → no loss, zeros → nothing recovered."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saescope import CorpusConfig, ReLUSAE, SAEConfig
from saescope.data import token_rows
from saescope.evals import dead_dense, evaluate, fvu, kl_divergence, l0, massive_dims


def test_metrics_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0], [4.0, 0.0]])
    # mean (3, 2); Σ‖x − mean‖² = (4+0) + (0+4) + (4+4) = 16; Σ‖x − x̂‖² = 1 + 1 + 1 = 3
    assert fvu(x, x_hat) == pytest.approx(3 / 16)
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])) == pytest.approx(1.0)
    assert dead_dense(torch.tensor([0.0, 0.05, 0.2, 0.0, 0.5])) == (pytest.approx(0.4), pytest.approx(0.4))
    p, q = torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(kl_divergence(p.log()[None], q.log()[None])) == pytest.approx(expected, rel=1e-6)
    assert float(kl_divergence(p.log()[None], p.log()[None])) == pytest.approx(0.0, abs=1e-7)
    mean = torch.tensor([2300.0, 1.0, -3.0, 1900.0, 0.5])
    assert massive_dims(mean, torch.tensor([40.0, 30.0, 35.0, 45.0, 20.0])) == [0, 3]


def _identity(d: int, site: str) -> ReLUSAE:
    """relu(x) − relu(−x) = x: a ReLU SAE that reconstructs exactly."""
    sae = ReLUSAE(SAEConfig(arch="relu", d_in=d, d_sae=2 * d, site=site))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    return sae


@pytest.fixture
def rows(tiny_lm, doc_folder):
    cfg = CorpusConfig(source=str(doc_folder), seq_len=32, split="all")
    return torch.from_numpy(np.stack(list(token_rows(tiny_lm, cfg))[:6]))


def test_identity_and_zero_splices(tiny_lm, rows):
    zero = _identity(32, "resid.1")
    with torch.no_grad():
        zero.W_dec.zero_()
    saes = {"identity": _identity(32, "resid.1"), "attn": _identity(48, "attn.0"), "zero": zero}
    out = evaluate(saes, tiny_lm, rows, batch_size=4, progress=False)
    ident = out["identity"]
    assert abs(ident["delta_loss"]) < 1e-4 and ident["kl"] < 1e-6 and ident["fvu"] < 1e-10
    assert ident["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert abs(out["attn"]["delta_loss"]) < 1e-4
    assert out["zero"]["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert out["zero"]["fvu"] > 0.99 and out["zero"]["ce_loss_spliced"] == pytest.approx(out["zero"]["ce_loss_zero_ablation"])
    assert ident["l0"] == pytest.approx(32, abs=0.1) and ident["dead_fraction"] == 0.0
    for key in ("l0", "fvu", "delta_loss", "ce_loss_clean", "ce_loss_spliced", "ce_loss_recovered", "kl",
                "dead_fraction", "dense_fraction", "n_tokens", "site"):
        assert key in ident
    assert ident["n_tokens"] == rows.numel() and ident["n_scored"] < rows.numel()  # BOS/EOS/pad not scored
    assert len(ident["recon_loss_by_position"]) == 32 and len(ident["firing_frequency"]) == 64
