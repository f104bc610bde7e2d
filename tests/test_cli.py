"""The CLI: every stage listed, harvest and info end to end, one-line errors with exit code 2."""

from __future__ import annotations

import pytest

from conftest import tiny_model
from saescope.cli import main


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    tiny_model("gemma3").save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("harvest", "run", "sites", "info"):
        assert name in out


def test_harvest_and_info(model_dir, doc_folder, tmp_path, capsys):
    args = ["-q", "harvest", "--model", str(model_dir), "--sites", "blocks.1.hook_resid_post,attn.0",
            "--tokens", "256", "--out", str(tmp_path / "st"), "--corpus", str(doc_folder), "--seq-len", "64"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "4 sequences × 64 = 256 tokens" in out and "resid.1: d_in 32" in out and "attn.0: d_in 48" in out
    assert main(args) == 0  # a finished store is left as it is
    assert main(["info", str(tmp_path / "st")]) == 0
    assert "complete" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["harvest", "--sites", "resdi.1", "--out", "x"], "unknown site kind 'resdi'"),
    (["harvest", "--sites", "resid.1", "--tokens", "0", "--out", "x"], "invalid HarvestConfig: tokens: Input should be greater than 0"),
    (["harvest", "--sites", "resid.9", "--out", "{tmp}/o"], "site resid.9: layer 9 out of range"),
    (["info", "{tmp}"], "is not an activation store"),
    (["run", "--config", "{tmp}/run.toml", "--out", "{tmp}/o"], "harvest.tokns: Extra inputs are not permitted"),
])
def test_errors_are_one_line(args, message, model_dir, tmp_path, capsys):
    (tmp_path / "run.toml").write_text("[harvest]\ntokns = 5\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "harvest" and "resid.9" in args:
        args += ["--model", str(model_dir)]
    assert main(["-q", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("saescope: error: ") and message in err and len(err.splitlines()) == 1
