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
    assert (out / "saes" / "layer_1" / "width_32" / "topk").exists() is False
    assert list((out / "saes" / "layer_1").glob("width_*/average_l0_*/params.npz"))
    assert list((out / "saes" / "layer_1" / "topk").iterdir())
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
