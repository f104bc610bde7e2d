"""The JAX backend against the PyTorch one: loss, every gradient and the θ pseudo-gradient inside
and outside the ε window; N steps from the same start on the same batches; whole suites through
`train(backend="jax")`, resumed after a kill; SAE files read by either backend."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")  # the [jax] extra: installed by make, so this never skips in CI
import jax.numpy as jnp  # noqa: E402

from conftest import PAPER, assert_resumes_exactly
from saescope import JumpReLUSAE, SAEConfig, SaescopeError  # noqa: E402
from saescope import jax as sj  # noqa: E402



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


@pytest.mark.parametrize("theta_param", ["theta", "log"])
def test_folding_equals_pytorchs_and_keeps_the_activations(theta_param):
    sae, x, _ = _sae(theta_param, False)
    sae.norm_scalar.fill_(7.0)
    raw = x * 7.0
    params, static = sj.from_torch(sae)
    folded = sj.fold(params, 7.0, static["pre_bias"])
    want, _ = sj.from_torch(sae.fold())
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(folded[k]), np.asarray(v), rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(np.asarray(sj.encode(folded, jnp.asarray(raw.numpy()), 1.0, False)),
                               np.asarray(sj.encode(params, jnp.asarray(raw.numpy()), 7.0, static["pre_bias"])),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(sj.encode(params, jnp.asarray(raw.numpy()), 7.0, static["pre_bias"])),
                               sae.encode(raw).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_parameters_round_trip_through_pytorch():
    sae, *_ = _sae("log", False)
    params, _ = sj.from_torch(sae)
    other = JumpReLUSAE(sae.cfg)
    sj.to_torch(params, other)
    for k, v in sae.state_dict().items():
        if k not in ("norm_scalar", "pre_encoder_bias"):
            torch.testing.assert_close(other.state_dict()[k], v, rtol=0, atol=0)


OBJECTIVES = [{}, {"sparsity": "quadratic", "target_l0": [6.0]}, {"sparsity": "quadratic", "target_l0": [6.0],
               "quadratic_form": "token"}, {"sparsity": "tanh"}, {"frequency_penalty": 0.5, "frequency_threshold": 0.05},
              {"matryoshka": [8, 32]}, {"dead_aux": 1 / 32}, {"input_ste": True}, {"norm_cap": 1.5}]


RECIPES = [{"optimizer": "signum", "lr_scale": "width", "loss": "fvu"}, {"optimizer": "signum", "momentum": 0.9},
           {"loss": "fvu", "lr_scale": "width", "lr": 3e-4}]  # lr × 16 at width 64


@pytest.mark.parametrize("theta_param,objective,recipe", [("theta", {}, {}), ("log", {}, {})]
                         + [("theta", o, {}) for o in OBJECTIVES[1:]] + [("theta", {}, r) for r in RECIPES])
def test_steps_equal_the_pytorch_trainer(theta_param, objective, recipe, tmp_path):
    """From the same initial parameters and the same batches, N steps of each backend, with each
    option of the objective (8 steps: by step 12 float rounding moves one of Matryoshka's
    pre-activations across the edge of θ's ε-window, which Adam turns into a visible change of θ)."""
    from saescope.config import SAESpec, TrainConfig
    from saescope.data import TensorSource
    from saescope.jax import train as jt
    from saescope.train import coeff_at, lr_at, trainer_for

    g = torch.Generator().manual_seed(3)
    acts = torch.randn(4096, 16, generator=g) * 3 + 1
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[64], lambdas=[3e-2], theta_param=theta_param,
                                    bandwidth=0.05, **objective)],
                      **{"tokens": (8 if objective else 12) * 256, "batch_size": 256, "lr": 3e-3, "kernels": "reference",
                         "checkpoint_every": 0, "dead_tokens": 256, **PAPER, **recipe})
    trainer = trainer_for(cfg, tmp_path, source=TensorSource({"resid.0": acts}))
    batches = list(trainer.batches())[:trainer.steps]
    trainer.build(batches[0])
    [m] = trainer.members
    if objective.get("dead_aux"):  # latents that never fire, so the dead-latent loss has work
        with torch.no_grad():
            m.sae.b_enc[:8] = -5.0
    params, static = sj.from_torch(m.sae)
    optimizer = jt.optimizer_of(cfg)
    state = jt.init(params, optimizer)
    for i, batch in enumerate(batches):
        x = jnp.asarray((batch["resid.0"] / m.scale).numpy())
        dead = jnp.asarray((m.since_fired >= trainer.dead_tokens).numpy())  # before PyTorch's step counts this batch
        scale = 1 / float(((x - x.mean(0)) ** 2).sum(-1).mean()) if cfg.loss == "fvu" else 1.0
        state, out = jt.train_step(state, x, x, lr_at(i, cfg.lr, trainer.lr_warmup) * m.lr_factor,
                                   coeff_at(i, m.coeff, trainer.coeff_warmup), dead, scale, m.signum_steps, optimizer=optimizer,
                                   **static)
        trainer.train_step(batch)
        trainer.step += 1
    want, _ = sj.from_torch(m.sae)
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(state.params[k]), np.asarray(v), rtol=1e-4, atol=2e-6, err_msg=k)
    assert float(out["l0"]) > 0
    if objective.get("dead_aux"):
        assert bool((m.since_fired >= trainer.dead_tokens).any())


def _suite(backend: str, **kw):
    from saescope.config import SAESpec, TrainConfig

    values = dict(saes=[SAESpec(sites=["resid.0"], widths=[32, 48], lambdas=[1e-2, 3e-2], bandwidth=0.05),
                        SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], theta_param="log", bandwidth=0.05),
                        SAESpec(sites=["mlp_in.0"], transcoder=True, widths=[32], lambdas=[1e-2], bandwidth=0.05),
                        SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], target_l0=[4.0], bandwidth=0.05,
                                # signum holds a target with the quadratic penalty (config: _target_held)
                                sparsity="quadratic" if kw.get("optimizer") == "signum" else "l0",
                                threshold_init="constant")],  # a quantile θ sits on a pre-activation: rounding decides
                  tokens=20 * 256, batch_size=256, lr=2e-3, checkpoint_every=10, log_every=5, backend=backend,
                  kernels="reference" if backend == "torch" else "auto", **PAPER)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def acts():
    from saescope.data import TensorSource

    g = torch.Generator().manual_seed(5)
    x = torch.randn(3000, 12, generator=g) * 4 + 1
    return TensorSource({"resid.0": x, "mlp_in.0": x[:, :10], "mlp.0": x.tanh() * 2})


def _weights(folder):
    from saescope import load_sae

    return {p.name: load_sae(p).state_dict() for p in sorted((folder / "saes").iterdir())}


def test_the_jax_backend_trains_the_suite_as_pytorch_does(acts, tmp_path):
    from saescope.train import train

    # 12 steps: a few later one pre-activation lands within rounding of its θ and the backends'
    # L0 differ by that one entry, after which λ and all else drift apart
    train(_suite("jax", tokens=12 * 256), tmp_path / "jax", source=acts, progress=False)
    train(_suite("torch", tokens=12 * 256), tmp_path / "torch", source=acts, progress=False)
    got, want = _weights(tmp_path / "jax"), _weights(tmp_path / "torch")
    assert sorted(got) == sorted(want) and len(got) == 7
    for name, state in want.items():
        for k, v in state.items():
            d = (got[name][k] - v).abs().max().item() if v.is_floating_point() else float(bool((got[name][k] != v).any()))
            assert d <= 2e-5 + 1e-4 * v.float().abs().max().item(), f"{name} {k}: {d}"
    jax_log = (tmp_path / "jax" / "metrics.jsonl").read_text().splitlines()
    assert len(jax_log) == 3 * 7 and all(json.loads(line)["lambda"] > 0 for line in jax_log[-7:])


@pytest.mark.parametrize("recipe", [{}, {"optimizer": "signum", "lr_scale": "width", "loss": "fvu"}])
def test_a_killed_jax_run_resumes_to_the_same_saes(recipe, acts, tmp_path, monkeypatch):
    assert_resumes_exactly(_suite("jax", **recipe), tmp_path, acts, monkeypatch, 15)


def test_each_backends_sae_files_load_in_the_other(acts, tmp_path):
    from saescope import load_sae
    from saescope.train import train

    [path, *_] = train(_suite("torch", tokens=12 * 256), tmp_path / "torch", source=acts, progress=False)
    sae = load_sae(path)
    x = acts.acts["resid.0"][:128] / float(sae.norm_scalar)
    params, static = sj.from_torch(sae)
    value, _ = sj.loss(params, jnp.asarray(x.numpy()), jnp.asarray(x.numpy()), 0.01, **static)
    np.testing.assert_allclose(float(value), float(sae.training_loss(x, x, 0.01, path="reference")["loss"].detach()), rtol=1e-6)
    with pytest.raises(SaescopeError, match="the JAX backend trains JumpReLU SAEs and transcoders; topk"):
        from saescope.config import SAESpec

        train(_suite("jax", saes=[SAESpec(sites=["resid.0"], arch="topk", widths=[16], ks=[2])]), tmp_path / "x",
              source=acts, progress=False)
    with pytest.raises(SaescopeError, match="without a skip connection"):
        train(_suite("jax", saes=[SAESpec(sites=["mlp_in.0"], transcoder=True, skip=True, widths=[16])]), tmp_path / "y",
              source=acts, progress=False)


SHARDED = """
import sys, torch
from saescope.config import ParallelConfig, SAESpec, TrainConfig
from saescope.data import TensorSource
from saescope.train import train
g = torch.Generator().manual_seed(5)
x = torch.randn(3000, 12, generator=g) * 4 + 1
cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[32, 64], lambdas=[1e-2], bandwidth=0.05),
                        SAESpec(sites=["mlp_in.0"], transcoder=True, widths=[32], lambdas=[1e-2], bandwidth=0.05)],
                  tokens=12 * 256, batch_size=256, lr=2e-3, checkpoint_every=0, backend="jax",
                  parallel=ParallelConfig(mode=sys.argv[2]))
train(cfg, sys.argv[1], source=TensorSource({"resid.0": x, "mlp_in.0": x[:, :10], "mlp.0": x.tanh() * 2}), progress=False)
import jax; print(len(jax.devices()))
"""


def test_data_and_latent_sharded_runs_on_four_host_devices_equal_one_device(tmp_path):
    import os
    import subprocess
    import sys

    runs = {"one": (1, "data"), "data": (4, "data"), "sae": (4, "sae")}
    for name, (devices, mode) in runs.items():
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        done = subprocess.run([sys.executable, "-c", SHARDED, str(tmp_path / name), mode], env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0 and done.stdout.split()[-1] == str(devices), done.stderr[-2000:]
    one = _weights(tmp_path / "one")
    for name in ("data", "sae"):
        got = _weights(tmp_path / name)
        for sae, state in one.items():
            for k, v in state.items():
                torch.testing.assert_close(got[sae][k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {sae} {k}")


def test_importing_the_backend_leaves_the_step_function_in_place():
    """The backend module is not named `step`: once a JAX run has imported it, saescope.jax.step
    must still be the SAE step function (a submodule of that name would replace the attribute)."""
    import inspect

    from saescope.jax.backend import JaxStep

    assert JaxStep and callable(sj.step) and not inspect.ismodule(sj.step)
