"""The optimizer and learning-rate rules (TrainConfig.optimizer, lr_scale, loss) against hand-written
references: signum's schedule-free sign steps written out with explicit x, y and z sequences, the
FVU loss's gradient as the MSE objective's over the batch variance, the width rule's lr, and the
averaged weights' unit decoder rows leaving every code unchanged."""

from __future__ import annotations

import json
import math
from itertools import islice

import pytest
import torch

from conftest import assert_resumes_exactly
from saescope import SAEConfig, load_sae
from saescope.config import SAESpec, TrainConfig
from saescope.data import TensorSource
from saescope.sae import build_sae
from saescope.train import train, trainer_for


@pytest.fixture(scope="module")
def source():
    g = torch.Generator().manual_seed(7)
    return TensorSource({"resid.0": torch.randn(4000, 12, generator=g) * 3 + 1})


def _trainer(cfg, tmp_path, source):
    trainer = trainer_for(cfg, tmp_path, source=source)
    batches = list(trainer.batches())[:trainer.steps]
    trainer.build(batches[0])
    return trainer, batches


def _signum_steps(first: torch.Tensor) -> dict[str, float]:
    """b_enc steps lr × the RMS of a centred coordinate, θ ten times that, b_dec lr × 0.005 × the
    median coordinate's RMS, a skip transcoder's W_skip lr / d_in."""
    per_coordinate = (first - first.mean(0)).pow(2).mean(0)
    pre, coordinate = float(per_coordinate.mean().sqrt()), float(per_coordinate.median().sqrt())
    return {"b_enc": pre, "b_dec": 0.005 * coordinate, "theta": 10 * pre, "W_skip": 1 / first.shape[1]}


def test_signum_steps_b_dec_by_the_median_coordinate(tmp_path):
    """A massive coordinate (Gemma's residual stream has a few) sets the mean-square scale that
    b_enc and θ step by, but not the median one b_dec steps by."""
    x = torch.randn(4000, 12, generator=torch.Generator().manual_seed(7)) * 3 + 1
    x[:, 0] *= 30
    spec = SAESpec(sites=["resid.0"], arch="jumprelu", widths=[32], lambdas=[1e-2])
    cfg = TrainConfig(saes=[spec], tokens=2 * 256, batch_size=256, optimizer="signum", checkpoint_every=0)
    trainer, batches = _trainer(cfg, tmp_path, TensorSource({"resid.0": x}))
    [m] = trainer.members
    steps = _signum_steps(batches[0]["resid.0"] / m.scale)
    assert m.signum_steps == pytest.approx(steps, rel=1e-5)
    assert steps["b_dec"] / 0.005 < 0.2 * steps["b_enc"]  # the median coordinate's scale, not the mean-square one


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_signum_is_sign_descent_under_a_schedule_free_average(arch, source, tmp_path):
    """Schedule-free (Defazio et al. 2024) over sign descent, by hand: the gradient is taken at
    y = β·x + (1 − β)·z; z steps by −lr·sign(g) (b_enc by −lr·s·sign(g) with s the RMS of a centred
    coordinate, θ ten times that, b_dec by −lr·0.005·the median coordinate's RMS·sign(g)); x is the
    lr²-weighted running mean of z; the decoder's gradient loses its part along each row first
    and y's rows are made unit after."""
    beta, lr = 0.9, 2e-2
    spec = SAESpec(sites=["resid.0"], arch=arch, widths=[32], lambdas=[1e-2], ks=[3], bandwidth=0.05)
    cfg = TrainConfig(saes=[spec], tokens=6 * 256, batch_size=256, lr=lr, lr_warmup_steps=3, lambda_warmup_steps=0,
                      optimizer="signum", momentum=beta, lr_scale="none", loss="mse", kernels="reference",
                      checkpoint_every=0)
    trainer, batches = _trainer(cfg, tmp_path, source)
    [m] = trainer.members
    steps = _signum_steps(batches[0]["resid.0"] / m.scale)
    assert m.signum_steps == pytest.approx(steps, rel=1e-5)
    ref = build_sae(m.sae.cfg)
    ref.load_state_dict(m.sae.state_dict())
    ref.objective = m.sae.objective
    params = dict(ref.named_parameters())
    z = {k: p.detach().clone() for k, p in params.items()}
    x = {k: p.detach().clone() for k, p in params.items()}
    weight_sum, lr_max = 0.0, 0.0
    for i, batch in enumerate(batches):
        step_lr = trainer_lr(trainer, i)
        xb = batch["resid.0"] / m.scale
        ref.zero_grad()
        ref.training_loss(xb, xb, m.coeff, path="reference")["loss"].backward()
        ref.remove_parallel_grad()
        with torch.no_grad():
            for k, p in params.items():
                z[k] -= step_lr * steps.get(k, 1.0) * p.grad.sign()
            lr_max = max(lr_max, step_lr)
            weight_sum += lr_max ** 2
            c = lr_max ** 2 / weight_sum
            for k, p in params.items():
                x[k] = (1 - c) * x[k] + c * z[k]
                p.copy_(beta * x[k] + (1 - beta) * z[k])
            ref.apply_constraints()
            for k, p in params.items():  # x as the wrapper recovers it from the constrained y
                x[k] = (p - (1 - beta) * z[k]) / beta
        trainer.train_step(batch)
        trainer.step += 1
    for k, p in params.items():
        torch.testing.assert_close(dict(m.sae.named_parameters())[k].detach(), p.detach(), rtol=1e-5, atol=1e-6, msg=k)


def trainer_lr(trainer, step: int) -> float:
    from saescope.train import lr_at

    return lr_at(step, trainer.cfg.lr, trainer.lr_warmup)


def test_the_fvu_loss_is_the_objective_over_the_batch_variance(source, tmp_path):
    spec = SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], bandwidth=0.05)
    grads = {}
    for loss in ("mse", "fvu"):
        cfg = TrainConfig(saes=[spec], tokens=2 * 256, batch_size=256, loss=loss, kernels="reference", checkpoint_every=0)
        trainer, batches = _trainer(cfg, tmp_path / loss, source)
        [m] = trainer.members
        xb = batches[0]["resid.0"] / m.scale
        trainer.backend._backward(m, xb, xb, None, trainer.backend._variance(xb) if loss == "fvu" else None)
        grads[loss] = {k: p.grad.clone() for k, p in m.sae.named_parameters()}
    var = (xb - xb.mean(0)).pow(2).sum(-1).mean()
    for k, g in grads["mse"].items():
        torch.testing.assert_close(grads["fvu"][k], g / var, msg=k)


def test_the_width_rule_scales_each_saes_lr(source, tmp_path):
    spec = SAESpec(sites=["resid.0"], arch="topk", widths=[16, 64], ks=[3])
    cfg = TrainConfig(saes=[spec], tokens=4 * 256, batch_size=256, lr=1e-3, lr_warmup_steps=0, lr_scale="width",
                      checkpoint_every=0, log_every=4)
    train(cfg, tmp_path, source=source, progress=False)
    lrs = {r["sae"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert lrs == pytest.approx({"resid.0-topk-16-k3": 1e-3 * math.sqrt(2**14 / 16),
                                 "resid.0-topk-64-k3": 1e-3 * math.sqrt(2**14 / 64)})


@pytest.mark.parametrize("arch", ["jumprelu", "relu", "topk"])
def test_unit_decoder_rows_keep_every_reconstruction(arch):
    sae = build_sae(SAEConfig(arch=arch, d_in=10, d_sae=40, k=4))
    g = torch.Generator().manual_seed(0)
    sae.init_weights(g)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1, generator=g) + 0.3)
        sae.b_enc.normal_(0, 0.1, generator=g)
        if arch == "jumprelu":
            sae.set_threshold(torch.rand(40, generator=g) * 0.3)
        x = torch.randn(64, 10, generator=g)
        before = sae(x)
        sae.unit_decoder_rows()
        torch.testing.assert_close(sae(x), before, rtol=1e-5, atol=1e-6)
    norms = sae.W_dec.norm(dim=1)
    if arch == "topk":  # TopK compares latents: scaling one would change which fire, so rows keep their norms
        assert not torch.allclose(norms, torch.ones(40))
    else:
        torch.testing.assert_close(norms, torch.ones(40))


def test_a_signum_run_resumes_and_saves_the_average(source, tmp_path, monkeypatch):
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[32], lambdas=[1e-2], target_l0=[4.0], sparsity="quadratic",
                                    threshold_init="quantile"),
                            SAESpec(sites=["resid.0"], arch="topk", widths=[32], ks=[3])],
                      tokens=30 * 256, batch_size=256, lr=3e-3, optimizer="signum", lr_scale="width", loss="fvu",
                      checkpoint_every=10, log_every=5)
    for folder in assert_resumes_exactly(cfg, tmp_path, source, monkeypatch, 15).iterdir():
        whole = load_sae(folder)
        if whole.cfg.arch == "jumprelu":
            torch.testing.assert_close(whole.W_dec.norm(dim=1), torch.ones(32))


def test_batchtopk_saves_the_cut_of_the_weights_it_saves(source, tmp_path):
    """BatchTopK's shared inference threshold is fitted to the last batch under the saved weights
    (signum's average, which no training step evaluated): with it, encoding that batch keeps exactly
    the k·B largest activations, as BatchTopK written plainly on the saved weights does."""
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], arch="batchtopk", widths=[32], ks=[3])], tokens=30 * 256,
                      batch_size=256, lr=3e-3, optimizer="signum", lr_scale="width", loss="fvu", checkpoint_every=0)
    [folder] = train(cfg, tmp_path / "run", source=source, progress=False)
    sae = load_sae(folder)
    last = list(trainer_for(cfg, tmp_path / "replay", source=source).batches())[29]["resid.0"]
    with torch.no_grad():
        pre = sae.pre_acts(last / sae.norm_scalar).relu()
        cut = pre.reshape(-1).topk(3 * 256).values[-1]
        fires = sae.encode(last) > 0
    assert torch.equal(fires, (pre >= cut) & (pre > 0))
    held = torch.randn(2048, 12, generator=torch.Generator().manual_seed(99)) * 3 + 1  # the source's distribution
    with torch.no_grad():
        assert float((sae.encode(held) > 0).sum(1).float().mean()) == pytest.approx(3, rel=0.15)


def test_a_target_l0_trains_as_batchtopk_and_saves_jumprelu(tmp_path):
    """A JumpReLU entry with only a target L0 trains as BatchTopK at k = the target and is saved as
    JumpReLU (Gemma Scope 2's route): on the training batches its thresholds were fitted on, each
    latent fires exactly as often as BatchTopK, written plainly on the same weights, kept it, and
    held-out rows are encoded near the target (no row is read twice: equal rows would tie at the
    threshold). A JumpReLU option keeps JumpReLU training."""
    source = TensorSource({"resid.0": torch.randn(8000, 12, generator=torch.Generator().manual_seed(7)) * 3 + 1})
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[32], target_l0=[3])], tokens=30 * 256, batch_size=256,
                      checkpoint_every=0)
    [folder] = train(cfg, tmp_path / "run", source=source, progress=False)
    assert folder.name == "resid.0-jumprelu-32-l0_3-btk"
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["l0"] == 3 for r in lines)  # BatchTopK's training L0 is k on every batch
    sae = load_sae(folder)
    assert sae.cfg.arch == "jumprelu" and sae.cfg.extra["converted_from"]["k"] == 3
    batches = [b["resid.0"] for b in islice(trainer_for(cfg, tmp_path / "replay", source=source).batches(), 30)]
    with torch.no_grad():
        kept = torch.zeros(32, dtype=torch.long)
        for b in batches:
            pre = sae.pre_acts(b / sae.norm_scalar).relu()
            cut = pre.reshape(-1).topk(3 * len(b)).values[-1]
            kept += ((pre >= cut) & (pre > 0)).sum(0)
        fires = sae.encode(torch.cat(batches)) > 0
        assert torch.equal(fires.sum(0), kept)
        held = torch.randn(2048, 12, generator=torch.Generator().manual_seed(99)) * 3 + 1  # the source's distribution
        assert float((sae.encode(held) > 0).sum(1).float().mean()) == pytest.approx(3, rel=0.15)
    assert SAESpec(target_l0=[3], dead_aux=0.1).train_as == "jumprelu"
