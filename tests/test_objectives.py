"""The objectives (sae/objectives.py) against hand-written gradients, Matryoshka on hand-built
prefixes, the quantile fast start on a planted dictionary, a killed run with every option, and
the config's one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_resumes_exactly, planted
from saescope import JumpReLUSAE, SAEConfig, SaescopeError, load_sae, save_sae
from saescope.config import SAESpec, TrainConfig, validated
from saescope.data import TensorSource
from saescope.sae.fast import Code
from saescope.sae.jumprelu import JumpReLUFn, StepFn
from saescope.sae.objectives import (Encoded, Objective, activation_frequency_penalty, frequency_penalty,
                                     reconstruction, sparsity_penalty, squared_error)
from saescope.train import trainer_for

EPS = 0.01
B, M = 6, 5


def _window_case():
    """Pre-activations placed around θ: inside the ε window (|z − θ| < ε/2) on both sides, and
    just outside it, so the rectangle kernel is 1 on some entries and 0 on the others."""
    theta = torch.tensor([0.2, 0.3, 0.1, 0.5, 0.4])
    offsets = torch.tensor([[0.3, -0.3, 0.7, -0.7, 2.0],
                            [0.1, 0.4, -0.2, 3.0, -0.6],
                            [-0.45, 0.2, 5.0, 0.3, 0.55],
                            [4.0, 3.0, 2.0, -0.1, 0.2],
                            [0.6, -4.0, 0.45, 1.0, -0.3],
                            [-2.0, 0.2, 0.3, 0.35, 6.0]]) * EPS
    return theta + offsets, theta


def _counts(objective_terms, input_ste=False):
    z, theta = _window_case()
    z = z.clone().requires_grad_(True)
    theta = theta.clone().requires_grad_(True)
    f = JumpReLUFn.apply(z, theta, EPS, input_ste)
    h = StepFn.apply(z, theta, EPS, input_ste)
    enc = Encoded(f, None, h.sum(), h.sum(-1), h.sum(0))
    objective_terms(enc).backward()
    return z, theta, h.detach(), f.detach()


def _kernel(z, theta):
    u = (z - theta) / EPS
    return ((u > -0.5) & (u < 0.5)).float()


@pytest.mark.parametrize("input_ste", [False, True])
@pytest.mark.parametrize("form", ["batch", "token"])
def test_quadratic_penalty_gradient_through_the_ste(form, input_ste):
    lam, target = 0.7, 2.0
    obj = Objective(sparsity="quadratic", target_l0=target, quadratic_form=form, input_ste=input_ste)
    z, theta, h, _ = _counts(lambda enc: sparsity_penalty(obj, lam, enc), input_ste)
    k = _kernel(z.detach(), theta.detach())
    tokens = h.sum(1)
    if form == "batch":  # d/dL0 of λ(L0 − L0*)²/(2 L0*) = λ(L0 − L0*)/L0*, and L0 = Σ h / B
        dh = (lam * (tokens.mean() - target) / target / B).expand(B, M)
    else:  # the mean over tokens of λ(l_b − L0*)²/(2 L0*)
        dh = (lam * (tokens - target) / target / B)[:, None].expand(B, M)
    torch.testing.assert_close(theta.grad, (dh * -k / EPS).sum(0))
    assert k.sum() > 0 and (k == 0).sum() > 0  # entries both inside and outside the window
    want_z = dh * k / EPS if input_ste else torch.zeros(B, M)
    torch.testing.assert_close(z.grad, want_z)


def test_frequency_penalty_reaches_only_dense_latents():
    w, tau = 3.0, 0.7
    obj = Objective(frequency_penalty=w, frequency_threshold=tau)
    z, theta, h, _ = _counts(lambda enc: frequency_penalty(obj, enc))
    share = h.mean(0)
    k = _kernel(z.detach(), theta.detach())
    dh = (w * (share > tau).float() / B).expand(B, M)
    torch.testing.assert_close(theta.grad, (dh * -k / EPS).sum(0))
    dense = share > tau
    assert dense.any() and (~dense).any()
    assert torch.all(theta.grad[~dense] == 0)  # a latent under τ pays nothing
    assert torch.all(z.grad == 0)  # no input STE: nothing reaches the pre-activations
    want = w * (share - tau).clamp_min(0).sum()
    torch.testing.assert_close(frequency_penalty(obj, Encoded(h, None, h.sum(), h.sum(1), h.sum(0))), want)


@pytest.mark.parametrize("sparse", [False, True])
def test_the_frequency_penalty_without_a_threshold_lowers_dense_latents_activations(sparse):
    """TopK's and BatchTopK's form: the value is w·Σ max(0, p_i − τ) of the firing counts, and each
    activation of a latent over τ gets w/(B·its mean activation), the others nothing; a sparse
    code gives what the dense matrix gives."""
    w, tau = 2.0, 0.4
    f = torch.tensor([[0.5, 0.0, 2.0, 0.0, 0.1],
                      [1.5, 0.0, 0.0, 0.3, 0.0],
                      [0.0, 0.2, 4.0, 0.0, 0.0],
                      [1.0, 0.0, 6.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 0.9, 0.0],
                      [2.0, 0.0, 0.0, 0.0, 0.0]], requires_grad=True)
    obj = Objective(frequency_penalty=w, frequency_threshold=tau)
    if sparse:
        code = Code.from_mask(f.detach(), f.detach() > 0)
        enc = Encoded(f[code.rows, code.cols], code, (f > 0).sum().float())
    else:
        enc = Encoded.of_dense(f)
    penalty = activation_frequency_penalty(obj, enc)
    fired = (f.detach() > 0).float()
    share = fired.mean(0)  # 4/6, 1/6, 3/6, 2/6, 1/6: latents 0 and 2 are over τ
    torch.testing.assert_close(penalty, w * (share - tau).clamp_min(0).sum())
    penalty.backward()
    mean = f.detach().sum(0) / fired.sum(0)
    want = (w * (share > tau).float() / (B * mean)).expand(B, M) * fired
    torch.testing.assert_close(f.grad * fired, want)  # the top-k's mask drops what reaches unfired entries
    assert torch.all(f.grad[:, [1, 3, 4]] == 0) and torch.all(f.grad[:, [0, 2]][fired[:, [0, 2]] > 0] > 0)


def test_the_frequency_penalty_keeps_a_dense_feature_under_its_threshold(tmp_path):
    """A planted dictionary plus one direction on 60% of tokens: the default target-L0 SAE (trained
    as BatchTopK) gives it a latent firing far above τ; with the penalty every latent stays near τ
    on held-out rows and the reconstruction barely changes."""
    from saescope.train import train

    x, _, _ = planted(n=60_000, l0=4.0)
    g = torch.Generator().manual_seed(5)
    direction = torch.nn.functional.normalize(torch.randn(x.shape[1], generator=g), dim=0)
    x = x + ((torch.rand(len(x), generator=g) < 0.6) * (torch.rand(len(x), generator=g) * 2 + 1))[:, None] * direction
    held, result = x[50_000:], {}
    for w in (0.0, 1.0):
        spec = SAESpec(sites=["resid.0"], widths=[128], target_l0=[5.0], frequency_penalty=w, frequency_threshold=0.2)
        cfg = TrainConfig(saes=[spec], tokens=100 * 512, batch_size=512, checkpoint_every=0, log_every=10)
        [path] = train(cfg, tmp_path / str(w), source=TensorSource({"resid.0": x[:50_000]}), progress=False)
        sae = load_sae(path)
        assert sae.cfg.arch == "jumprelu" and "converted_from" in sae.cfg.extra
        with torch.no_grad():
            f = sae.encode(held)
            fvu = float(((sae.decode(f) - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum())
        result[w] = float((f > 0).float().mean(0).max()), fvu
    (plain_share, plain_fvu), (share, fvu) = result[0.0], result[1.0]
    assert plain_share > 0.3 and share < 0.22, result
    assert fvu < 1.15 * plain_fvu, result


def test_tanh_penalty_gradient():
    lam, s = 0.5, 4.0
    obj = Objective(sparsity="tanh", tanh_scale=s)
    z, theta, h, f = _counts(lambda enc: sparsity_penalty(obj, lam, enc))
    k = _kernel(z.detach(), theta.detach())
    df = lam * s * (1 - torch.tanh(s * f) ** 2) / B  # d/df of λ Σ tanh(s f) / B
    torch.testing.assert_close(z.grad, df * h)
    torch.testing.assert_close(theta.grad, (df * -(theta.detach() / EPS) * k).sum(0))


def test_linear_l0_is_the_papers():
    obj = Objective()
    z, theta, h, _ = _counts(lambda enc: sparsity_penalty(obj, 0.25, enc))
    torch.testing.assert_close(theta.grad, (0.25 / B * -_kernel(z.detach(), theta.detach()) / EPS).sum(0))


def _hand_matryoshka(f, W, b, x, prefixes, weights):
    losses = []
    for p in (*prefixes, W.shape[0]):
        x_hat = b + sum(f[:, i:i + 1] * W[i] for i in range(p))
        losses.append(((x - x_hat) ** 2).sum(-1).mean())
    return sum(w * l for w, l in zip(weights, losses)), losses[-1]


@pytest.mark.parametrize("weights", [(), (0.5, 0.3, 0.2)])
def test_matryoshka_losses_on_hand_built_prefixes(weights):
    g = torch.Generator().manual_seed(0)
    f = torch.rand(4, 6, generator=g) * (torch.rand(4, 6, generator=g) < 0.5)
    W, b, x = torch.randn(6, 3, generator=g), torch.randn(3, generator=g), torch.randn(4, 3, generator=g)
    obj = Objective(matryoshka=(2, 4), matryoshka_weights=weights)
    want, want_mse = _hand_matryoshka(f, W, b, x, (2, 4), weights or (1 / 3,) * 3)
    on = (f > 0).float()
    dense = Encoded(f, None, on.sum(), on.sum(1), on.sum(0))
    loss, mse, x_hat = reconstruction(dense, W, b, x, obj)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(mse, want_mse)
    torch.testing.assert_close(mse, squared_error(f @ W + b, x))  # the last prefix is the whole dictionary
    code = Code.from_mask(f, f > 0)  # the same code, sparse
    sparse = Encoded(code.pre, code, on.sum(), on.sum(1), on.sum(0))
    torch.testing.assert_close(reconstruction(sparse, W, b, x, obj)[0], want)
    torch.testing.assert_close(reconstruction(dense, W, b, x, Objective())[0], want_mse)


@pytest.mark.parametrize("matryoshka", [(), (2, 4)])
def test_the_norm_cap_weighs_massive_rows_as_if_at_the_cap(matryoshka):
    """Row by row, by hand: a row whose centred norm is above cap × the median counts with its
    squared error times (cap·median/norm)², the others fully; the error reported stays unweighted,
    and the gradient is that of the hand-weighted loss (the weights take none)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(7, 3, generator=g)
    x[2] += torch.tensor([40.0, -30.0, 10.0])  # one massive row
    f = (torch.rand(7, 6, generator=g) * (torch.rand(7, 6, generator=g) < 0.6)).requires_grad_(True)
    W, b = torch.randn(6, 3, generator=g).requires_grad_(True), torch.randn(3, generator=g)
    cap = 2.0
    centred = x - x.mean(0)
    norms = [float(row.norm()) for row in centred]
    median = sorted(norms)[len(norms) // 2]  # torch's median: the lower middle (7 rows: the middle)
    weights = torch.tensor([min(1.0, (cap * median / n) ** 2) for n in norms])
    assert weights[2] < 0.2 and int((weights == 1).sum()) >= 4  # the massive row pays, most rows in full
    on = (f.detach() > 0).float()
    enc = Encoded(f, None, on.sum(), on.sum(1), on.sum(0))
    loss, mse, _ = reconstruction(enc, W, b, x, Objective(norm_cap=cap, matryoshka=matryoshka))
    bounds, parts = (*matryoshka, 6), []
    for hi in bounds:
        x_hat = f[:, :hi] @ W[:hi] + b
        parts.append(sum(weights[t] * ((x_hat[t] - x[t]) ** 2).sum() for t in range(7)) / 7)
    want = sum(parts) / len(parts)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(mse, squared_error((f @ W + b).detach(), x))
    got = torch.autograd.grad(loss, (f, W))
    for a, w in zip(got, torch.autograd.grad(want, (f, W))):
        torch.testing.assert_close(a, w)
    assert float(Objective(norm_cap=1e6).norm_cap) and torch.allclose(  # a cap above every row: the plain loss
        reconstruction(enc, W, b, x, Objective(norm_cap=1e6))[0], reconstruction(enc, W, b, x, Objective())[0])


def test_bad_objectives_are_one_line_errors():
    for values, text in [({"sparsity": "cubic"}, "sparsity"), ({"threshold_init": "median"}, "threshold_init"),
                         ({"arch": "topk", "dead_aux": 1.0}, "for jumprelu"),
                         ({"arch": "relu", "frequency_penalty": 1.0}, "not relu"),
                         ({"skip": True}, "skip is for transcoders"),
                         ({"sparsity": "quadratic"}, "set target_l0"),
                         ({"threshold_init": "quantile"}, "set target_l0"),
                         ({"widths": [64], "matryoshka": [16, 8]}, "increasing"),
                         ({"widths": [64], "matryoshka": [16, 64]}, "not below"),
                         ({"widths": [64], "matryoshka": [16], "matryoshka_weights": [1.0]}, "2 weights"),
                         ({"norm_cap": -1.0}, "norm_cap"),
                         ({"target_l0": [4.0], "train_as": "batchtopk", "dead_aux": 1.0}, "would be ignored"),
                         ({"target_l0": [4.5]}, "must be whole"),
                         ({"arch": "topk", "train_as": "batchtopk"}, "for jumprelu entries with target_l0")]:
        with pytest.raises(SaescopeError) as err:
            validated(SAESpec, **values)
        assert text in str(err.value) and "\n" not in str(err.value), str(err.value)
    with pytest.raises(SaescopeError, match="unknown sparsity"):
        Objective(sparsity="l1")


@pytest.mark.parametrize("target", [8.0, 30.0])
def test_the_quantile_start_puts_l0_near_the_target(target, tmp_path):
    """At step 0, on a batch the thresholds were not estimated from, L0 is within 25% of the target
    (the constant θ = 0.001 starts at about half the width)."""
    x, _, _ = planted(n=20_000)
    spec = dict(sites=["resid.0"], widths=[256], target_l0=[target], lambdas=[1e-2])
    starts = {}
    for init in ("constant", "quantile"):
        cfg = TrainConfig(saes=[SAESpec(**spec, threshold_init=init)], tokens=4 * 1024, batch_size=1024)
        trainer = trainer_for(cfg, tmp_path / init, source=TensorSource({"resid.0": x}))
        batches = iter(trainer.batches())
        trainer.build(next(batches))
        [m] = trainer.members
        other = next(batches)["resid.0"]
        with torch.no_grad():
            starts[init] = float((m.sae.encode(other) > 0).sum(1).float().mean())
    assert abs(starts["quantile"] - target) <= 0.25 * target, starts
    assert starts["constant"] > 3 * target


def test_signum_holds_the_target_l0_with_the_quadratic_penalty(tmp_path):
    """Under signum the quadratic penalty (with the quantile start) keeps the training L0 within 10%
    of the target from step 20 to the end, and the saved average encodes held-out tokens of the
    planted dictionary within 10% of it too; the λ-steered target is refused at the config."""
    from saescope.train import train

    x, _, _ = planted(n=80_000, l0=6.0)
    target = 8.0
    spec = SAESpec(sites=["resid.0"], widths=[128], target_l0=[target], lambdas=[1.0], sparsity="quadratic",
                   threshold_init="quantile")
    cfg = TrainConfig(saes=[spec], tokens=120 * 512, batch_size=512, lr=5e-3, optimizer="signum", lr_scale="width",
                      loss="fvu", checkpoint_every=0, log_every=10)
    [path] = train(cfg, tmp_path, source=TensorSource({"resid.0": x[:70_000]}), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(abs(r["l0"] - target) <= 0.1 * target for r in lines if r["step"] >= 20), [r["l0"] for r in lines]
    with torch.no_grad():
        held = float((load_sae(path).encode(x[70_000:]) > 0).sum(1).float().mean())
    assert abs(held - target) <= 0.1 * target, held
    with pytest.raises(SaescopeError, match="use sparsity = 'quadratic'"):
        validated(TrainConfig, saes=[dict(target_l0=[target], sparsity="l0")], optimizer="signum")


EVERY_OPTION = [
    SAESpec(sites=["resid.0"], widths=[32], target_l0=[4.0], lambdas=[1e-2], sparsity="quadratic", threshold_init="quantile"),
    SAESpec(sites=["resid.0"], widths=[32], target_l0=[4.0], lambdas=[1e-2], sparsity="quadratic", quadratic_form="token"),
    SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], sparsity="tanh"),
    SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], frequency_penalty=1.0, frequency_threshold=0.2),
    SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], matryoshka=[8, 16]),
    SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], dead_aux=1 / 32),
    SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], input_ste=True),
    SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], norm_cap=1.5),
    SAESpec(sites=["resid.0"], arch="topk", widths=[32], ks=[3], matryoshka=[8, 16], matryoshka_weights=[0.2, 0.3, 0.5]),
    SAESpec(sites=["resid.0"], arch="topk", widths=[32], ks=[3], norm_cap=1.5),
    SAESpec(sites=["resid.0"], arch="batchtopk", widths=[32], ks=[3], matryoshka=[8]),
    SAESpec(sites=["resid.0"], widths=[32], target_l0=[3.0], matryoshka=[8]),  # trained as BatchTopK, saved as JumpReLU
    SAESpec(sites=["resid.0"], arch="topk", widths=[32], ks=[3], frequency_penalty=1.0, frequency_threshold=0.2),
    SAESpec(sites=["resid.0"], widths=[32], target_l0=[3.0], frequency_penalty=1.0, frequency_threshold=0.2),
]


@pytest.fixture(scope="module")
def source():
    g = torch.Generator().manual_seed(1)
    return TensorSource({"resid.0": torch.randn(3000, 8, generator=g) * 5 + 2})


def test_a_killed_run_with_every_option_resumes_to_the_same_weights(source, tmp_path, monkeypatch):
    cfg = TrainConfig(saes=EVERY_OPTION, tokens=40 * 256, batch_size=256, lr=1e-3, checkpoint_every=10, log_every=5,
                      dead_tokens=512)
    folders = sorted(assert_resumes_exactly(cfg, tmp_path, source, monkeypatch, 25).iterdir())
    assert len(folders) == len(EVERY_OPTION)
    for folder in folders:
        name, whole = folder.name, load_sae(folder)
        # every SAE trained with an option still saves and loads in its formats (TopK has no Gemma Scope file)
        for fmt in ("native", "saelens") + (("gemmascope",) if whole.cfg.arch != "topk" else ()):
            again = load_sae(save_sae(whole, tmp_path / fmt / name, format=fmt))
            with torch.no_grad():  # rows it was not trained on: a converted θ sits between two training rows
                x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2)) * 5 + 2
                torch.testing.assert_close(again(x), whole(x), rtol=1e-5, atol=1e-5)


def test_the_objective_is_the_specs():
    spec = SAESpec(widths=[64], target_l0=[10.0, 20.0], sparsity="quadratic", matryoshka=[8, 32], frequency_penalty=2.0)
    obj = spec.objective(20.0)
    assert (obj.sparsity, obj.target_l0, obj.matryoshka, obj.frequency_penalty) == ("quadratic", 20.0, (8, 32), 2.0)
    sae = JumpReLUSAE(SAEConfig(d_in=4, d_sae=64))
    assert sae.objective == Objective()  # the paper's, unless training sets another


def test_batchtopk_conversion_bounds_its_buffer_and_keeps_every_threshold(monkeypatch):
    """With a largest-values buffer too shallow for the most often kept latents (as at width 16k on
    65k rows), those latents take their thresholds from all their values: every θ as unbounded."""
    from saescope import BatchTopKSAE
    from saescope.sae import convert

    sae = BatchTopKSAE(SAEConfig(arch="batchtopk", d_in=16, d_sae=96, k=6, site="resid.0"))
    sae.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(96, generator=g) * 0.3)
    x = torch.randn(2048, 16, generator=g) * 2
    whole = convert.batchtopk_to_jumprelu(sae, x, batch_size=256).threshold
    monkeypatch.setattr(convert, "TOP_ELEMENTS", 96 * 64)  # depth 64: some latents are kept far more often
    bounded = convert.batchtopk_to_jumprelu(sae, x, batch_size=256).threshold
    torch.testing.assert_close(bounded, whole, rtol=0, atol=0)


def test_batchtopk_converts_to_jumprelu_with_its_codes(tmp_path):
    """Per-latent thresholds from the training activations: each latent fires on exactly as many
    tokens as BatchTopK kept it on, nearly every token's code is BatchTopK's, and the converted SAE
    ships in the Gemma Scope format as a JumpReLU."""
    from saescope import BatchTopKSAE
    from saescope.sae.convert import batchtopk_to_jumprelu

    sae = BatchTopKSAE(SAEConfig(arch="batchtopk", d_in=16, d_sae=96, k=6, site="resid.0"))
    sae.init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(96, generator=g) * 0.3)
        sae.norm_scalar.fill_(2.0)
        sae.pre_encoder_bias.fill_(True)
    x = torch.randn(2048, 16, generator=g) * 2
    batch = 256
    kept = []
    with torch.no_grad():
        for i in range(0, len(x), batch):  # BatchTopK written plainly: the k·B largest of the batch
            pre = sae.pre_acts(x[i:i + batch] / 2.0).relu()
            cut = pre.reshape(-1).topk(6 * batch).values[-1]
            kept.append((pre >= cut) & (pre > 0))
    kept = torch.cat(kept)
    jr = batchtopk_to_jumprelu(sae, x, batch_size=batch)
    assert jr.cfg.arch == "jumprelu" and jr.cfg.extra["converted_from"]["k"] == 6
    with torch.no_grad():
        codes = jr.encode(x)
    fires = codes > 0
    torch.testing.assert_close(fires.sum(0), kept.sum(0))  # every latent's frequency, exactly
    agree = (fires & kept).sum() / (fires | kept).sum()
    assert agree > 0.9, float(agree)
    with torch.no_grad():  # where both fire the value is the same pre-activation (raw units)
        both = fires & kept
        want = sae.pre_acts(x / 2.0) * 2.0
        torch.testing.assert_close(codes[both], want[both], rtol=1e-5, atol=1e-5)
    again = load_sae(save_sae(jr, tmp_path / "gs", format="gemmascope"))
    with torch.no_grad():
        torch.testing.assert_close(again.encode(x), codes, rtol=1e-5, atol=1e-4)
