"""The JAX backend against the PyTorch reference: forward, loss, every gradient, and the θ
pseudo-gradient with pre-activations planted inside and outside the ε window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")  # the [jax] extra: installed by make, so this never skips in CI
import jax.numpy as jnp  # noqa: E402

from saescope import JumpReLUSAE, SAEConfig  # noqa: E402
from saescope import jax as sj  # noqa: E402

jax.config.update("jax_enable_x64", False)


def _sae(theta_param: str, transcoder: bool, seed: int = 0) -> tuple[JumpReLUSAE, torch.Tensor, torch.Tensor]:
    """A JumpReLU SAE (or transcoder) with random biases and thresholds, and a batch. ε is wide
    enough that many pre-activations fall inside θ's window (and most outside)."""
    d_in, m = 12, 40
    cfg = SAEConfig(d_in=d_in, d_sae=m, d_out=10 if transcoder else None, site="mlp_in.0" if transcoder else "resid.0",
                    target_site="mlp.0" if transcoder else None, theta_param=theta_param, bandwidth=0.2)
    sae = JumpReLUSAE(cfg)
    g = torch.Generator().manual_seed(seed)
    sae.init_weights(g)
    sae.pre_encoder_bias.fill_(not transcoder)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1, generator=g)
        sae.b_dec.normal_(0, 0.1, generator=g)
        sae.set_threshold(torch.rand(m, generator=g) * 0.3 + 0.05)
    x = torch.randn(64, d_in, generator=g)
    target = torch.randn(64, cfg.width_out, generator=g) if transcoder else x
    with torch.no_grad():
        u = (sae.pre_acts(x) - sae.threshold) / cfg.bandwidth
        inside = int(((u > -0.5) & (u < 0.5)).sum())
    assert 100 < inside < u.numel() // 2  # the pseudo-gradient has work to do, and so do the others
    return sae, x, target


@pytest.mark.parametrize("theta_param", ["theta", "log"])
@pytest.mark.parametrize("transcoder", [False, True])
def test_loss_and_gradients_equal_the_pytorch_reference(theta_param, transcoder):
    sae, x, target = _sae(theta_param, transcoder)
    coeff = 0.3
    out = sae.training_loss(x, target, coeff, path="reference")
    out["loss"].backward()
    params, static = sj.from_torch(sae)
    (value, aux), grads = jax.value_and_grad(sj.loss, has_aux=True)(params, jnp.asarray(x.numpy()),
                                                                      jnp.asarray(target.numpy()), coeff, **static)
    np.testing.assert_allclose(float(value), float(out["loss"].detach()), rtol=1e-6)
    np.testing.assert_allclose(float(aux["l0"]), float(out["l0"]), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(aux["fired"]), out["fired"].numpy())
    names = {"theta": "theta", "log_theta": "log_threshold"}
    torch_grads = {k: p.grad for k, p in sae.named_parameters()}
    for k, g in grads.items():
        np.testing.assert_allclose(np.asarray(g), torch_grads[names.get(k, k)].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_the_theta_pseudo_gradient_inside_and_outside_the_window():
    """∂/∂θ by hand: −(θ/ε)·Σ_batch g·K for the activation, −(1/ε)·Σ_batch g·K for the step."""
    eps = 0.05
    theta = jnp.asarray([0.2, 0.2, 0.2])
    z = jnp.asarray([[0.2 + 0.4 * eps, 0.2 - 0.4 * eps, 0.2 + 0.6 * eps],
                     [0.2 - 0.6 * eps, 0.2 + 0.1 * eps, 0.5]])  # inside, inside, outside / outside, inside, far
    inside = np.array([[1, 1, 0], [0, 1, 0]], dtype=np.float32)
    g = jnp.asarray([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    _, vjp = jax.vjp(lambda t: sj.jumprelu(z, t, eps), theta)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), -(0.2 / eps) * (np.asarray(g) * inside).sum(0), rtol=1e-6)
    _, vjp = jax.vjp(lambda t: sj.step(z, t, eps), theta)
    np.testing.assert_allclose(np.asarray(vjp(g)[0]), -(1 / eps) * (np.asarray(g) * inside).sum(0), rtol=1e-6)
    _, vjp = jax.vjp(lambda zz: sj.jumprelu(zz, theta, eps), z)
    np.testing.assert_array_equal(np.asarray(vjp(g)[0]), np.asarray(g) * (np.asarray(z) > 0.2))
    _, vjp = jax.vjp(lambda zz: sj.step(zz, theta, eps), z)
    assert not np.asarray(vjp(g)[0]).any()


def test_parameters_round_trip_through_pytorch():
    sae, *_ = _sae("log", False)
    params, _ = sj.from_torch(sae)
    other = JumpReLUSAE(sae.cfg)
    sj.to_torch(params, other)
    for k, v in sae.state_dict().items():
        if k not in ("norm_scalar", "pre_encoder_bias"):
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)
