"""Bad input, property-based (hypothesis) where the space is large: every failure is one
SaescopeError line that names the problem, never another exception, never a silent result, and
nothing half-written is left behind."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import save_tiny_model
from saescope import JumpReLUSAE, SAEConfig, SaescopeError, load_sae, save_sae
from saescope.cli import main
from saescope.config import TrainConfig, config_from_file
from saescope.pipeline import RunConfig
from saescope.site import parse_sites

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,  # the same cases on every CI run
                suppress_health_check=[HealthCheck.function_scoped_fixture])
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                 st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert text and "\n" not in text, repr(text)
    return text


def _misspell(draw, key: str) -> str:
    if not key:
        return "x"
    i = draw(st.integers(0, len(key) - 1))
    kind = draw(st.sampled_from(["drop", "swap", "add"]))
    if kind == "drop" and len(key) > 1:
        return key[:i] + key[i + 1:]
    if kind == "swap" and i + 1 < len(key) and key[i] != key[i + 1]:
        return key[:i] + key[i + 1] + key[i] + key[i + 2:]
    return key[:i] + "x" + key[i:]


@st.composite
def broken_configs(draw, cls):
    """A valid config's dict with a few keys misspelt, dropped, retyped or nested in junk."""
    values = json.loads(cls().model_dump_json())
    original = json.loads(cls().model_dump_json())
    misspelt = []
    for _ in range(draw(st.integers(1, 3))):
        table, parent = values, None
        if draw(st.booleans()):
            nested = [k for k, v in values.items() if isinstance(v, dict) and isinstance(original.get(k), dict)]
            if nested:
                parent = draw(st.sampled_from(sorted(nested)))
                table = values[parent]
        if not table:
            continue
        key = draw(st.sampled_from(sorted(table)))
        action = draw(st.sampled_from(["misspell", "retype", "drop"]))
        if action == "misspell":
            new = _misspell(draw, key)
            if new not in table:
                table[new] = table.pop(key)
                misspelt.append((parent, new))
        elif action == "retype":
            table[key] = draw(JUNK)
        else:
            del table[key]
    def reported(parent, key):  # still there and not a real key again, in a table still under its own name
        if parent is not None and parent not in original:
            return False
        table = values if parent is None else values.get(parent)
        return isinstance(table, dict) and key in table and key not in (original if parent is None else original.get(parent) or {})

    return values, [key for parent, key in misspelt if reported(parent, key)]


@pytest.mark.parametrize("cls", [TrainConfig, RunConfig])
@FUZZ
@given(data=st.data())
def test_broken_configs_fail_in_one_line_naming_the_key(cls, data, tmp_path):
    values, misspelt = data.draw(broken_configs(cls))
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    try:
        config_from_file(cls, path)
    except SaescopeError as exc:
        text = _one_line(exc)
        assert text.startswith(f"config {path}: invalid {cls.__name__}: ")
        for key in misspelt:  # a misspelt key is named, with where it sits
            assert key in text, (key, text)
    else:
        assert not misspelt, f"accepted misspelt keys {misspelt}"


@FUZZ
@given(raw=st.binary(max_size=200), suffix=st.sampled_from([".toml", ".json"]))
def test_unparseable_config_files(raw, suffix, tmp_path):
    path = tmp_path / f"config{suffix}"
    path.write_bytes(raw)
    try:
        config_from_file(TrainConfig, path)
    except SaescopeError as exc:
        assert str(path) in _one_line(exc)


def test_a_bad_config_on_the_command_line_leaves_nothing(tmp_path, capsys):
    bad = tmp_path / "train.toml"
    bad.write_text('store = "x"\nbatch_sise = 4096\n[[saes]]\nwidths = [-3]\n')
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "batch_sise" in err and "saes.0.widths" in err
    assert not (tmp_path / "out").exists()
    bad.write_text("[[saes]\nwidths = 3")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "cannot be parsed" in capsys.readouterr().err and not (tmp_path / "out").exists()


@FUZZ
@given(text=st.text(max_size=30))
def test_site_strings(text):
    try:
        sites = parse_sites(text)
    except SaescopeError as exc:
        _one_line(exc)
    else:
        assert all(str(s).count(".") == 1 for s in sites)


def test_sites_outside_the_model(tiny_lm):
    from saescope.site import Site

    for text, message in (("resid.3", "layer 3 out of range; tiny-gemma3 has layers 0..2"),
                          ("mlp.-1", "layer must be a non-negative integer, got -1"),
                          ("foo.1", "unknown site kind .foo."), ("resid", "unknown site .resid.; use KIND.LAYER")):
        with pytest.raises(SaescopeError, match=message) as info:
            Site.parse(text).check(tiny_lm)
        _one_line(info.value)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    sae = JumpReLUSAE(SAEConfig(d_in=8, d_sae=16, site="resid.1"))
    sae.init_weights(torch.Generator().manual_seed(0))
    root = tmp_path_factory.mktemp("saes")
    return {fmt: save_sae(sae, root / fmt, format=fmt) for fmt in ("native", "saelens", "gemmascope")}, sae


def _weights_file(folder: Path, fmt: str) -> Path:
    return folder / {"native": "sae.safetensors", "saelens": "sae_weights.safetensors", "gemmascope": "params.npz"}[fmt]


@pytest.mark.parametrize("fmt", ["native", "saelens", "gemmascope"])
@FUZZ
@given(data=st.data())
def test_truncated_or_altered_sae_files(fmt, data, saved, tmp_path):
    folders, original = saved
    good = _weights_file(folders[fmt], fmt).read_bytes()
    damaged = bytearray(good)
    if data.draw(st.booleans(), label="truncate"):
        damaged = damaged[:data.draw(st.integers(0, len(good) - 1), label="length")]
    else:
        for _ in range(data.draw(st.integers(1, 4))):
            damaged[data.draw(st.integers(0, len(good) - 1))] ^= data.draw(st.integers(1, 255))
    assume(bytes(damaged) != good)  # two flips of one byte can cancel
    folder = tmp_path / fmt
    folder.mkdir(exist_ok=True)
    for f in folders[fmt].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _weights_file(folder, fmt).write_bytes(bytes(damaged))
    try:
        sae = load_sae(folder)
    except SaescopeError as exc:
        _one_line(exc)
    else:  # only harmless damage may load (a zip header byte nobody reads): the very same weights
        assert fmt == "gemmascope", "damaged safetensors loaded; its recorded sha256 should have refused it"
        want = original.fold().state_dict()
        for k in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(sae.state_dict()[k], want[k], rtol=0, atol=0)


def test_object_arrays_in_npz_are_refused_unpickled(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, W_enc=np.array([{"evil": 1}], dtype=object), W_dec=np.zeros((2, 2)))
    (tmp_path / "params.npz").write_bytes(buf.getvalue())
    with pytest.raises(SaescopeError, match="need unpickling; refused"):
        load_sae(tmp_path / "params.npz")
    assert zipfile.is_zipfile(tmp_path / "params.npz")


def test_an_sae_that_does_not_fit_the_model(tiny_lm, model_dir, tmp_path, capsys):
    from saescope.checks import check_sae

    sae = JumpReLUSAE(SAEConfig(d_in=16, d_sae=8, site="resid.1"))
    with pytest.raises(SaescopeError, match=r"d_in 16.*32|32.*d_in 16") as info:
        check_sae(sae, tiny_lm)
    _one_line(info.value)
    save_sae(sae, tmp_path / "sae")
    out = tmp_path / "eval.json"
    capsys.readouterr()
    assert main(["-q", "eval", "--sae", str(tmp_path / "sae"), "--model", str(model_dir), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16" in err and not out.exists()


def test_a_model_without_tokenizer_and_an_empty_corpus(tokenizer, tmp_path, capsys):
    save_tiny_model(tmp_path / "model")  # weights and config only
    (tmp_path / "docs").mkdir()
    capsys.readouterr()
    harvest = ["-q", "harvest", "--sites", "resid.1", "--tokens", "256", "--seq-len", "32", "--corpus", str(tmp_path / "docs")]
    assert main([*harvest, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "a")]) == 2
    assert capsys.readouterr().err.strip().endswith("the model has no tokenizer; text corpora need one (pass token ids instead)")
    tokenizer.save_pretrained(tmp_path / "model")
    assert main([*harvest, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "b")]) == 2
    assert "holds no .txt/.jsonl/.parquet files" in capsys.readouterr().err
    (tmp_path / "docs" / "empty.txt").write_text("")
    assert main([*harvest, "--model", str(tmp_path / "model"), "--out", str(tmp_path / "c")]) == 2
    assert "gave no text" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")  # no empty store left behind
