"""The CLI: every stage listed, harvest and info end to end, one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest

from conftest import gemma_scope_2_tree
from saescope import load_sae, save_sae
from saescope.cli import main
from saescope.sae.formats import l0_label


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ("harvest", "run", "sites", "info", "export"):
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


def test_train_from_a_store_with_config_and_flags(model_dir, doc_folder, tmp_path, capsys):
    store = tmp_path / "st"
    assert main(["-q", "harvest", "--model", str(model_dir), "--sites", "resid.1,mlp_in.1,mlp.1", "--tokens", "1024",
                 "--out", str(store), "--corpus", str(doc_folder), "--seq-len", "64"]) == 0
    (tmp_path / "train.toml").write_text(
        f'store = "{store}"\ntokens = 2048\nbatch_size = 128\nlr = 1e-3\n'
        '[[saes]]\nsites = ["resid.1"]\nwidths = [16, 32]\nlambdas = [1e-2]\n'
        '[[saes]]\nsites = ["mlp_in.1"]\ntranscoder = true\nwidths = [16]\n')
    assert main(["-q", "train", "--config", str(tmp_path / "train.toml"), "--out", str(tmp_path / "run")]) == 0
    assert "3 SAEs in" in capsys.readouterr().out
    names = sorted(p.name for p in (tmp_path / "run" / "saes").iterdir())
    assert names == ["mlp_in.1-jumprelu-tc-16-lam0.0006", "resid.1-jumprelu-16-lam0.01", "resid.1-jumprelu-32-lam0.01"]
    assert main(["-q", "train", "--store", str(store), "--sites", "resid.1", "--arch", "topk", "--ks", "2,4",
                 "--widths", "16", "--tokens", "1024", "--batch-size", "128", "--out", str(tmp_path / "run2"),
                 "--precision", "bfloat16", "--kernels", "sparse", "--optimizer", "signum", "--momentum", "0.9",
                 "--lr-scale", "width", "--loss", "fvu"]) == 0
    assert sorted(p.name for p in (tmp_path / "run2" / "saes").iterdir()) == ["resid.1-topk-16-k2", "resid.1-topk-16-k4"]
    assert main(["-q", "train", "--store", str(store), "--sites", "mlp_in.1", "--transcoder", "--skip", "--widths", "16",
                 "--tokens", "1024", "--batch-size", "128", "--out", str(tmp_path / "run3")]) == 0
    [skip] = (tmp_path / "run3" / "saes").iterdir()
    assert skip.name == "mlp_in.1-jumprelu-tc-16-lam0.0006-skip" and load_sae(skip).cfg.skip
    # export: Gemma Scope 2's tree named by the training L0 (no target here), and SAELens folders
    assert main(["-q", "export", str(tmp_path / "run3"), "--format", "gemmascope2", "--out", str(tmp_path / "gs2")]) == 0
    l0 = l0_label(load_sae(skip).cfg.extra["final_metrics"]["l0"])
    exported = load_sae(tmp_path / "gs2" / "transcoder" / f"layer_1_width_16_l0_{l0}_affine")
    assert exported.cfg.skip and exported.cfg.target_site == "mlp.1"
    # the SAEs were trained on the store's documents (split train, 5% held out): eval refuses any text they read
    evaluation = ["-q", "eval", "--sae", str(tmp_path / "run" / "saes"), "--model", str(model_dir), "--tokens", "128",
                  "--corpus", str(doc_folder), "--seq-len", "32", "--out", str(tmp_path / "eval.json")]
    capsys.readouterr()
    for more in (["--holdout-fraction", "0.5"], ["--split", "all"]):
        assert main(evaluation + more) == 2
        err = capsys.readouterr().err
        assert "was trained on documents this held-out text reads too" in err and len(err.strip().splitlines()) == 1
        assert "--holdout-fraction at most 0.05" in err
    assert main(evaluation + ["--holdout-fraction", "0.5", "--allow-overlap"]) == 0
    assert main(["-q", "export", str(tmp_path / "run"), "--format", "saelens", "--out", str(tmp_path / "sl")]) == 0
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == names
    assert main(["-q", "export", str(tmp_path / "run2"), "--format", "gemmascope2", "--out", str(tmp_path / "x")]) == 2
    assert "resid.1-topk-16-k2: the Gemma Scope 2 format holds JumpReLU SAEs" in capsys.readouterr().err
    saved = json.loads((tmp_path / "run2" / "train_config.json").read_text())
    assert (saved["precision"], saved["kernels"]) == ("bfloat16", "sparse")
    assert (saved["optimizer"], saved["momentum"], saved["lr_scale"], saved["loss"]) == ("signum", 0.9, "width", "fvu")


@pytest.mark.parametrize("toml, message", [
    ("tokens = 100\n[[saes]]\nwidth = [16]\n", "saes.0.width: Extra inputs are not permitted"),
    ("lr = -1\n", "lr: Input should be greater than 0"),
    ("[[saes]]\narch = 'gated'\n", "saes.0.arch: Input should be 'jumprelu', 'topk', 'batchtopk' or 'relu'"),
    ("tokens = = 3\n", "cannot be parsed"),
    ("precision = 'tf32'\n", "precision 'tf32' is a CUDA tensor-core format, not for device 'cpu'"),
    ("optimizer = 'lion'\n", "optimizer: Input should be 'adam' or 'signum'"),
    ("optimizer = 'signum'\n[[saes]]\ntarget_l0 = [40]\nsparsity = 'l0'\n", "use sparsity = 'quadratic' (or optimizer = 'adam')"),
])
def test_train_config_errors_name_the_field(tmp_path, capsys, toml, message):
    (tmp_path / "bad.toml").write_text(toml)
    assert main(["-q", "train", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_train_needs_activations(tmp_path, capsys):
    assert main(["-q", "train", "--out", str(tmp_path / "o")]) == 2
    assert "training needs activations" in capsys.readouterr().err


def test_eval_writes_json_and_markdown(model_dir, doc_folder, tmp_path, capsys):

    from saescope import ReLUSAE, SAEConfig

    for site, d in (("resid.1", 32), ("attn.0", 48)):
        sae = ReLUSAE(SAEConfig(arch="relu", d_in=d, d_sae=8, site=site))
        sae.init_weights()
        save_sae(sae, tmp_path / "saes" / site, format="saelens" if site == "attn.0" else "gemmascope")
    out = tmp_path / "eval.json"
    args = ["-q", "eval", "--sae", str(tmp_path / "saes"), "--model", str(model_dir), "--tokens", "128",
            "--corpus", str(doc_folder), "--seq-len", "32", "--holdout-fraction", "0.5", "--out", str(out)]
    assert main(args) == 2  # gemmascope folder has no site recorded → resid.1 unknown: a clear error
    assert "does not say which site it reads" in capsys.readouterr().err
    one = args[:3] + [str(tmp_path / "saes" / "resid.1")] + args[4:]
    assert main(one + ["--site", "mlp_in.1"]) == 2  # an SAE or a transcoder? the npz does not say
    assert "give kind='sae' or kind='transcoder' (--kind)" in capsys.readouterr().err
    assert main(one + ["--site", "resid.1"]) == 0
    assert json.loads(out.read_text())[0]["site"] == "resid.1"
    (tmp_path / "saes" / "resid.1" / "params.npz").unlink()
    save_sae(ReLUSAE(SAEConfig(arch="relu", d_in=32, d_sae=8, site="resid.1")), tmp_path / "saes" / "resid.1")
    assert main(args) == 0
    records = json.loads(out.read_text())
    assert [r["sae"] for r in records] == ["attn.0", "resid.1"]
    assert {"l0", "fvu", "delta_loss", "ce_loss_clean", "ce_loss_spliced", "ce_loss_recovered", "kl",
            "dead_fraction", "dense_fraction", "n_tokens", "site", "path"} <= set(records[0])
    assert records[0]["n_tokens"] == 128
    assert "| attn.0 | attn.0 | 8 |" in out.with_suffix(".md").read_text()


def test_a_gemma_scope_2_tree_evaluates_and_builds(model_dir, doc_folder, tmp_path, capsys):
    """A release tree (resid_post/…, transcoder/…) is taken like any folder of SAEs."""
    from saescope.explore import connect

    gemma_scope_2_tree(tmp_path / "tree")
    common = ["--model", str(model_dir), "--tokens", "128", "--corpus", str(doc_folder), "--seq-len", "32"]
    assert main(["-q", "eval", "--sae", str(tmp_path / "tree"), *common, "--holdout-fraction", "0.5",
                 "--out", str(tmp_path / "eval.json")]) == 0
    records = {r["sae"]: r for r in json.loads((tmp_path / "eval.json").read_text())}
    assert set(records) == {"resid_post-layer_1_width_64_l0_small", "transcoder-layer_1_width_64_l0_medium",
                            "transcoder-layer_1_width_64_l0_big_affine"}
    assert records["transcoder-layer_1_width_64_l0_medium"]["site"] == "mlp_in.1"
    assert records["transcoder-layer_1_width_64_l0_medium"]["target_site"] == "mlp.1"
    assert main(["-q", "explore", "build", str(tmp_path / "tree"), *common, "--split", "all",
                 "--out", str(tmp_path / "f.db")]) == 0
    con = connect(tmp_path / "f.db", readonly=True)
    assert con.execute("SELECT count(*) FROM latents").fetchone()[0] == 3 * 64


def test_explore_build_on_a_folder_of_saes(model_dir, doc_folder, tmp_path, capsys):
    from saescope import JumpReLUSAE, SAEConfig
    from saescope.explore import connect

    sae = JumpReLUSAE(SAEConfig(d_in=32, d_sae=16, site="resid.1"))
    sae.init_weights()
    save_sae(sae, tmp_path / "saes" / "one")
    assert main(["-q", "explore", "build", str(tmp_path / "saes"), "--tokens", "128", "--corpus", str(doc_folder),
                 "--split", "all", "--seq-len", "32"]) == 2
    assert "pass --model" in capsys.readouterr().err
    assert main(["-q", "explore", "build", str(tmp_path / "saes"), "--model", str(model_dir), "--tokens", "128",
                 "--corpus", str(doc_folder), "--split", "all", "--seq-len", "32"]) == 0
    assert "1 SAEs, " in capsys.readouterr().out
    con = connect(tmp_path / "saes" / "features.db", readonly=True)
    assert con.execute("SELECT count(*) FROM latents").fetchone()[0] == 16
    (tmp_path / "mine.json").write_text(json.dumps({"one": {"3": "my own words"}}))
    assert main(["-q", "explore", "neuronpedia", str(tmp_path / "saes"), "--out", str(tmp_path / "np"),
                 "--source-set", "me-res-16", "--explanations", str(tmp_path / "mine.json"), "--batch-size", "8"]) == 0
    assert "1 sources, 16 features" in capsys.readouterr().out
    source = next((tmp_path / "np").glob("*/1-me-res-16__one"))
    assert sorted(p.name for p in (source / "features").iterdir()) == ["batch-0.jsonl.gz", "batch-1.jsonl.gz"]
    assert main(["-q", "explore", "neuronpedia", str(tmp_path / "nowhere"), "--out", str(tmp_path / "np")]) == 2
    assert "no feature database at" in capsys.readouterr().err


def test_serve_binds_loopback_unless_asked():
    from saescope.cli import _parser

    assert _parser().parse_args(["serve", "runs/x"]).host == "127.0.0.1"
    assert _parser().parse_args(["serve", "runs/x", "--host", "0.0.0.0"]).host == "0.0.0.0"
