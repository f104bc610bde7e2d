"""Training cross-layer transcoders and weakly causal crosscoders (sae/multilayer.py through the
trainer): planted cross-layer features recovered, every kernel path equal to the reference, a
killed run resumed exactly, causality kept through training and the files, and bad entries refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from saescope import MultiLayerConfig, MultiLayerDictionary, SaescopeError, load_dictionary, save_dictionary
from saescope.config import SAESpec, TrainConfig, validated
from saescope.data import TensorSource
from saescope.train import train

from conftest import assert_resumes_exactly

N_LAYERS, D, M = 3, 24, 16


def planted_layers(n: int = 40_000, seed: int = 0):
    """Layer i's MLP input is a sparse code S_i over m unit directions E_i (about 2 on a token);
    output j is Σ_{i ≤ j} S_i·D_ij: each planted feature of layer i writes a known direction to
    its own and every later layer, as a CLT latent does."""
    g = torch.Generator().manual_seed(seed)
    S = [(torch.rand(n, M, generator=g) < 2 / M) * (torch.rand(n, M, generator=g) * 2 + 1) for _ in range(N_LAYERS)]
    E = [F.normalize(torch.randn(M, D, generator=g), dim=1) for _ in range(N_LAYERS)]
    Dec = [[F.normalize(torch.randn(M, D, generator=g), dim=1) for _ in range(N_LAYERS)] for _ in range(N_LAYERS)]
    acts = {f"mlp_in.{i}": S[i] @ E[i] for i in range(N_LAYERS)}
    acts.update({f"mlp.{j}": sum(S[i] @ Dec[i][j] for i in range(j + 1)) for j in range(N_LAYERS)})
    return acts, Dec


CLT_SITES = [f"mlp_in.{i}" for i in range(N_LAYERS)]


def test_a_clt_recovers_planted_cross_layer_features(tmp_path):
    acts, Dec = planted_layers()
    cfg = TrainConfig(saes=[SAESpec(sites=CLT_SITES, clt=True, widths=[32], target_l0=[2])], tokens=300_000,
                      batch_size=512, checkpoint_every=0, log_every=50)
    [path] = train(cfg, tmp_path, source=TensorSource({k: v[:32_000] for k, v in acts.items()}), progress=False)
    clt = load_dictionary(path)
    assert isinstance(clt, MultiLayerDictionary) and clt.cfg.arch == "jumprelu" and clt.cfg.kind == "clt"
    assert path.name == "mlp_in.0-2-jumprelu-clt-32-l0_2-btk"
    for i in range(N_LAYERS):
        learned = clt.fold().W_dec[i].detach()  # [32, n − i, d]
        planted = torch.stack([Dec[i][j] for j in range(i, N_LAYERS)], 1)  # [m, n − i, d]
        cos = F.normalize(planted.flatten(1), dim=1) @ F.normalize(learned.flatten(1), dim=1).T
        best = cos.max(1)
        assert float(best.values.min()) > 0.95, (i, best.values)
        for j in range(N_LAYERS - i):  # each planted feature's write to each layer, by the latent that found it
            block = F.cosine_similarity(planted[:, j], learned[best.indices, j], dim=1)
            assert float(block.min()) > 0.95, (i, j, block)
    with torch.no_grad():
        out = clt({k: v[32_000:] for k, v in acts.items()})
    for j in range(N_LAYERS):
        y = acts[f"mlp.{j}"][32_000:]
        assert float((out[f"mlp.{j}"] - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()) < 0.5


def _random_dictionary(kind: str, arch: str, seed: int = 0) -> MultiLayerDictionary:
    sites_in = CLT_SITES if kind == "clt" else ["resid.0", "resid.2", "resid.3"]
    sites_out = [s.replace("mlp_in", "mlp") for s in sites_in]
    d = MultiLayerDictionary(MultiLayerConfig(kind=kind, sites_in=sites_in, sites_out=sites_out, d_in=12, d_out=10,
                                              d_sae=40, arch=arch, k=4 if arch != "jumprelu" else None))
    d.init_weights(torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        d.b_dec.copy_(torch.randn(d.b_dec.shape, generator=g) * 0.1)
        for group in d.groups:
            group.b_enc.copy_(torch.randn(40, generator=g) * 0.1)
            if arch == "jumprelu":
                group.set_threshold(torch.rand(40, generator=g) * 0.5)
    return d


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk"])
def test_every_kernel_path_gives_the_reference_loss_and_gradient(arch):
    """The groups' fast paths (dense, sparse: only fired latents' rows decoded) against the plain
    reference, with every output's variance, dead latents (AuxK) and a norm cap in play."""
    from saescope.sae.objectives import Objective

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(256, 12, generator=g) for _ in range(N_LAYERS)]
    ys = [torch.randn(256, 10, generator=g) * (j + 1) for j in range(N_LAYERS)]
    var = [(y - y.mean(0)).pow(2).sum(1).mean() for y in ys]
    dead = torch.rand(N_LAYERS * 40, generator=g) < 0.3
    results = {}
    for path in ("reference", "dense", "sparse"):
        d = _random_dictionary("clt", arch)
        d.set_objective(Objective(dead_aux=0.1 if arch == "jumprelu" else 0.0, norm_cap=1.5))
        out = d.training_loss(xs, ys, 0.01, dead=dead, path=path, variances=var)
        out["loss"].backward()
        results[path] = out, {k: p.grad.clone() for k, p in d.named_parameters() if p.grad is not None}
    ref, ref_grads = results["reference"]
    for path in ("dense", "sparse"):
        out, grads = results[path]
        torch.testing.assert_close(out["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out["l0"], ref["l0"])
        assert torch.equal(out["fired"], ref["fired"])
        assert grads.keys() == ref_grads.keys() and "b_dec" in grads
        for k, v in ref_grads.items():
            torch.testing.assert_close(grads[k], v, rtol=1e-4, atol=1e-5, msg=f"{path} {k}")


def _source():
    acts, _ = planted_layers(n=3000, seed=2)
    g = torch.Generator().manual_seed(3)
    acts.update({f"resid.{i}": torch.randn(3000, 8, generator=g) * (i + 1) + i for i in (0, 2, 3)})
    return TensorSource(acts)


MULTI = [SAESpec(sites=CLT_SITES, clt=True, widths=[24], target_l0=[3]),
         SAESpec(sites=CLT_SITES[1:], clt=True, widths=[16], target_l0=[3], train_as="jumprelu", frequency_penalty=1.0,
                 frequency_threshold=0.3),
         SAESpec(sites=["resid.0", "resid.2", "resid.3"], crosscoder=True, arch="topk", widths=[16], ks=[3]),
         SAESpec(sites=["resid.0", "resid.3"], crosscoder=True, arch="batchtopk", widths=[16], ks=[2])]


def test_a_killed_multi_layer_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    cfg = TrainConfig(saes=MULTI, tokens=40 * 256, batch_size=256, checkpoint_every=10, log_every=5, dead_tokens=512)
    saes = assert_resumes_exactly(cfg, tmp_path, _source(), monkeypatch, 25)
    names = sorted(p.name for p in saes.iterdir())
    assert names == ["mlp_in.0-2-jumprelu-clt-24-l0_3-btk", "mlp_in.1_2-jumprelu-clt-16-l0_3-freq",
                     "resid.0_2_3-topk-xc-16-k3", "resid.0_3-batchtopk-xc-16-k2"], names
    converted = load_dictionary(saes / names[0])
    assert converted.cfg.arch == "jumprelu" and converted.cfg.extra["converted_from"]["arch"] == "batchtopk"
    fitted = load_dictionary(saes / names[3])
    assert all(float(g.shared_threshold) > 0 for g in fitted.groups)


def test_a_trained_crosscoder_never_writes_an_earlier_layer_in_any_file(tmp_path):
    cfg = TrainConfig(saes=[SAESpec(sites=["resid.0", "resid.2", "resid.3"], crosscoder=True, widths=[16], target_l0=[3])],
                      tokens=20 * 256, batch_size=256, checkpoint_every=0)
    [path] = train(cfg, tmp_path / "run", source=_source(), progress=False)
    trained = load_dictionary(path)
    gs2 = load_dictionary(save_dictionary(trained, tmp_path / "gs2", format="gemmascope2"))
    g = torch.Generator().manual_seed(9)
    acts = {s: torch.randn(32, 8, generator=g) * 3 for s in trained.cfg.sites_in}
    for d in (trained, gs2):
        with torch.no_grad():
            out = d(acts)
            torch.testing.assert_close(out["resid.3"], trained(acts)["resid.3"], rtol=1e-5, atol=1e-5)
            for k, site in enumerate(d.cfg.sites_in):  # moving layer k's input changes no output before it
                again = d(dict(acts, **{site: acts[site] * 5 + 1}))
                assert all(torch.equal(again[s], out[s]) for s in d.cfg.sites_out[:k]), site


@pytest.mark.parametrize("entry, message", [
    (dict(sites=CLT_SITES, clt=True, transcoder=True), "transcoder is for single-layer dictionaries, not a clt"),
    (dict(sites=["resid.0", "resid.1"], clt=True), "a clt reads mlp_in.L sites"),
    (dict(sites=["resid.3", "resid.1"], crosscoder=True), "distinct layers in increasing order"),
    (dict(sites=CLT_SITES, clt=True, crosscoder=True), "a clt or a crosscoder, not both"),
    (dict(sites=CLT_SITES, clt=True, arch="relu"), "arch 'relu' is for single-layer dictionaries"),
    (dict(sites=CLT_SITES, clt=True, matryoshka=[8]), "matryoshka is for single-layer dictionaries"),
])
def test_bad_multi_layer_entries_are_refused_in_one_line(entry, message):
    with pytest.raises(SaescopeError, match=message) as err:
        validated(TrainConfig, saes=[entry])
    assert "\n" not in str(err.value)


def test_a_crosscoder_reads_gemma_scope_2s_layers_unless_told():
    assert SAESpec(crosscoder=True).sites == ["resid.5", "resid.9", "resid.12", "resid.15"]
    assert SAESpec(crosscoder=True, sites=["resid.2", "resid.4"]).sites == ["resid.2", "resid.4"]
    assert SAESpec().sites == ["resid.6"]


def test_the_jax_backend_refuses_multi_layer_entries():
    pytest.importorskip("jax")
    from saescope.jax.backend import JaxStep

    with pytest.raises(SaescopeError, match="use backend 'torch' for clt or crosscoder"):
        JaxStep(TrainConfig(saes=[SAESpec(sites=CLT_SITES, clt=True, widths=[16], target_l0=[3], train_as="jumprelu")],
                            backend="jax"))


def test_circuit_tracer_folders_round_trip_exactly(tmp_path):
    """A CLT and a skip-transcoder set in circuit-tracer's layout and back: the same outputs and codes;
    W_enc [F, d] and W_skip [d_out, d_in] as circuit-tracer holds them (it applies x·W_skipᵀ)."""
    from safetensors.torch import load_file

    from saescope import JumpReLUSAE, SAEConfig, load_circuit_tracer, save_circuit_tracer

    d = _random_dictionary("clt", "jumprelu")
    with torch.no_grad():
        d.scale_in.copy_(torch.tensor([2.0, 0.5, 3.0]))
        d.scale_out.copy_(torch.tensor([1.5, 4.0, 0.25]))
    back = load_dictionary(save_circuit_tracer(d, tmp_path / "clt", scan="test"))
    acts = {s: torch.randn(9, 12) * 2 for s in d.cfg.sites_in}
    with torch.no_grad():
        for s, y in d(acts).items():
            torch.testing.assert_close(back(acts)[s], y, rtol=1e-5, atol=1e-5)
    assert load_file(tmp_path / "clt" / "W_dec_1.safetensors")["W_dec_1"].shape == (40, 2, 10)
    assert load_file(tmp_path / "clt" / "W_enc_0.safetensors")["W_enc_0"].shape == (40, 12)
    g = torch.Generator().manual_seed(4)
    saes = []
    for layer in (1, 0):
        sae = JumpReLUSAE(SAEConfig(d_in=12, d_sae=20, d_out=10, site=f"mlp_in.{layer}", target_site=f"mlp.{layer}", skip=True))
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            sae.set_threshold(torch.rand(20, generator=g) * 0.2)
        saes.append(sae)
    folder = save_circuit_tracer(saes, tmp_path / "set", scan="test")
    layer1 = load_file(folder / "layer_1.safetensors")
    torch.testing.assert_close(layer1["W_skip"], saes[0].W_skip.T)  # sorted by layer: layer_1 is mlp_in.1's
    x = torch.randn(7, 12)
    assert torch.allclose(x @ layer1["W_skip"].T, saes[0].skip_output(x))
    again = load_circuit_tracer(folder)
    assert [s.cfg.site for s in again] == ["mlp_in.0", "mlp_in.1"]
    with torch.no_grad():
        for ours, theirs in zip(saes[::-1], again):
            torch.testing.assert_close(theirs(x), ours(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(SaescopeError, match="read it with saescope.load_circuit_tracer"):
        load_dictionary(folder)


def test_export_writes_every_layout_and_refuses_what_it_cannot_hold(tmp_path, capsys):
    from saescope.cli import main

    cfg = TrainConfig(saes=[SAESpec(sites=CLT_SITES, clt=True, widths=[16], target_l0=[3]),
                            SAESpec(sites=CLT_SITES, transcoder=True, skip=True, widths=[16], target_l0=[3]),
                            SAESpec(sites=["resid.0", "resid.2"], crosscoder=True, arch="topk", widths=[16], ks=[2])],
                      tokens=10 * 256, batch_size=256, checkpoint_every=0)
    train(cfg, tmp_path / "run", source=_source(), progress=False)
    assert main(["-q", "export", str(tmp_path / "run"), "--format", "circuit-tracer", "--out", str(tmp_path / "ct")]) == 0
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["mlp_in.0-2-jumprelu-clt-16-l0_3-btk",
                                                                     "mlp_in.0-2-jumprelu-tc-16-l0_3-skip-btk"]
    trained = load_dictionary(tmp_path / "run" / "saes" / "mlp_in.0-2-jumprelu-clt-16-l0_3-btk")
    exported = load_dictionary(tmp_path / "ct" / "mlp_in.0-2-jumprelu-clt-16-l0_3-btk")
    acts = {s: torch.randn(5, D) for s in CLT_SITES}
    with torch.no_grad():
        for s, y in trained(acts).items():
            torch.testing.assert_close(exported(acts)[s], y, rtol=1e-5, atol=1e-5)
    # Gemma Scope 2 has no TopK latents: the crosscoder stops the export before anything is written
    assert main(["-q", "export", str(tmp_path / "run"), "--format", "gemmascope2", "--out", str(tmp_path / "gs2")]) == 2
    assert "resid.0_2-topk-xc-16-k2: a topk crosscoder has no gemmascope2 layout" in capsys.readouterr().err
    assert not (tmp_path / "gs2").exists()
    shutil.rmtree(tmp_path / "run" / "saes" / "resid.0_2-topk-xc-16-k2")
    assert main(["-q", "export", str(tmp_path / "run"), "--format", "gemmascope2", "--out", str(tmp_path / "gs2")]) == 0
    clt = load_dictionary(next((tmp_path / "gs2" / "clt").iterdir()))
    assert clt.cfg.kind == "clt" and (tmp_path / "gs2" / "clt" / "width_16_l0_3").is_dir()
    assert len(list((tmp_path / "gs2" / "transcoder").iterdir())) == 3


def test_a_clt_starts_from_single_layer_transcoders_and_decays_their_l0(tmp_path):
    """init_from: at the start each output is its layer's transcoder's reconstruction (no
    cross-layer writes yet, unit decoder rows; a CLT as wide as the transcoders has no random
    latents left); k then falls from the transcoders' L0 to the target."""
    from saescope import load_sae
    from saescope.train import trainer_for

    acts, _ = planted_layers(n=12_000)
    source = TensorSource(acts)
    single = TrainConfig(saes=[SAESpec(sites=CLT_SITES, transcoder=True, widths=[24], target_l0=[6])], tokens=20 * 512,
                         batch_size=512, checkpoint_every=0)
    paths = train(single, tmp_path / "single", source=source, progress=False)
    entry = dict(sites=CLT_SITES, clt=True, widths=[24], target_l0=[2], init_from=[str(p) for p in paths])
    cfg = TrainConfig(saes=[entry], tokens=20 * 512, batch_size=512, checkpoint_every=0, log_every=1)
    # the starting point, on a JumpReLU trained as itself: thresholds carried over exactly
    itself = TrainConfig(saes=[{**entry, "train_as": "jumprelu"}], tokens=20 * 512, batch_size=512, checkpoint_every=0)
    trainer = trainer_for(itself, tmp_path / "itself", source=source)
    batches = iter(trainer.batches())
    trainer.build(next(batches))
    [m] = trainer.members
    clt, saes = m.sae, [load_sae(p) for p in paths]
    x = {s: v[:64] for s, v in acts.items()}
    with torch.no_grad():
        out = clt(x)
        for j, sae in enumerate(saes):
            torch.testing.assert_close(out[f"mlp.{j}"], sae(x[f"mlp_in.{j}"]), rtol=1e-4, atol=1e-4)
        for i, g in enumerate(clt.groups):
            rows = g.W_dec.view(24, 3 - i, -1)
            assert torch.allclose(rows.flatten(1).norm(dim=1), torch.ones(24))
            assert not rows[:, 1:].any()  # the cross-layer writes start at zero
    assert [round(v) for v in m.l0_from] == [6, 6, 6]
    # trained as BatchTopK (the default), k itself decays: the logged L0 is k at each step
    [path] = train(cfg, tmp_path / "clt", source=source, progress=False)
    assert path.name.endswith("-init-btk")
    log = [json.loads(line) for line in (tmp_path / "clt" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["l0"] == pytest.approx(6, abs=0.5) and log[-1]["l0"] == pytest.approx(2, abs=0.1)
    with pytest.raises(SaescopeError, match="maps mlp_in.0 → mlp.0 .* the dictionary given for it maps mlp_in.2 → mlp.2"):
        MultiLayerDictionary(MultiLayerConfig(kind="clt", sites_in=CLT_SITES, sites_out=[f"mlp.{i}" for i in range(3)],
                                              d_in=D, d_out=D, d_sae=8)).init_from(saes[::-1])


def test_a_crosscoder_skips_a_later_latent_that_reads_an_earlier_ones_direction():
    from saescope import JumpReLUSAE, SAEConfig

    g = torch.Generator().manual_seed(0)
    saes = []
    for site in ("resid.0", "resid.2"):
        sae = JumpReLUSAE(SAEConfig(d_in=8, d_sae=4, site=site))
        sae.init_weights(g)
        saes.append(sae)
    with torch.no_grad():
        saes[1].W_enc[:, 1] = saes[0].W_dec[3] * 2  # layer 2's latent 1 reads what layer 0's latent 3 wrote
    d = MultiLayerDictionary(MultiLayerConfig(kind="crosscoder", sites_in=["resid.0", "resid.2"],
                                              sites_out=["resid.0", "resid.2"], d_in=8, d_out=8, d_sae=4))
    assert d.init_from(saes) == [4, 3]
    with torch.no_grad():
        kept = torch.nn.functional.normalize(d.groups[1].W_enc[:, :3].T, dim=1)
        want = torch.nn.functional.normalize(saes[1].W_enc[:, [0, 2, 3]].T, dim=1)
    torch.testing.assert_close(kept, want)


def test_the_decoder_norm_step_reaches_only_the_rows_a_step_touched():
    """Rows given over every group ([n·m], as a step's "touched") reach each group as its own."""
    d = _random_dictionary("clt", "jumprelu")
    with torch.no_grad():
        for g in d.groups:
            g.W_dec.mul_(3)
    before = [g.W_dec.detach().clone() for g in d.groups]
    d.apply_constraints(torch.tensor([1, 40 + 2, 80 + 39]))
    for i, (g, old) in enumerate(zip(d.groups, before)):
        own = [1, 2, 39][i]
        norms = g.W_dec.detach().norm(dim=1)
        assert norms[own] == pytest.approx(1.0)
        rest = torch.arange(40) != own
        assert torch.equal(g.W_dec.detach()[rest], old[rest])
