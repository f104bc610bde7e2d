"""The trainer: a planted dictionary recovered, target-L0 mode, exact resume, NaN stops, many SAEs at once."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import PAPER, assert_resumes_exactly, planted
from saescope import SaescopeError, load_sae
from saescope.config import SAESpec, TrainConfig
from saescope.data import TensorSource
from saescope.train import coeff_at, lr_at, train, trainer_for


@pytest.fixture(scope="module")
def planted_data():
    return planted()


def _recovered(sae, D) -> float:
    W = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    return float(((D @ W.T).max(1).values > 0.9).float().mean())


def test_schedules():
    assert lr_at(0, 1.0, 100) == pytest.approx(0.1) and lr_at(50, 1.0, 100) == pytest.approx(0.55)
    assert lr_at(100, 1.0, 100) == 1.0 and lr_at(10**6, 1.0, 100) == 1.0
    assert coeff_at(0, 2.0, 10) == 0.0 and coeff_at(5, 2.0, 10) == 1.0 and coeff_at(10, 2.0, 10) == 2.0


def test_planted_dictionary_is_recovered(planted_data, tmp_path):
    x, D, codes = planted_data
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[128], lambdas=[2e-2])], tokens=3000 * 1024,
                      batch_size=1024, lr=3e-3, checkpoint_every=0, log_every=100, **PAPER)
    [path] = train(cfg, tmp_path, source=TensorSource({"resid.0": x}), progress=False)
    sae = load_sae(path)
    planted_l0 = float((codes > 0).sum(1).float().mean())
    l0 = float((sae.encode(x[:10_000]) > 0).sum(1).float().mean())
    assert _recovered(sae, D) >= 0.9
    assert abs(l0 - planted_l0) <= 0.25 * planted_l0
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(128))  # unit rows all the way
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 30 and {"loss", "mse", "l0", "fvu", "dead_fraction", "lambda", "lr", "tokens_per_s"} <= set(lines[-1])
    assert lines[-1]["fvu"] < lines[0]["fvu"] and lines[-1]["lambda"] == pytest.approx(2e-2)
    assert sae.cfg.extra["final_metrics"]["l0"] == lines[-1]["l0"]


def test_target_l0_mode_lands_on_the_target(planted_data, tmp_path):
    x, _, _ = planted_data
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[128], lambdas=[2e-2], target_l0=[6.0], sparsity="l0",
                                    threshold_init="constant")],  # the λ controller's own test, under Adam
                      tokens=3000 * 1024, batch_size=1024, lr=3e-3, checkpoint_every=0, log_every=100, **PAPER)
    [path] = train(cfg, tmp_path, source=TensorSource({"resid.0": x}), progress=False)
    l0 = float((load_sae(path).encode(x[:10_000]) > 0).sum(1).float().mean())
    assert abs(l0 - 6.0) <= 0.15 * 6.0


def _suite_cfg(**kw):
    values = dict(saes=[SAESpec(sites=["resid.0", "resid.1"], widths=[16, 24], lambdas=[1e-2, 3e-2]),
                        SAESpec(sites=["resid.0"], arch="topk", widths=[16], ks=[3]),
                        SAESpec(sites=["resid.0"], arch="batchtopk", widths=[16], ks=[3]),
                        SAESpec(sites=["resid.0"], arch="relu", widths=[16], lambdas=[1e-2]),
                        SAESpec(sites=["mlp_in.0"], transcoder=True, widths=[16], lambdas=[1e-2]),
                        SAESpec(sites=["mlp_in.0"], transcoder=True, skip=True, widths=[16], lambdas=[1e-2]),
                        SAESpec(sites=["mlp_in.0"], transcoder=True, skip=True, widths=[16], target_l0=[3.0]),
                        SAESpec(sites=["resid.1"], widths=[16], lambdas=[1e-2], target_l0=[3.0])],
                  tokens=40 * 256, batch_size=256, lr=1e-3, checkpoint_every=10, log_every=5, dead_tokens=512)
    values.update(kw)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def suite_source():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3000, 8, generator=g) * 5 + 2
    return TensorSource({"resid.0": x, "resid.1": x.roll(1, 1) * 2, "mlp_in.0": x[:, :6], "mlp.0": x.tanh() * 3})


def test_killed_run_resumes_to_the_same_weights(suite_source, tmp_path, monkeypatch):
    saes = assert_resumes_exactly(_suite_cfg(), tmp_path, suite_source, monkeypatch, 25)
    names = sorted(p.name for p in saes.iterdir())
    # 2 sites × 2 widths × 2 λ + topk + batchtopk + relu + 3 transcoders (2 with a skip) + target L0
    assert len(names) == 15 and sum("-skip" in n for n in names) == 2, names


def test_a_checkpoint_holds_each_sae_s_own_tensors_when_encoders_are_grouped(suite_source, tmp_path, monkeypatch):
    """Grouped (as on accelerators), an SAE's encoder is a slice of its group's: its checkpoint file
    must hold that slice, not the group's whole storage; and it resumes the same as apart."""
    from saescope.train.step_torch import EncoderGroup

    sizes = {}
    for grouped in (False, True):
        monkeypatch.setattr(EncoderGroup, "APART_ON", set() if grouped else {"cpu"})
        cfg = _suite_cfg(saes=[SAESpec(sites=["resid.0"], widths=[16, 512], lambdas=[1e-2])], tokens=10 * 256)
        train(cfg, tmp_path / str(grouped), source=suite_source, progress=False)
        [step] = (tmp_path / str(grouped) / "checkpoint").glob("step-*")
        sizes[grouped] = {p.name: p.stat().st_size for p in step.glob("*.pt")}
    small = next(n for n in sizes[True] if "-16-" in n)
    assert sizes[True][small] < 1.1 * sizes[False][small], sizes  # 512 latents' encoder would be 32 times more
    assert sizes[True] == pytest.approx(sizes[False], rel=0.1)


def test_each_sae_of_a_suite_equals_training_it_alone(suite_source, tmp_path):
    train(_suite_cfg(checkpoint_every=0), tmp_path / "suite", source=suite_source, progress=False)
    alone = _suite_cfg(saes=[SAESpec(sites=["resid.1"], widths=[24], lambdas=[3e-2])], checkpoint_every=0)
    [path] = train(alone, tmp_path / "alone", source=suite_source, progress=False)
    suite = load_sae(tmp_path / "suite" / "saes" / path.name).state_dict()
    for k, v in load_sae(path).state_dict().items():
        torch.testing.assert_close(v, suite[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_skip_transcoder_learns_the_linear_part_a_plain_one_spends_latents_on(tmp_path):
    """x = planted features + dense noise, y = x·A + a sparse code of the features: the noise's
    part of x·A is no sparse code, so only a skip can carry it. The skip transcoder's W_skip
    converges towards A (d_in × d_out, applied on the right) and its FVU beats the plain
    transcoder's at the same target L0 and budget."""
    x, D, codes = planted(n=40_000, d=24, m=48, l0=3.0)
    g = torch.Generator().manual_seed(3)
    A = torch.randn(24, 16, generator=g) / 24**0.5
    out_dirs = torch.nn.functional.normalize(torch.randn(48, 16, generator=g), dim=1)
    x = x + 0.5 * torch.randn(x.shape, generator=g)
    y = x @ A + codes @ out_dirs
    source = TensorSource({"mlp_in.0": x[:32_000], "mlp.0": y[:32_000]})
    fvu = {}
    for skip in (False, True):
        spec = SAESpec(sites=["mlp_in.0"], transcoder=True, skip=skip, widths=[96], target_l0=[3.0])
        cfg = TrainConfig(saes=[spec], tokens=150 * 512, batch_size=512, checkpoint_every=0, log_every=50)
        [path] = train(cfg, tmp_path / str(skip), source=source, progress=False)
        tc = load_sae(path)
        assert tc.cfg.skip == skip and tc.cfg.target_site == "mlp.0"
        with torch.no_grad():
            held_x, held_y = x[32_000:], y[32_000:]
            err = (tc(held_x) - held_y).pow(2).sum()
            fvu[skip] = float(err / (held_y - held_y.mean(0)).pow(2).sum())
            if skip:
                skip_err = float((tc.W_skip - A).norm() / A.norm())
    assert fvu[True] < 0.7 * fvu[False], fvu
    assert skip_err < 0.5, skip_err


def test_a_skip_starts_at_the_least_squares_map(tmp_path):
    """Before any step, W_skip and b_dec are the first batch's least-squares fit of the target: for
    a target that is exactly affine in the input, that map itself (up to the ridge)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4096, 12, generator=g) * 3 + 1
    A, b = torch.randn(12, 9, generator=g), torch.randn(9, generator=g)
    cfg = TrainConfig(saes=[SAESpec(sites=["mlp_in.0"], transcoder=True, skip=True, widths=[32])], tokens=4 * 1024,
                      batch_size=1024)
    trainer = trainer_for(cfg, tmp_path, source=TensorSource({"mlp_in.0": x, "mlp.0": x @ A + b}))
    trainer.build(next(iter(trainer.batches())))
    [m] = trainer.members
    torch.testing.assert_close(m.sae.W_skip, A, rtol=3e-3, atol=1e-3)  # the map is scale-free: x/C → y/C
    torch.testing.assert_close(m.sae.b_dec * m.sae.norm_scalar, b, rtol=0, atol=2e-2)


def test_nan_in_a_batch_stops_with_the_checkpoint_kept(tmp_path):
    x = torch.randn(4000, 8)
    x[3000:] = float("nan")
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[16])], tokens=30 * 128, batch_size=128, lr=1e-3,
                      checkpoint_every=5, buffer_rows=128)
    src = TensorSource({"resid.0": x})
    src.norm_scalar = lambda site: 1.0
    with pytest.raises(SaescopeError, match=r"NaN or Inf in the activations of resid\.0 at step 2\d; stopped; the checkpoint of step 2\d is kept"):
        train(cfg, tmp_path, source=src, progress=False)
    record = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert record["step"] in (20, 25) and [f.name for f in (tmp_path / "checkpoint").glob("step-*")] == [record["folder"]]
    state = torch.load(tmp_path / "checkpoint" / record["folder"] / "resid.0-jumprelu-16-lam0.0006.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["sae"].values() if v.is_floating_point())


def test_diverging_loss_stops(tmp_path):
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0"], widths=[16])], tokens=10 * 128, batch_size=128, lr=1e30,
                      checkpoint_every=0)
    with pytest.raises(SaescopeError, match=r"resid\.0-jumprelu-16-lam0\.0006: the loss is (nan|inf)"):
        train(cfg, tmp_path, source=TensorSource({"resid.0": torch.randn(2000, 8) * 1e3}), progress=False)


def test_bad_suites(suite_source, tmp_path):
    with pytest.raises(SaescopeError, match="a transcoder reads mlp_in.L or ln2.L, not resid.0"):
        trainer_for(TrainConfig(saes=[SAESpec(sites=["resid.0"], transcoder=True)]), tmp_path, suite_source)
    with pytest.raises(SaescopeError, match=r"the activation source has no attn\.3"):
        trainer_for(TrainConfig(saes=[SAESpec(sites=["attn.3"])]), tmp_path, suite_source)
    with pytest.raises(SaescopeError, match="target_l0 is for jumprelu SAEs"):
        trainer_for(TrainConfig(saes=[SAESpec(arch="topk", target_l0=[5.0])]), tmp_path, suite_source)
    assert math.isfinite(suite_source.norm_scalar("resid.0"))


def test_training_straight_from_a_model(tiny_lm, doc_folder, tmp_path):
    from saescope import CorpusConfig, HarvestConfig, HarvestStream

    harvest_cfg = HarvestConfig(sites=["mlp_in.1", "mlp.1"], tokens=640, batch_size=4,
                                corpus=CorpusConfig(source=str(doc_folder), seq_len=32))
    cfg = TrainConfig(harvest=harvest_cfg, saes=[SAESpec(sites=["mlp_in.1"], transcoder=True, widths=[16])],
                      tokens=4 * 128, batch_size=128, lr=1e-3, buffer_rows=256)
    [path] = train(cfg, tmp_path, source=HarvestStream(harvest_cfg, lm=tiny_lm), progress=False)
    sae = load_sae(path)
    assert sae.cfg.transcoder and sae.cfg.model == "tiny-gemma3"
    assert float(sae.norm_scalar) == pytest.approx(math.sqrt(32))  # transcoders: √d_model (SPEC §2)
