"""Every fast path of the training step equals the reference (SPEC §2 written plainly): outputs
and gradients, on random inputs, for each architecture, with the automatic switch included. On the
device `pytest --device` names (default cpu): the weights and data are drawn on the CPU and moved,
so every device checks the same numbers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import PAPER
from saescope import SAEConfig, build_sae
from saescope.config import SAESpec, TrainConfig
from saescope.data import TensorSource
from saescope.sae import fast
from saescope.sae.fast import Code, Workspace
from saescope.train import trainer_for
from saescope.train.step_torch import EncoderGroup, TorchStep

D_IN, D_SAE, BATCH = 12, 48, 64
CASES = [("jumprelu", {}), ("jumprelu", {"theta_param": "log"}), ("relu", {}), ("topk", {"k": 5}),
         ("batchtopk", {"k": 5})]


def _sae(arch, transcoder=False, seed=0, device="cpu", **kw):
    """transcoder: False, True, or "skip" (a skip transcoder)."""
    d_out = 8 if transcoder else None
    sae = build_sae(SAEConfig(arch=arch, d_in=D_IN, d_sae=D_SAE, d_out=d_out, site="mlp_in.0" if transcoder else None,
                              target_site="mlp.0" if transcoder else None, skip=transcoder == "skip", **kw))
    gen = torch.Generator().manual_seed(seed)
    sae.init_weights(gen)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(sae.cfg.width_out, generator=gen) * 0.1)
        if sae.cfg.skip:
            sae.W_skip.copy_(torch.randn(D_IN, 8, generator=gen) * 0.1)
    sae.pre_encoder_bias.fill_(not transcoder)
    return sae.to(device)


def _data(sae, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, D_IN, generator=gen)
    target = torch.randn(BATCH, sae.cfg.width_out, generator=gen) * 0.5
    return x.to(sae.W_enc.device), target.to(sae.W_enc.device)


def _plant_thresholds(sae, x):
    """Thresholds from the data, with a third of the latents' θ within ε/2 of some token's
    pre-activation (on both sides), so the rectangle kernel is non-zero there."""
    with torch.no_grad():
        pre = sae.pre_acts(x)
        theta = pre.quantile(0.8, dim=0).clamp_min(0.01)
        eps = sae.cfg.bandwidth
        for i in range(0, D_SAE, 3):
            b = i % BATCH
            theta[i] = pre[b, i] + (0.3 if i % 2 else -0.3) * eps
        theta.clamp_(min=1e-3)
        sae.set_threshold(theta)


def _step(arch, kw, path, transcoder=False, dead=None, workspace=None, device="cpu"):
    sae = _sae(arch, transcoder, device=device, **kw)
    x, target = _data(sae)
    if arch == "jumprelu":
        _plant_thresholds(sae, x)
    out = sae.training_loss(x, target, 0.3, dead=dead, path=path, workspace=workspace)
    out["loss"].backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in sae.named_parameters()}
    return out, grads


@pytest.mark.parametrize("transcoder", [False, True, "skip"])
@pytest.mark.parametrize("arch,kw", CASES)
@pytest.mark.parametrize("path", ["dense", "sparse", "auto"])
def test_fast_paths_equal_the_reference(arch, kw, path, transcoder, device):
    dead = (torch.arange(D_SAE) % 4 == 0).to(device)
    ref, ref_grads = _step(arch, kw, "reference", transcoder, dead, device=device)
    out, grads = _step(arch, kw, path, transcoder, dead, device=device)
    for key in ("loss", "mse", "l0") + (("aux",) if "aux" in ref else ()):
        torch.testing.assert_close(out[key].detach(), ref[key].detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out["fired"], ref["fired"])
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    if arch == "jumprelu":  # the planted entries make the pseudo-derivative of θ non-trivial
        theta_grad = ref_grads["theta" if kw.get("theta_param", "theta") == "theta" else "log_threshold"]
        assert (theta_grad != 0).sum() >= D_SAE // 6
    if arch in ("topk", "batchtopk"):
        assert float(ref["aux"]) > 0


def _paths_taken(monkeypatch):
    taken = []
    for name in ("SparseEncode", "DenseEncode"):
        cls = getattr(fast, name)
        original = cls.apply

        def spy(*args, _original=original, _name=name):
            taken.append(_name)
            return _original(*args)

        monkeypatch.setattr(cls, "apply", spy)
    return taken


def test_the_automatic_switch_follows_the_density(monkeypatch, device):
    taken = _paths_taken(monkeypatch)
    sae = _sae("jumprelu", device=device)
    x, target = _data(sae)
    limit = fast.max_density(device)
    with torch.no_grad():
        pre = sae.pre_acts(x)
    for density, expected in ((limit / 3, "SparseEncode"), (0.5, "DenseEncode")):
        sae.set_threshold(pre.quantile(1 - density, dim=0).clamp_min(1e-3))
        taken.clear()
        out = sae.training_loss(x, target, 0.1)
        assert taken == [expected], density
        ref = sae.training_loss(x, target, 0.1, path="reference")
        torch.testing.assert_close(out["loss"], ref["loss"])
    topk = _sae("topk", k=1, device=device)   # k/m = 1/48, under the limit
    taken.clear()
    topk.training_loss(x, target, 0.0)
    assert taken == ["SparseEncode"]
    wide_k = _sae("topk", k=24, device=device)
    taken.clear()
    wide_k.training_loss(x, target, 0.0)
    assert taken == ["DenseEncode"]
    with pytest.raises(ValueError, match="path must be one of"):
        sae.training_loss(x, target, 0.1, path="fastest")


def test_a_workspace_changes_nothing(device):
    """Buffers reused over steps and SAEs: the same losses and gradients as fresh memory."""
    ws = Workspace()
    for arch, kw in CASES:
        for path in ("dense", "sparse"):
            a, ga = _step(arch, kw, path, device=device)
            b, gb = _step(arch, kw, path, workspace=ws, device=device)
            c, gc = _step(arch, kw, path, workspace=ws, device=device)  # the buffer now holds the last step's values
            for g in (gb, gc):
                for name in ga:
                    torch.testing.assert_close(g[name], ga[name], rtol=0, atol=0)
            assert a["loss"].item() == b["loss"].item() == c["loss"].item()


def test_code_sums_against_numpy(device):
    """The embedding-bag sums of a code against dense NumPy products."""
    rng = np.random.default_rng(0)
    mask = rng.random((20, 30)) < 0.15
    mask[3] = False                                   # a token with no entry
    pre = rng.normal(size=(20, 30)).astype(np.float32)

    def on(array):
        return torch.from_numpy(array).to(device)

    code = Code.from_mask(on(pre), on(mask))
    dense = np.where(mask, pre, 0.0)
    W = rng.normal(size=(30, 7)).astype(np.float32)
    table = rng.normal(size=(20, 7)).astype(np.float32)
    np.testing.assert_allclose(code.decode(code.pre, on(W)).cpu().numpy(), dense @ W, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(code.per_latent_sum(code.pre, on(table)).cpu().numpy(), dense.T @ table,
                               rtol=1e-5, atol=1e-5)
    assert code.fired(code.pre).tolist() == mask.any(0).tolist()
    flat = Code.from_flat(on(pre), on(np.flatnonzero(mask)[::-1].copy()))
    assert torch.equal(flat.rows, code.rows) and torch.equal(flat.cols, code.cols) and torch.equal(flat.offsets, code.offsets)


def _lockstep(saes, kernels, tmp_path, device, batch_size=128, steps=30, plant_dead=True):
    """Train the same suite by the reference and by `kernels`, each step starting from the
    reference's state, and check every state and metric after every step."""
    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(4096, D_IN, generator=gen) * 3 + 1
    trainers = {}
    for path in ("reference", kernels):
        cfg = TrainConfig(saes=saes, tokens=steps * batch_size, batch_size=batch_size, lr=1e-3, dead_tokens=256,
                          kernels=path, device=str(device), **PAPER)
        trainers[path] = trainer_for(cfg, tmp_path / path, source=TensorSource({"resid.0": acts}))
    ref, fast_ = trainers["reference"], trainers[kernels]
    batches = list(ref.batches())[:steps]
    torch.manual_seed(0)
    ref.build(batches[0])
    fast_.build(batches[0])
    for m in ref.members if plant_dead else ():  # latents that rarely fire, so AuxK has dead ones
        if m.sae.cfg.arch in ("topk", "batchtopk"):
            with torch.no_grad():
                m.sae.b_enc[:8] = -0.5
    aux_seen = False
    for batch in batches:
        for a, b in zip(ref.members, fast_.members):
            b.sae.load_state_dict(a.sae.state_dict())
            adam = copy.deepcopy(ref.backend.optimizers[a.name].state_dict())  # else they share tensors
            fast_.backend.optimizers[b.name].load_state_dict(adam)
            b.since_fired.copy_(a.since_fired)
        aux_seen |= any(bool((m.since_fired >= ref.dead_tokens).any()) for m in ref.members)
        for t in (ref, fast_):
            t.train_step(batch)
            t.step += 1
        for a, b in zip(ref.members, fast_.members):
            assert torch.equal(a.since_fired, b.since_fired), a.name
            for name, value in a.sae.state_dict().items():
                torch.testing.assert_close(b.sae.state_dict()[name], value, rtol=1e-4, atol=1e-6,
                                           msg=lambda m, n=f"{a.name} {name}": f"{n}: {m}")
            for key in ("loss", "mse", "l0"):
                torch.testing.assert_close(torch.as_tensor(b.sums[key]), torch.as_tensor(a.sums[key]), rtol=1e-4, atol=1e-6)
    return aux_seen


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("kernels", ["auto", "dense", "sparse"])
def test_trainer_steps_with_fast_paths_equal_the_reference(kernels, grouped, tmp_path, monkeypatch, device):
    """The real trainer's step (a λ ladder, TopK with AuxK, BatchTopK, ReLU; Adam, decoder
    constraint, dead-latent counters) from the same state, step after step. Each step starts from
    the reference's state: over many steps, float rounding alone moves a pre-activation across
    the edge of θ's ε-window now and then, and Adam turns that into a visible change of θ."""
    saes = [SAESpec(sites=["resid.0"], widths=[D_SAE], lambdas=[1e-3, 1e-2]),
            SAESpec(sites=["resid.0"], arch="topk", widths=[D_SAE], ks=[4]),
            SAESpec(sites=["resid.0"], arch="batchtopk", widths=[D_SAE], ks=[4]),
            SAESpec(sites=["resid.0"], arch="relu", widths=[D_SAE], lambdas=[1e-2])]
    # grouped, the five SAEs share one encoder product (accelerators' default); apart, as on CPUs
    monkeypatch.setattr(EncoderGroup, "APART_ON", set() if grouped else {device.type})
    assert _lockstep(saes, kernels, tmp_path, device)  # some steps had dead latents, so AuxK ran


@pytest.mark.parametrize("kernels", ["auto", "dense", "sparse"])
def test_fast_paths_equal_the_reference_with_each_objective(kernels, tmp_path, device):
    """Each option of the objective (sae/objectives.py) on, one SAE each, by the same lockstep."""
    common = dict(sites=["resid.0"], widths=[D_SAE], lambdas=[1e-2])
    saes = [SAESpec(**common, target_l0=[6.0], sparsity="quadratic", threshold_init="quantile"),
            SAESpec(**common, target_l0=[6.0], sparsity="quadratic", quadratic_form="token"),
            SAESpec(**common, sparsity="tanh"),
            SAESpec(**common, frequency_penalty=0.5, frequency_threshold=0.05),
            SAESpec(**common, matryoshka=[8, 24]),
            SAESpec(**common, dead_aux=1 / 32),
            SAESpec(**common, input_ste=True),
            SAESpec(**common, norm_cap=1.5),
            SAESpec(sites=["resid.0"], arch="topk", widths=[D_SAE], ks=[4], matryoshka=[8, 24]),
            SAESpec(sites=["resid.0"], arch="topk", widths=[D_SAE], ks=[4], norm_cap=1.5),
            SAESpec(sites=["resid.0"], arch="batchtopk", widths=[D_SAE], ks=[4], matryoshka=[16]),
            SAESpec(sites=["resid.0"], arch="topk", widths=[D_SAE], ks=[4], frequency_penalty=0.5, frequency_threshold=0.05),
            SAESpec(sites=["resid.0"], arch="batchtopk", widths=[D_SAE], ks=[4], frequency_penalty=0.5,
                    frequency_threshold=0.05)]
    _lockstep(saes, kernels, tmp_path, device)


def test_the_decoder_norm_step_on_fired_rows_only(tmp_path, monkeypatch, device):
    """A wide TopK SAE reaches few decoder rows a step: the norm step on those rows alone equals
    the full one, with AuxK's rows included once latents die."""
    restricted = []
    original = TorchStep._decoder_rows

    def spy(self, out):
        rows = original(self, out)
        restricted.append(rows is not None and self.cfg.kernels != "reference")
        return rows

    monkeypatch.setattr(TorchStep, "_decoder_rows", spy)
    saes = [SAESpec(sites=["resid.0"], arch="topk", widths=[1024], ks=[2])]
    assert _lockstep(saes, "auto", tmp_path, device, batch_size=32, steps=20, plant_dead=False)
    assert sum(restricted) >= 10



@pytest.mark.parametrize("arch,kw", [("jumprelu", {}), ("topk", {"k": 5})])
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_bfloat16_products_stay_close_to_float32(arch, kw, path, device):
    """Under bfloat16 autocast the products run in bfloat16 (the hand-written backward too) and
    everything else in float32: loss and gradients within bfloat16's rounding of the reference."""
    ref, ref_grads = _step(arch, kw, "reference", device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        assert fast.compute_dtype(device) == torch.bfloat16
        out, grads = _step(arch, kw, path, device=device)
    assert out["loss"].dtype == torch.float32
    torch.testing.assert_close(out["loss"].detach(), ref["loss"].detach(), rtol=2e-2, atol=1e-3)
    for name in ("W_enc", "W_dec", "b_dec"):
        g, r = grads[name], ref_grads[name]
        assert g.dtype == torch.float32
        assert float((g - r).norm() / r.norm()) < 3e-2, name


def test_sae_groups_share_one_encoder_product(tmp_path, monkeypatch, device):
    """SAEs reading the same input get their encoders as slices of one matrix and their
    pre-activations from one product (as on accelerators; the CPU steps them apart)."""
    gen = torch.Generator().manual_seed(0)
    source = TensorSource({"resid.0": torch.randn(512, D_IN, generator=gen), "resid.1": torch.randn(512, D_IN, generator=gen)})
    saes = [SAESpec(sites=["resid.0"], widths=[D_SAE, 2 * D_SAE], lambdas=[1e-3]),
            SAESpec(sites=["resid.0"], arch="topk", widths=[D_SAE], ks=[4]),
            SAESpec(sites=["resid.1"], widths=[D_SAE], lambdas=[1e-3])]      # alone on its input
    cfg = TrainConfig(saes=saes, tokens=1024, batch_size=128, device=str(device), **PAPER)
    trainer = trainer_for(cfg, tmp_path, source=source)
    batch = next(iter(trainer.batches()))
    trainer.build(batch)
    assert (trainer.backend.groups == []) == (device.type == "cpu")  # the CPU steps SAEs apart
    monkeypatch.setattr(EncoderGroup, "APART_ON", set())
    trainer = trainer_for(cfg, tmp_path, source=source)
    trainer.build(batch)
    [group] = trainer.backend.groups
    assert [m.sae.cfg.d_sae for m in group.members] == [D_SAE, 2 * D_SAE, D_SAE]
    for m in group.members:
        assert m.sae.W_enc.untyped_storage().data_ptr() == group.weight.untyped_storage().data_ptr()
        alias = trainer.backend.optimizers[m.name].param_groups[0]["params"][0]  # Adam steps W_enc through its contiguous transpose
        assert alias.is_contiguous() and alias.data_ptr() == m.sae.W_enc.data_ptr() and alias.shape == (m.sae.cfg.d_sae, D_IN)
    x = batch["resid.0"].to(device) / group.scale
    for m in group.members:  # each SAE's shared-product pre-activations against its own
        with torch.no_grad():
            m.sae.b_dec.copy_(torch.randn(D_IN, generator=gen))
    views = group.pre_activations(x, Workspace())
    for m in group.members:
        torch.testing.assert_close(views[m.name], m.sae.pre_acts(x), rtol=1e-5, atol=1e-5)
    trainer.train_step(batch)  # and the grouped step runs
