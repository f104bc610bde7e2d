"""Multi-layer dictionaries (sae/multilayer.py): the forward against a hand computation, structural
causality, folding, and Gemma Scope 2's multi-layer files and the native folder round trips, with
the files that would break causality refused."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from saescope import (MultiLayerConfig, MultiLayerDictionary, SaescopeError, load_dictionary, load_sae, save_dictionary,
                      save_sae)

SITES = {"clt": (["mlp_in.0", "mlp_in.1", "mlp_in.2"], ["mlp.0", "mlp.1", "mlp.2"]),
         "crosscoder": (["resid.1", "resid.3", "resid.4"], ["resid.1", "resid.3", "resid.4"])}


def _random(kind: str, seed: int = 0) -> MultiLayerDictionary:
    sites_in, sites_out = SITES[kind]
    d = MultiLayerDictionary(MultiLayerConfig(kind=kind, sites_in=sites_in, sites_out=sites_out, d_in=6, d_out=5,
                                              d_sae=10, model="tiny"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for group in d.groups:
            group.set_threshold(torch.rand(group.cfg.d_sae, generator=g) * 0.3)
        d.scale_in.copy_(torch.tensor([2.0, 3.0, 0.5]))
        d.scale_out.copy_(torch.tensor([1.5, 4.0, 0.25]))
    return d


def _acts(d: MultiLayerDictionary, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randn(7, d.cfg.d_in, generator=g) * 2 for s in d.cfg.sites_in}


@pytest.mark.parametrize("kind", ["clt", "crosscoder"])
def test_the_forward_by_hand_and_causality(kind):
    d = _random(kind)
    acts = _acts(d)
    out = d(acts)
    f = []
    for i, s in enumerate(d.cfg.sites_in):
        pre = acts[s] / d.scale_in[i] @ d.W_enc[i] + d.b_enc[i]
        f.append(torch.where(pre > d.theta[i], pre, torch.zeros_like(pre)))
    for j, s in enumerate(d.cfg.sites_out):
        want = d.scale_out[j] * (d.b_dec[j] + sum(f[i] @ d.W_dec[i][:, j - i] for i in range(j + 1)))
        torch.testing.assert_close(out[s], want)
    assert [tuple(b.shape) for b in d.W_dec] == [(10, 3, 5), (10, 2, 5), (10, 1, 5)]  # no block before its own layer
    for k, site in enumerate(d.cfg.sites_in):  # moving a later layer's input changes no earlier output
        moved = dict(acts, **{site: acts[site] + 10})
        again = d(moved)
        for j, s in enumerate(d.cfg.sites_out[:k]):
            assert torch.equal(again[s], out[s]), (site, s)


@pytest.mark.parametrize("kind", ["clt", "crosscoder"])
def test_folding_and_round_trips(kind, tmp_path):
    d = _random(kind)
    acts = _acts(d)
    folded = d.fold()
    assert folded.folded and not d.folded
    for a, b in zip(d.encode(acts).values(), folded.encode(acts).values()):
        torch.testing.assert_close(a, b)
    for a, b in zip(d(acts).values(), folded(acts).values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    native = load_dictionary(save_dictionary(d, tmp_path / "native", format="native"))
    assert native.cfg == d.cfg
    for k, v in d.state_dict().items():
        assert torch.equal(native.state_dict()[k], v), k
    gs2 = load_dictionary(save_dictionary(d, tmp_path / "gs2"))
    assert (gs2.cfg.kind, gs2.cfg.sites_in, gs2.cfg.sites_out) == (kind, d.cfg.sites_in, d.cfg.sites_out)
    for s, y in d(acts).items():
        torch.testing.assert_close(gs2(acts)[s], y, rtol=1e-5, atol=1e-5)
    layer1 = load_file(tmp_path / "gs2" / "params_layer_1.safetensors")
    assert {k: tuple(v.shape) for k, v in layer1.items()} == {"w_enc": (6, 10), "b_enc": (10,), "threshold": (10,),
                                                               "w_dec": (10, 3, 5), "b_dec": (5,)}
    assert not layer1["w_dec"][:, 0].any()  # a block for every layer, as Google's files: zero before its own
    config = json.loads((tmp_path / "gs2" / "config.json").read_text())
    assert config["type"] == kind and config["architecture"] == "jump_relu" and config["width"] == 10
    with pytest.raises(SaescopeError, match="read it with saescope.load_dictionary"):
        load_sae(tmp_path / "gs2")


def test_a_file_that_writes_an_earlier_layer_is_refused(tmp_path):
    """w_dec holds a block for every layer ([F, n, d]) or, compact, for its own and later ones
    ([F, n − i, d]); both load, but a non-zero block before its own layer would break causality
    and is refused."""
    d = _random("crosscoder")
    folder = save_dictionary(d, tmp_path / "gs2")
    config = json.loads((folder / "config.json").read_text())
    del config["saescope"]  # as another tool's files: no checksums, sites from the hook points
    (folder / "config.json").write_text(json.dumps(config))
    layer = load_file(folder / "params_layer_2.safetensors")
    full = layer["w_dec"]
    save_file({**layer, "w_dec": full[:, 2:].contiguous()}, folder / "params_layer_2.safetensors")
    again = load_dictionary(folder)
    assert again.cfg.sites_in == d.cfg.sites_in
    torch.testing.assert_close(again.W_dec[2], d.fold().W_dec[2])
    full[:, 1] = 0.01
    save_file({**layer, "w_dec": full}, folder / "params_layer_2.safetensors")
    with pytest.raises(SaescopeError, match="write layers before their own") as err:
        load_dictionary(folder)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("values, message", [
    (dict(kind="sparse", sites_in=["resid.1"], sites_out=["resid.1"]), "unknown multi-layer dictionary kind"),
    (dict(kind="clt", sites_in=["resid.0"], sites_out=["mlp.0"]), "reads mlp_in.L and writes mlp.L"),
    (dict(kind="clt", sites_in=["mlp_in.0", "mlp_in.1"], sites_out=["mlp.0", "mlp.2"]), "the same layer"),
    (dict(kind="crosscoder", sites_in=["resid.3", "resid.1"], sites_out=["resid.3", "resid.1"]), "increasing order"),
    (dict(kind="crosscoder", sites_in=["resid.1", "resid.3"], sites_out=["resid.1"]), "one output site per input site"),
])
def test_bad_configs_are_one_line_errors(values, message):
    with pytest.raises(SaescopeError, match=message) as err:
        MultiLayerConfig(d_in=4, d_out=4, d_sae=8, **values)
    assert "\n" not in str(err.value)


def test_encode_names_missing_sites_and_load_dictionary_reads_single_layer_files(tmp_path):
    d = _random("clt")
    with pytest.raises(SaescopeError, match="missing mlp_in.2"):
        d.encode({"mlp_in.0": torch.zeros(1, 6), "mlp_in.1": torch.zeros(1, 6)})
    from saescope import SAEConfig, build_sae

    sae = build_sae(SAEConfig(d_in=4, d_sae=8, site="resid.0"))
    assert load_dictionary(save_sae(sae, tmp_path / "one", format="gemmascope2")).cfg.site == "resid.0"
