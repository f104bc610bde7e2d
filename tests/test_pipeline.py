"""`saescope run` end to end on a tiny model: every stage, the report, and a rerun that skips them."""

from __future__ import annotations

import json

from saescope.cli import main


def test_run_writes_the_report_and_reruns_skip_finished_stages(tmp_path, run_config, capsys):
    out = tmp_path / "out"
    assert main(["-q", "run", "--config", str(tmp_path / "run.toml"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "report:" in printed and f"saescope serve {out}" in printed
    report = (out / "report.md").read_text()
    for picture in ("pareto.png", "architectures.png", "firing_frequency.png", "by_position.png"):
        assert (out / picture).stat().st_size > 5000 and f"]({picture})" in report
    records = json.loads((out / "report.json").read_text())
    assert len(records) == 6 and all("path" in r and "delta_loss" in r for r in records)
    assert list((out / "saes" / "resid_post").glob("layer_1_width_*_l0_*/params.safetensors"))
    assert list((out / "saes" / "saelens").iterdir())  # TopK: Gemma Scope 2 holds JumpReLU only
    assert "Not measured: the tokenizer has too few whole-word tokens" in report  # a 400-token BPE
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings) == {"harvest", "train", "eval", "absorption", "report", "explore"}
    from saescope.explore import connect
    saes = connect(out / "features.db", readonly=True).execute("SELECT id, n_tokens FROM saes").fetchall()
    assert sorted(r["id"] for r in saes) == sorted(r["sae"] for r in records) and saes[0]["n_tokens"] > 100
    before = {k: v for k, v in timings.items() if k != "report"}
    assert main(["-q", "run", "--config", str(tmp_path / "run.toml"), "--out", str(out)]) == 0
    after = json.loads((out / "timings.json").read_text())
    assert {k: after[k] for k in before} == before  # harvest, train and eval were skipped
    config = (tmp_path / "run.toml").read_text().replace("tokens = 2048", "tokens = 4096")
    (tmp_path / "run.toml").write_text(config)
    capsys.readouterr()
    assert main(["-q", "run", "--config", str(tmp_path / "run.toml"), "--out", str(out)]) == 2
    assert "holds SAEs trained with another configuration" in capsys.readouterr().err


def test_a_run_of_multi_layer_dictionaries_reports_the_replacement_model(tmp_path, model_dir, doc_folder):
    """The issue's interface: a skip transcoder per layer (a set), a CLT and a crosscoder, through
    every stage; the report carries the replacement model and the CLT is released in Gemma Scope
    2's files, which load back to the trained dictionary."""
    from saescope import load_dictionary

    (tmp_path / "run.toml").write_text(f"""
[harvest]
model = "{model_dir}"
sites = ["mlp_in.0", "mlp_in.1", "mlp_in.2", "mlp.0", "mlp.1", "mlp.2", "resid.0", "resid.2"]
tokens = 1024
corpus = {{ source = "{doc_folder}", seq_len = 32, holdout_fraction = 0.3 }}

[train]
tokens = 2048
batch_size = 128
[[train.saes]]
sites = ["mlp_in.0", "mlp_in.1"]
transcoder = true
skip = true
widths = [16]
target_l0 = [4]
[[train.saes]]
sites = ["mlp_in.0", "mlp_in.1", "mlp_in.2"]
clt = true
widths = [16]
target_l0 = [4]
[[train.saes]]
sites = ["resid.0", "resid.2"]
crosscoder = true
arch = "topk"
widths = [16]
ks = [4]

[eval]
tokens = 192
seq_len = 32
absorption = false

[explore]
tokens = 256
seq_len = 32
""")
    out = tmp_path / "out"
    assert main(["-q", "run", "--config", str(tmp_path / "run.toml"), "--out", str(out)]) == 0
    replaced = {r["sae"]: r for r in json.loads((out / "replacement.json").read_text())}
    assert set(replaced) == {"mlp_in.0_1-jumprelu-tc-16-l0_4-skip-btk", "mlp_in.0-2-jumprelu-clt-16-l0_4-btk",
                             "resid.0_2-topk-xc-16-k4"}
    clt = replaced["mlp_in.0-2-jumprelu-clt-16-l0_4-btk"]
    assert len(clt["layers"]) == 3 and clt["delta_loss_all_replaced_se"] > 0
    assert 3 < replaced["resid.0_2-topk-xc-16-k4"]["l0_per_layer"] <= 4.0  # k a token, fewer where ReLU zeroes some
    report = (out / "report.md").read_text()
    assert "the replacement model" in report and "mlp_in.0-2-jumprelu-clt-16-l0_4-btk" in report
    released = load_dictionary(out / "saes" / "clt" / "mlp_in.0-2-jumprelu-clt-16-l0_4-btk")
    trained = load_dictionary(out / "train" / "saes" / "mlp_in.0-2-jumprelu-clt-16-l0_4-btk")
    import torch

    acts = {s: torch.randn(5, 32) for s in trained.cfg.sites_in}
    with torch.no_grad():
        for s, y in trained(acts).items():
            torch.testing.assert_close(released(acts)[s], y, rtol=1e-5, atol=1e-5)
