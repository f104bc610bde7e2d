"""JumpReLU math against a NumPy reference and SPEC §2's pseudo-derivatives; folding; baselines."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from saescope import JumpReLUSAE, SAEConfig, SaescopeError, build_sae
from saescope.sae import JumpReLUFn, StepFn


def _random_sae(arch="jumprelu", d_in=6, d_sae=10, seed=0, **kw) -> JumpReLUSAE:
    gen = torch.Generator().manual_seed(seed)
    sae = build_sae(SAEConfig(arch=arch, d_in=d_in, d_sae=d_sae, **kw))
    sae.init_weights(gen)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(d_sae, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.cfg.width_out, generator=gen) * 0.1)
        if arch == "jumprelu":
            sae.set_threshold(torch.rand(d_sae, generator=gen) * 0.3 + 0.01)
    return sae


def numpy_jumprelu(x, W_enc, b_enc, W_dec, b_dec, theta):
    """SPEC §2 inference form, written independently in NumPy."""
    pre = x @ W_enc + b_enc
    f = np.where(pre > theta, pre, 0.0)
    return f, f @ W_dec + b_dec


@pytest.mark.parametrize("theta_param", ["theta", "log"])
def test_inference_form_matches_numpy(theta_param):
    sae = _random_sae(theta_param=theta_param)
    x = np.random.default_rng(1).normal(size=(4, 3, 6)).astype(np.float32)
    p = {k: getattr(sae, k).detach().double().numpy() for k in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")}
    f_ref, x_hat_ref = numpy_jumprelu(x.astype(np.float64), p["W_enc"], p["b_enc"], p["W_dec"], p["b_dec"], p["threshold"])
    xt = torch.from_numpy(x)
    f = sae.encode(xt)
    assert f.shape == (4, 3, 10) and (f > 0).any() and (f == 0).any()
    np.testing.assert_allclose(f.detach().numpy(), f_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(sae.decode(f).detach().numpy(), x_hat_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae(xt), sae.decode(sae.encode(xt)))


def test_pseudo_derivatives_on_hand_built_inputs():
    eps, theta0 = 0.001, 0.5
    # z at θ, just inside the ε window on both sides, just outside it, and far outside
    z = torch.tensor([0.5, 0.5004, 0.4996, 0.50051, 0.49949, 0.6, 0.3], dtype=torch.float64, requires_grad=True)
    theta = torch.full((7,), theta0, dtype=torch.float64, requires_grad=True)
    inside = torch.tensor([1, 1, 1, 0, 0, 0, 0], dtype=torch.float64)  # K((z−θ)/ε): strict |u| < ½
    above = torch.tensor([0, 1, 0, 1, 0, 1, 0], dtype=torch.float64)   # H(z − θ): strict z > θ
    out = JumpReLUFn.apply(z, theta, eps)
    torch.testing.assert_close(out.detach(), z.detach() * above)
    out.backward(torch.ones(7, dtype=torch.float64))
    torch.testing.assert_close(z.grad, above)                                  # ∂/∂z = H(z − θ)
    torch.testing.assert_close(theta.grad, -(theta0 / eps) * inside)          # −(θ/ε)·K
    z.grad = theta.grad = None
    step = StepFn.apply(z, theta, eps)
    torch.testing.assert_close(step.detach(), above)
    step.backward(torch.full((7,), 2.0, dtype=torch.float64))
    torch.testing.assert_close(z.grad, torch.zeros(7, dtype=torch.float64))   # no STE to the input
    torch.testing.assert_close(theta.grad, -2.0 * (1 / eps) * inside)         # −(1/ε)·K, times upstream


def test_threshold_gradient_sums_over_the_batch():
    theta = torch.tensor([0.5, 0.2], requires_grad=True)
    z = torch.tensor([[0.5002, 0.9], [0.4999, 0.2001], [0.1, 0.2]])
    StepFn.apply(z, theta, 0.001).sum().backward()
    torch.testing.assert_close(theta.grad, torch.tensor([-2000.0, -2000.0]))


def test_training_loss_by_hand():
    sae = _random_sae()
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(2))
    out = sae.training_loss(x, x, sparsity_coeff=0.3)
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc if bool(sae.pre_encoder_bias) else x @ sae.W_enc + sae.b_enc
    f = pre * (pre > sae.threshold)
    mse = ((f @ sae.W_dec + sae.b_dec - x) ** 2).sum(-1).mean()
    l0 = (pre > sae.threshold).float().sum(-1).mean()
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["l0"], l0)
    torch.testing.assert_close(out["loss"], mse + 0.3 * l0)


@pytest.mark.parametrize("arch, kw", [("jumprelu", {}), ("jumprelu", {"theta_param": "log"}), ("topk", {"k": 3}),
                                      ("relu", {}), ("batchtopk", {"k": 3})])
def test_fold_keeps_raw_outputs(arch, kw):
    sae = _random_sae(arch, **kw)
    c = 37.5
    sae.norm_scalar.fill_(c)
    sae.pre_encoder_bias.fill_(True)
    x_raw = torch.randn(64, 6, generator=torch.Generator().manual_seed(3)).double() * c
    sae = sae.double()
    if arch == "batchtopk":
        sae.training_loss(x_raw / c, x_raw / c, 0.0)  # sets the shared threshold
    folded = sae.fold()
    assert folded.folded and not sae.folded
    f = sae._activate(sae.pre_acts(x_raw / c))
    x_hat = f @ sae.W_dec + sae.b_dec
    torch.testing.assert_close(folded.encode(x_raw), c * f, rtol=1e-5, atol=1e-9)    # f_raw(x) = C·f(x/C)
    torch.testing.assert_close(folded(x_raw), c * x_hat, rtol=1e-5, atol=1e-9)       # x̂_raw = C·x̂
    torch.testing.assert_close(sae.encode(x_raw), folded.encode(x_raw), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(folded.W_enc, sae.W_enc)
    torch.testing.assert_close(folded.W_dec, sae.W_dec)
    torch.testing.assert_close(folded.b_enc, c * sae.b_enc - c * (sae.b_dec @ sae.W_enc))
    torch.testing.assert_close(folded.b_dec, c * sae.b_dec)
    torch.testing.assert_close(folded.threshold, c * sae.threshold)


def test_init_and_decoder_constraint():
    sae = _random_sae(d_in=8, d_sae=32)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    sae2 = build_sae(SAEConfig(d_in=8, d_sae=32))
    sae2.init_weights(torch.Generator().manual_seed(0))
    torch.testing.assert_close(sae2.W_enc, sae2.W_dec.T)
    assert torch.equal(sae2.b_enc, torch.zeros(32)) and torch.allclose(sae2.threshold, torch.full((32,), 0.001))
    tc = build_sae(SAEConfig(d_in=8, d_sae=32, site="mlp_in.1", target_site="mlp.1"))
    tc.init_weights(torch.Generator().manual_seed(0))
    assert not torch.allclose(tc.W_enc, tc.W_dec.T)
    sae.W_dec.grad = torch.randn(32, 8)
    sae.remove_parallel_grad()
    torch.testing.assert_close((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(32), atol=1e-6, rtol=0)
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_topk_and_batchtopk_selection():
    topk = _random_sae("topk", k=2)
    x = torch.randn(7, 6)
    f = topk.encode(x)
    assert ((f > 0).sum(-1) <= 2).all()
    pre = topk.pre_acts(x).relu()
    assert torch.equal(f.topk(2, dim=-1).values, pre.topk(2, dim=-1).values)
    bt = _random_sae("batchtopk", k=2)
    out = bt.training_loss(x, x, 0.0, dead=torch.ones(10, dtype=torch.bool))
    assert out["l0"] <= 2 + 1e-6 and float(out["aux"]) > 0
    assert float(bt.shared_threshold) < 0  # no inference threshold until one is fitted to finished weights
    bt.fit_threshold(x / bt.norm_scalar)
    assert int((bt.encode(x) > 0).sum()) == 2 * 7  # the batch's k·B largest
    relu = _random_sae("relu")
    torch.testing.assert_close(relu.encode(x), relu.pre_acts(x).relu())


def test_bad_configs():
    with pytest.raises(SaescopeError, match="unknown SAE architecture 'gated'"):
        SAEConfig(arch="gated", d_in=4, d_sae=8)
    with pytest.raises(SaescopeError, match="topk SAE needs k in 1..8"):
        SAEConfig(arch="topk", d_in=4, d_sae=8)
    with pytest.raises(SaescopeError, match="theta_param must be"):
        SAEConfig(d_in=4, d_sae=8, theta_param="exp")


def test_auxk_without_dead_latents_is_skipped_exactly():
    """On the CPU a step with no dead latent skips AuxK's two matmuls; loss and gradients are those
    of the term multiplied away (dead=None gives the same step)."""
    from saescope import TopKSAE

    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    grads = []
    for dead in (torch.zeros(24, dtype=torch.bool), None):
        sae = TopKSAE(SAEConfig(arch="topk", d_in=8, d_sae=24, k=3))
        sae.init_weights(torch.Generator().manual_seed(0))
        out = sae.training_loss(x, x, 0.0, dead=dead)
        out["loss"].backward()
        grads.append([out["loss"].detach()] + [p.grad.clone() for p in sae.parameters()])
        assert float(out["aux"]) == 0.0
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    one_dead = torch.zeros(24, dtype=torch.bool)
    one_dead[0] = True
    assert float(sae.training_loss(x, x, 0.0, dead=one_dead)["aux"]) > 0
