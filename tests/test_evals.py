"""Metrics against hand-computed values, and splice sanity: identity → no loss, zeros → nothing recovered."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saescope import CorpusConfig, ReLUSAE, SAEConfig
from saescope.data import token_rows
from saescope.evals import dead_dense, evaluate, fvu, kl_divergence, l0, massive_dims
from saescope.evals.metrics import _ce, CleanPass, per_sequence_se


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


def test_the_per_sequence_standard_error_by_hand():
    # equal counts: the plain standard error of the per-sequence means (1, 2, 3, 6): sd 2.16, /√4
    assert per_sequence_se([10, 20, 30, 60], [10, 10, 10, 10]) == pytest.approx(np.std([1, 2, 3, 6], ddof=1) / 2)
    # unequal counts: the ratio estimator; R = 12 / 6 = 2, residuals (2 − 2·1, 10 − 2·5) = 0
    assert per_sequence_se([2, 10], [1, 5]) == pytest.approx(0.0)
    assert math.isnan(per_sequence_se([1.0], [3.0]))


def test_the_batched_comparison_equals_cross_entropy_and_kl_from_logits():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (3, 9), generator=g)
    clean, spliced = torch.randn(3, 9, 50, generator=g) * 3, torch.randn(3, 9, 50, generator=g) * 3
    ref = CleanPass(clean, ids)
    ce, kl = ref.compare(spliced)
    torch.testing.assert_close(ref.ce, _ce(clean, ids))
    torch.testing.assert_close(ce, _ce(spliced, ids))
    torch.testing.assert_close(kl, kl_divergence(clean[:, :-1], spliced[:, :-1]))
    assert float(ref.compare(clean)[1].abs().max()) == 0.0


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
    assert ident["delta_loss_se"] < 1e-4 and 0 < out["zero"]["delta_loss_se"] < math.inf
    assert out["zero"]["fvu"] > 0.99 and out["zero"]["ce_loss_spliced"] == pytest.approx(out["zero"]["ce_loss_zero_ablation"])
    assert ident["l0"] == pytest.approx(32, abs=0.1) and ident["dead_fraction"] == 0.0
    for key in ("l0", "fvu", "delta_loss", "ce_loss_clean", "ce_loss_spliced", "ce_loss_recovered", "kl",
                "dead_fraction", "dense_fraction", "n_tokens", "site"):
        assert key in ident
    assert ident["n_tokens"] == rows.numel() and ident["n_scored"] < rows.numel()  # BOS/EOS/pad not scored
    assert len(ident["recon_loss_by_position"]) == 32 and len(ident["firing_frequency"]) == 64


def test_a_skip_transcoders_skip_is_in_its_splice(tiny_lm, rows):
    """A "transcoder" of resid.1 into itself whose dictionary is silent and whose skip is the
    identity reconstructs exactly: the evaluation adds x·A to the decode."""
    sae = ReLUSAE(SAEConfig(arch="relu", d_in=32, d_sae=8, site="resid.1", target_site="resid.1", skip=True))
    with torch.no_grad():
        sae.W_skip.copy_(torch.eye(32))
    out = evaluate({"skip": sae}, tiny_lm, rows, batch_size=4, progress=False)["skip"]
    assert out["fvu"] < 1e-10 and abs(out["delta_loss"]) < 1e-4 and out["l0"] == 0


def _letter_words(n_per_letter=80, n_marked=40, seed=0):
    """Words of letters a–d along e0..e3; the first `n_marked` 'a' words also carry their own marker
    direction e(4 + w), which lets a word-specific latent absorb the letter."""
    g = torch.Generator().manual_seed(seed)
    d = 4 + n_marked
    xs, labels = [], []
    for li, letter in enumerate("abcd"):
        for w in range(n_per_letter):
            x = torch.randn(d, generator=g) * 0.05
            x[li] += 3.0
            if letter == "a" and w < n_marked:
                x[4 + w] += 1.5
            xs.append(x)
            labels.append(letter)
    return torch.stack(xs), labels, d


def _dictionary(enc: torch.Tensor, dec: torch.Tensor, theta: float):
    from saescope import JumpReLUSAE

    sae = JumpReLUSAE(SAEConfig(d_in=enc.shape[0], d_sae=enc.shape[1], site="resid.0"))
    with torch.no_grad():
        sae.W_enc.copy_(enc)
        sae.W_dec.copy_(torch.nn.functional.normalize(dec, dim=1))
        sae.set_threshold(torch.full((enc.shape[1],), theta))
    return sae


def test_absorption_on_a_planted_split():
    from saescope.evals.absorption import absorption_from_activations

    x, labels, d = _letter_words()
    eye = torch.eye(d)
    clean = _dictionary(eye[:, :4], eye[:4], theta=1.0)
    result = absorption_from_activations(clean, x, labels)
    assert result["probe_accuracy"] > 0.95 and result["absorption_rate"] == 0.0
    assert result["letters"]["a"]["main_latents"] == [0]
    assert result["absorption_fraction"] == 0.0
    # the 'a' latent goes silent on marked words; one latent per marked word fires instead and
    # reconstructs the whole word (3·e0 + 1.5·its marker), so it carries the letter's direction
    enc = torch.cat([eye[:, :4], eye[:, 4:] * (45 ** 0.5 / 1.5)], 1)
    enc[4:, 0] = -2.0
    dec = torch.cat([eye[:4], 1.5 * eye[4:] + 3 * eye[0]], 0)
    absorbing = _dictionary(enc, dec, theta=1.0)
    result = absorption_from_activations(absorbing, x, labels)
    a = result["letters"]["a"]
    assert a["main_latents"][0] == 0 and a["absorbed"] > 0 and a["absorbed"] == a["missed_by_main"]
    assert all(result["letters"][c]["absorbed"] == 0 for c in "bcd")
    # fully absorbed words count 1 in the fraction too, words the main latent covers 0
    assert result["absorption_fraction"] == pytest.approx(result["absorption_rate"])
    # partial: the 'a' latent still fires on marked words at half strength and the marker latent
    # supplies the other half, so the words count in the fraction, not in the full-absorption rate
    enc = torch.cat([eye[:, :4], eye[:, 4:] * (1.5 ** 2 * 2) ** 0.5 / 1.5], 1)
    enc[4:, 0] = -1.0
    dec = torch.cat([eye[:4], 1.5 * eye[4:] + 1.5 * eye[0]], 0)
    partial = absorption_from_activations(_dictionary(enc, dec, theta=1.0), x, labels)
    assert partial["absorption_rate"] == 0.0
    assert 0.2 < partial["letters"]["a"]["absorption_fraction"] / a["absorption_fraction"] < 0.8
    assert all(partial["letters"][c]["absorption_fraction"] == 0.0 for c in "bcd")
    assert 0.05 < result["absorption_rate"] < 0.25


def test_error_bars_against_a_hand_computation(tiny_lm, rows):
    """Delta loss, KL and CE recovered with sequences as the sampling units, each row spliced and
    scored on its own here: the ratio estimator's standard error written out in numpy."""
    from saescope import splice
    from saescope.data.tokens import SpecialTokens, keep_mask

    half = _identity(32, "resid.1")
    with torch.no_grad():
        half.W_dec.mul_(0.5)
    out = evaluate({"half": half}, tiny_lm, rows, batch_size=4, progress=False)["half"]
    special = SpecialTokens.of(tiny_lm.tokenizer).ids
    per = []
    with torch.no_grad():
        for row in rows:
            ids = row[None].long()
            keep = keep_mask(ids, special)
            pred = keep[:, :-1] & keep[:, 1:]
            clean = tiny_lm(ids)
            with splice(tiny_lm, "resid.1", lambda v: torch.where(keep[..., None], half(v).to(v.dtype), v)):
                spliced = tiny_lm(ids)
            with splice(tiny_lm, "resid.1", lambda v: v * (~keep)[..., None]):
                zero = tiny_lm(ids)
            per.append([float(pred.sum()), *(float(_ce(x, ids)[pred].sum()) for x in (clean, spliced, zero)),
                        float(kl_divergence(clean[:, :-1], spliced[:, :-1])[pred].sum())])
    n, c, s, z, k = np.array(per, dtype=np.float64).T

    def se(a, b):
        r = a.sum() / b.sum()
        return np.sqrt(((a - r * b) ** 2).sum() / (len(b) * (len(b) - 1))) / abs(b.mean())

    assert out["delta_loss"] == pytest.approx((s - c).sum() / n.sum(), rel=1e-5)
    assert out["delta_loss_se"] == pytest.approx(se(s - c, n), rel=1e-4)
    assert out["kl_se"] == pytest.approx(se(k, n), rel=1e-4)
    assert out["ce_loss_recovered"] == pytest.approx((z - s).sum() / (z - c).sum(), rel=1e-5)
    assert out["ce_loss_recovered_se"] == pytest.approx(se(z - s, z - c), rel=1e-4)
    assert out["delta_loss_se"] > 0 and out["kl_se"] > 0 and out["ce_loss_recovered_se"] > 0


def test_transcoders_are_fed_the_input_site_they_name(gemma_lm, doc_folder):
    """A Gemma Scope 1 transcoder reads ln2.L (before the norm's scale), a Gemma Scope 2 one
    mlp_in.L (after it): the evaluator feeds each its own tensor, so the same weights give each
    the L0 its own input gives by hand, and the two differ."""
    from saescope import JumpReLUSAE, capture

    cfg = CorpusConfig(source=str(doc_folder), seq_len=32, split="all")
    rows = torch.from_numpy(np.stack(list(token_rows(gemma_lm, cfg))[:4]))
    with torch.no_grad():  # a learned scale of about 2 (Gemma scales by 1 + w): the two sites far apart
        gemma_lm.layers[1].pre_feedforward_layernorm.weight.add_(1.0)
    saes = {}
    for site in ("ln2.1", "mlp_in.1"):
        sae = JumpReLUSAE(SAEConfig(d_in=32, d_sae=64, site=site, target_site="mlp.1"))
        sae.init_weights(torch.Generator().manual_seed(0))
        with torch.no_grad():
            sae.set_threshold(torch.full((64,), 0.3))
        saes[site] = sae
    out = evaluate(saes, gemma_lm, rows, batch_size=2, progress=False)
    acts = capture(gemma_lm, rows, ["ln2.1", "mlp_in.1"])
    from saescope.data.tokens import SpecialTokens, keep_mask

    keep = keep_mask(rows, SpecialTokens.of(gemma_lm.tokenizer).ids)
    for site, sae in saes.items():
        by_hand = float((sae.encode(acts[site]) != 0).sum(-1)[keep].double().mean())
        assert out[site]["l0"] == pytest.approx(by_hand, rel=1e-6), site
    assert abs(out["ln2.1"]["l0"] - out["mlp_in.1"]["l0"]) > 0.5
