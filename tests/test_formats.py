"""Save/load round trips in every format (Gemma Scope 1 and 2, SAELens, native), release paths, and refused files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import gemma_scope_2_tree, tiny_model
from saescope import LanguageModel, SAEConfig, SaescopeError, build_sae, check_sae, load_sae, save_sae
from saescope.sae.formats import gemmascope_dir, width_label


def _trained_like(arch="jumprelu", **kw):
    cfg = SAEConfig(**{"arch": arch, "d_in": 32, "d_sae": 64, "site": "resid.1", "model": "tiny", **kw})
    sae = build_sae(cfg)
    gen = torch.Generator().manual_seed(0)
    sae.init_weights(gen)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(64, generator=gen) * 0.1)
        sae.b_dec.copy_(torch.randn(cfg.width_out, generator=gen))
        if arch == "jumprelu":
            sae.set_threshold(torch.rand(64, generator=gen) * 0.2)
    sae.norm_scalar.fill_(12.5)
    sae.pre_encoder_bias.fill_(not cfg.transcoder)
    return sae


@pytest.mark.parametrize("fmt", ["gemmascope", "saelens", "native"])
@pytest.mark.parametrize("arch, kw", [("jumprelu", {}), ("jumprelu", {"theta_param": "log"}), ("topk", {"k": 4}),
                                      ("relu", {}), ("jumprelu", {"target_site": "mlp.1", "site": None})])
def test_round_trip(tmp_path, fmt, arch, kw):
    if kw.get("site", "x") is None:
        kw = {**kw}
        kw.pop("site")
    sae = _trained_like(arch, **kw)
    if arch == "topk" and fmt == "gemmascope":
        with pytest.raises(SaescopeError, match="Gemma Scope format holds JumpReLU"):
            save_sae(sae, tmp_path / "s", format=fmt)
        return
    save_sae(sae, tmp_path / "s", format=fmt)
    back = load_sae(tmp_path / "s")
    x = torch.randn(16, 32) * 12.5
    if fmt == "native":
        for k, v in sae.state_dict().items():
            assert torch.equal(back.state_dict()[k], v), k
        assert back.cfg == sae.cfg
    else:  # released form: folded, float32; the same function of raw activations
        assert back.folded
        folded = sae.fold()
        for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
            assert torch.equal(getattr(back, k), getattr(folded, k)), k
        torch.testing.assert_close(back.threshold, folded.threshold)
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-4)
    assert back.cfg.arch == sae.cfg.arch or (fmt == "gemmascope" and back.cfg.arch == "jumprelu")


def test_gemmascope_npz_layout(tmp_path):
    sae = _trained_like()
    save_sae(sae, tmp_path, format="gemmascope")
    with np.load(tmp_path / "params.npz", allow_pickle=False) as npz:
        assert sorted(npz.files) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
        assert all(npz[k].dtype == np.float32 for k in npz.files)
        assert npz["W_enc"].shape == (32, 64) and npz["W_dec"].shape == (64, 32)


def test_release_tree_and_canonical(tmp_path):
    root = tmp_path / "gemma-scope-2b-pt-res"
    for l0 in (22, 71, 141, 300):
        save_sae(_trained_like(), gemmascope_dir(root, 20, 16384, l0 + 0.4), format="gemmascope")
    assert (root / "layer_20" / "width_16k" / "average_l0_71" / "params.npz").is_file()
    sae = load_sae(root / "layer_20" / "width_16k" / "average_l0_71")
    assert sae.cfg.site == "resid.20" and sae.cfg.model == "gemma-2-2b"
    canon = load_sae(root / "layer_20" / "width_16k" / "canonical")   # |141 − 100| < |71 − 100|
    assert torch.equal(canon.W_enc, load_sae(root / "layer_20/width_16k/average_l0_141/params.npz").W_enc)
    with pytest.raises(SaescopeError, match=r"no average_l0_\* folders under .*width_64k.*layer_20 has width_16k$"):
        load_sae(root / "layer_20" / "width_64k" / "canonical")  # a width the release does not have
    tc = tmp_path / "gemma-scope-2b-pt-transcoders" / "layer_3" / "width_16k" / "average_l0_9"
    save_sae(_trained_like(), tc, format="gemmascope")
    # Gemma Scope 1's transcoders read ln2.hook_normalized: the norm's input before its scale
    assert (load_sae(tc).cfg.site, load_sae(tc).cfg.target_site) == ("ln2.3", "mlp.3")
    assert [width_label(w) for w in (4096, 16384, 65536, 131072, 2**20)] == ["4k", "16k", "65k", "131k", "1m"]


def test_saelens_hook_names(tmp_path):
    save_sae(_trained_like(), tmp_path, format="saelens")
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.1.hook_resid_post" and cfg["hook_layer"] == 1
    assert cfg["architecture"] == "jumprelu" and cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none" and cfg["d_sae"] == 64
    del cfg["saescope"]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert load_sae(tmp_path).cfg.site == "resid.1"


def test_an_sae_without_a_site_is_not_saved_for_saelens(tmp_path):
    """SAELens cannot load a config whose hook_name is null: the save refuses, says how, writes nothing."""
    with pytest.raises(SaescopeError, match=r"does not say which site.*set sae.cfg.site"):
        save_sae(_trained_like(site=None), tmp_path / "nosite", format="saelens")
    assert not (tmp_path / "nosite").exists() or not any((tmp_path / "nosite").iterdir())


def test_object_arrays_are_refused(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, W_enc=np.array([{"evil": 1}], dtype=object))
    (tmp_path / "params.npz").write_bytes(buf.getvalue())
    with pytest.raises(SaescopeError, match="need unpickling; refused"):
        load_sae(tmp_path)


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:200]), "not a readable npz file"),
    (lambda p: p.write_bytes(b"not a zip"), "not a readable npz file"),
])
def test_damaged_npz(tmp_path, damage, message):
    save_sae(_trained_like(), tmp_path, format="gemmascope")
    damage(tmp_path / "params.npz")
    with pytest.raises(SaescopeError, match=message):
        load_sae(tmp_path)


def test_bad_shapes_and_missing(tmp_path):
    np.savez(tmp_path / "params.npz", W_enc=np.zeros((4, 8), np.float32), W_dec=np.zeros((8, 4), np.float32),
             b_enc=np.zeros(8, np.float32), b_dec=np.zeros(5, np.float32), threshold=np.zeros(8, np.float32))
    with pytest.raises(SaescopeError, match=r"b_dec has shape \(5,\), expected \(4,\)"):
        load_sae(tmp_path)
    with pytest.raises(SaescopeError, match="holds no SAE"):
        load_sae(tmp_path / "..")
    with pytest.raises(SaescopeError, match="SAE not found"):
        load_sae(tmp_path / "nope")


def test_sae_must_fit_the_model():
    lm = LanguageModel(tiny_model("gemma2"))
    sae = _trained_like()
    assert str(check_sae(sae, lm)) == "resid.1"
    sae.cfg.site = "attn.1"
    with pytest.raises(SaescopeError, match=r"SAE d_in 32 does not match attn\.1 of .*, which is 48 wide"):
        check_sae(sae, lm)
    sae.cfg.site = "resid.7"
    with pytest.raises(SaescopeError, match="layer 7 out of range"):
        check_sae(sae, lm)
    sae.cfg.site = None
    with pytest.raises(SaescopeError, match=r"does not say which site it reads; give it when loading"):
        check_sae(sae, lm)


def test_a_skip_transcoder_by_hand_and_in_each_format(tmp_path):
    """y = C·(f(x/C)·W_dec + b_dec) + x·A with A d_in × d_out on the right (SPEC §8), in the training
    loss too; SAELens's folder holds A transposed (its W_skip is d_out × d_in) under its skip
    transcoder class; Gemma Scope's npz, which has no skip, is refused."""
    sae = _trained_like(site="mlp_in.1", target_site="mlp.1", d_out=20, skip=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.W_skip.copy_(torch.randn(32, 20, generator=g) * 0.2)
    x = torch.randn(16, 32, generator=g) * 12.5
    C = 12.5
    pre = (x / C) @ sae.W_enc + sae.b_enc
    f = pre * (pre > sae.threshold)
    want = C * (f @ sae.W_dec + sae.b_dec) + x @ sae.W_skip
    torch.testing.assert_close(sae(x), want)
    y = torch.randn(16, 20, generator=g)
    mse = sae.training_loss(x / C, y, 0.0, path="reference")["mse"]
    torch.testing.assert_close(mse, ((f @ sae.W_dec + sae.b_dec + (x / C) @ sae.W_skip - y) ** 2).sum(1).mean())
    for fmt in ("native", "saelens"):
        back = load_sae(save_sae(sae, tmp_path / fmt, format=fmt))
        assert back.cfg.skip and back.cfg.target_site == "mlp.1"
        torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-4)
    cfg = json.loads((tmp_path / "saelens" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu_skip_transcoder" and cfg["d_out"] == 20
    assert cfg["hook_name_out"] == "blocks.1.hook_mlp_out"
    from safetensors.torch import load_file
    assert torch.equal(load_file(tmp_path / "saelens" / "sae_weights.safetensors")["W_skip"], sae.W_skip.t())
    with pytest.raises(SaescopeError, match="no skip connection") as err:
        save_sae(sae, tmp_path / "gs", format="gemmascope")
    assert "\n" not in str(err.value)
    with pytest.raises(SaescopeError, match="skip connection is for transcoders"):
        SAEConfig(d_in=4, d_sae=8, skip=True)


@pytest.mark.parametrize("kind", ["sae", "transcoder", "skip"])
def test_gemma_scope_2_folders(tmp_path, kind):
    """Gemma Scope 2's files (SPEC §8): params.safetensors with w_enc [d_in, F], w_dec [F, d_out] and
    affine_skip_connection [d_in, d_out]; config.json with the hook points as module paths; the
    folder named by kind, layer, width, L0 and _affine; read back to the same function."""
    from safetensors.torch import load_file

    from saescope.sae.formats import gemmascope2_dir

    kw = {} if kind == "sae" else {"site": "mlp_in.1", "target_site": "mlp.1", "d_out": 20, "skip": kind == "skip"}
    sae = _trained_like(**kw)
    if sae.cfg.skip:
        with torch.no_grad():
            sae.W_skip.copy_(torch.randn(32, 20, generator=torch.Generator().manual_seed(5)) * 0.2)
    sae.cfg.extra["target_l0"] = 40.0
    folder = gemmascope2_dir(tmp_path, sae.cfg, 40.0)
    want = {"sae": "resid_post/layer_1_width_64_l0_40", "transcoder": "transcoder/layer_1_width_64_l0_40",
            "skip": "transcoder/layer_1_width_64_l0_40_affine"}[kind]
    assert gemmascope2_dir(tmp_path, sae.cfg, 60.0).name.startswith("layer_1_width_64_l0_medium")
    assert folder == tmp_path / want
    save_sae(sae, folder, format="gemmascope2")
    params = load_file(folder / "params.safetensors")
    d_out = sae.cfg.width_out
    shapes = {"w_enc": (32, 64), "w_dec": (64, d_out), "b_enc": (64,), "b_dec": (d_out,), "threshold": (64,)}
    if kind == "skip":
        shapes["affine_skip_connection"] = (32, 20)
        assert torch.equal(params["affine_skip_connection"], sae.W_skip)
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "jump_relu" and config["l0"] == 40.0 and config["width"] == 64
    if kind == "sae":
        assert config["type"] == "sae" and config["hf_hook_point_in"] == "model.layers.1.output"
    else:
        assert config["type"] == "transcoder" and config["affine_connection"] == (kind == "skip")
        assert config["hf_hook_point_in"] == "model.layers.1.pre_feedforward_layernorm.output"
        assert config["hf_hook_point_out"] == "model.layers.1.post_feedforward_layernorm.output"
    back = load_sae(folder)
    assert (back.cfg.site, back.cfg.target_site, back.cfg.skip) == (sae.cfg.site, sae.cfg.target_site, sae.cfg.skip)
    x = torch.randn(16, 32) * 12.5
    torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-4)


def test_gemma_scope_2_refusals(tmp_path):
    from safetensors.torch import load_file, save_file

    with pytest.raises(SaescopeError, match="holds JumpReLU SAEs"):
        save_sae(_trained_like("topk", k=4), tmp_path / "t", format="gemmascope2")
    folder = save_sae(_trained_like(site="mlp_in.1", target_site="mlp.1"), tmp_path / "tc", format="gemmascope2")
    config = json.loads((folder / "config.json").read_text())
    params = load_file(folder / "params.safetensors")
    del config["saescope"]  # as Google's files: no checksum, so altered tensors are read
    cases = [({**config, "type": "clt"}, params, "multi-layer dictionary"),
             ({**config, "affine_connection": True}, params, "lack affine_skip_connection"),
             ({**config, "hf_hook_point_out": "model.layers.1.mlp.down_proj"}, params, "names no site"),
             (config, {**params, "w_extra": torch.zeros(3)}, "unexpected tensors w_extra")]
    for i, (cfg, tensors, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}"
        bad.mkdir()
        save_file(tensors, bad / "params.safetensors")
        (bad / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(SaescopeError, match=message) as err:
            load_sae(bad)
        assert "\n" not in str(err.value)


def test_the_release_export_puts_each_kind_where_a_format_holds_it(tmp_path):
    """`saescope run`'s release tree: JumpReLU SAEs and transcoders in Gemma Scope 2's layout; TopK,
    which that format cannot hold, as SAELens folders; a TopK transcoder, which SAELens cannot hold
    either, as native. Each loads back to the same function."""
    from saescope.evals.report import export_released

    kinds = {"jr": _trained_like(), "tk": _trained_like("topk", k=4),
             "skip": _trained_like(site="mlp_in.1", target_site="mlp.1", skip=True),
             "tktc": _trained_like("topk", k=4, site="mlp_in.1", target_site="mlp.1")}
    records = []
    for name, sae in kinds.items():
        path = save_sae(sae, tmp_path / "saes" / name)
        records.append({"sae": name, "path": str(path), "site": sae.cfg.site, "l0": 10.0})
    export_released(records, tmp_path / "release")
    where = {r["sae"]: r["released"] for r in records}
    assert where["jr"].endswith("resid_post/layer_1_width_64_l0_10")
    assert where["skip"].endswith("transcoder/layer_1_width_64_l0_10_affine")
    assert where["tk"].endswith("saelens/tk") and where["tktc"].endswith("native/tktc")
    x = torch.randn(8, 32) * 12.5
    for name, sae in kinds.items():
        back = load_sae(where[name])
        assert back.cfg.skip == sae.cfg.skip and back.cfg.target_site == sae.cfg.target_site, name
        torch.testing.assert_close(back(x), sae(x), rtol=1e-5, atol=1e-4)
    assert (Path(where["tktc"]) / "sae.safetensors").is_file()  # native


def _blob(cache: Path, repo: str, rel: str, data: bytes) -> Path:
    """A file of a Hugging Face cache: the bytes in blobs/<sha256>, the snapshot's file a relative symlink."""
    import hashlib
    import os

    sha = hashlib.sha256(data).hexdigest()
    blob = cache / f"models--google--{repo}" / "blobs" / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = cache / f"models--google--{repo}" / "snapshots" / "0123abcd" / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def test_releases_read_from_a_hugging_face_cache_keep_their_site_and_kind(tmp_path):
    """The cache's snapshot files are symlinks into blobs/ (names of hashes): the site and kind come
    from the path as given. A transcoder never loads as an SAE of its input, nor at another site."""
    save_sae(_trained_like(), tmp_path / "src", format="gemmascope")
    npz = (tmp_path / "src" / "params.npz").read_bytes()
    cache = tmp_path / "hub"
    res = _blob(cache, "gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71/params.npz", npz)
    tc = _blob(cache, "gemma-scope-2b-pt-transcoders", "layer_3/width_16k/average_l0_9/params.npz", npz)
    assert res.is_symlink() and "layer_" not in res.resolve().as_posix()
    sae = load_sae(res.parent)
    assert (sae.cfg.site, sae.cfg.target_site, sae.cfg.model) == ("resid.20", None, "gemma-2-2b")
    assert load_sae(res.parent.parent / "canonical").cfg.site == "resid.20"
    sae = load_sae(tc)
    assert (sae.cfg.site, sae.cfg.target_site) == ("ln2.3", "mlp.3")
    assert load_sae(tc, site="blocks.3.ln2.hook_normalized", kind="transcoder").cfg.transcoder
    for kw, message in [({"site": "mlp_in.3"}, r"reads ln2\.3 \(its files say so\), not mlp_in\.3"),
                        ({"kind": "sae"}, r"holds a transcoder \(ln2\.3 → mlp\.3\), not an SAE"),
                        ({"kind": "crosscoder"}, "kind must be one of sae, transcoder")]:
        with pytest.raises(SaescopeError, match=message) as err:
            load_sae(tc, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(SaescopeError, match=r"holds an SAE of resid\.20, not a transcoder"):
        load_sae(res, kind="transcoder")

    bare = tmp_path / "copied" / "params.npz"  # outside its release's folders: the files say nothing
    bare.parent.mkdir()
    bare.write_bytes(npz)
    assert load_sae(bare).cfg.site is None
    assert load_sae(bare, site="resid.2").cfg.site == "resid.2"
    with pytest.raises(SaescopeError, match=r"does not say whether it is an SAE or a transcoder, and mlp_in\.3 is a "
                                            r"transcoder's input: give kind='sae' or kind='transcoder'"):
        load_sae(bare, site="mlp_in.3")
    sae = load_sae(bare, site="mlp_in.3", kind="transcoder")
    assert (sae.cfg.site, sae.cfg.target_site) == ("mlp_in.3", "mlp.3")
    assert not load_sae(bare, site="mlp_in.3", kind="sae").cfg.transcoder
    with pytest.raises(SaescopeError, match=r"a transcoder reads mlp_in\.L or ln2\.L, not resid\.2"):
        load_sae(bare, site="resid.2", kind="transcoder")


def test_gemma_scope_2_tree_by_path(tmp_path):
    """Each folder of a release tree loads by its path with the site from hf_hook_point_in and the
    forward of SPEC §8 (pre = x·w_enc + b_enc; f = pre·(pre > θ); x̂ = f·w_dec + b_dec + x·A); names a
    user guesses (canonical, large, 64k) are answered with the names that exist."""
    from safetensors.torch import load_file

    made = gemma_scope_2_tree(tmp_path / "gemma-scope-2-270m-pt")
    x = torch.randn(10, 32) * 3
    for folder, path in made.items():
        sae = load_sae(path)
        p = load_file(path / "params.safetensors")
        pre = x @ p["w_enc"] + p["b_enc"]
        want = (pre * (pre > p["threshold"])) @ p["w_dec"] + p["b_dec"]
        if "affine_skip_connection" in p:
            want = want + x @ p["affine_skip_connection"]
        torch.testing.assert_close(sae(x), want, rtol=1e-5, atol=1e-5)
        if folder.startswith("transcoder"):
            assert (sae.cfg.site, sae.cfg.target_site, sae.cfg.skip) == ("mlp_in.1", "mlp.1", folder.endswith("_affine"))
        else:
            assert (sae.cfg.site, sae.cfg.target_site) == ("resid.1", None)
    tree = tmp_path / "gemma-scope-2-270m-pt"
    for guess in ("resid_post/layer_1_width_64_l0_large", "resid_post/layer_1_width_64k_l0_small", "resid_post/canonical"):
        with pytest.raises(SaescopeError, match=r"resid_post has layer_1_width_64_l0_small$") as err:
            load_sae(tree / guess)
        assert "\n" not in str(err.value)
    with pytest.raises(SaescopeError, match=r"has layer_1_width_64_l0_big_affine, layer_1_width_64_l0_medium$"):
        load_sae(tree / "transcoder" / "layer_1_width_16k_l0_medium")
