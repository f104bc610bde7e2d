"""`saescope verify` over a whole run folder: everything intact, then each kind of damage named."""

from __future__ import annotations

from saescope.cli import main


def _verify(capsys, *paths) -> tuple[int, list[str]]:
    code = main(["verify", *map(str, paths)])
    captured = capsys.readouterr()
    return code, captured.out.splitlines() + captured.err.splitlines()


def _flip(path, offset: int = -16) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_verify_a_run_then_name_each_damage(run_config, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert main(["-q", "run", "--config", str(run_config), "--out", str(out)]) == 0
    capsys.readouterr()
    code, lines = _verify(capsys, out)
    assert code == 0 and lines[-1].endswith("intact") and not any(line.startswith("BAD") for line in lines)
    text = "\n".join(lines)
    for kind in ("activation store: 3 sites", "checkpoint of step 16: 6 SAEs", "metrics log", "feature database: 6 SAEs",
                 "report: 4 pictures", "results of 6 SAEs", "SAE: topk"):
        assert kind in text, kind

    # a moved run verifies from another directory: every recorded path is relative to its file
    import json
    import shutil

    moved = tmp_path / "moved" / "run"
    shutil.copytree(out, moved)
    shutil.move(out, tmp_path / "original")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, lines = _verify(capsys, "../moved/run")
    assert code == 0 and lines[-1].endswith("intact"), lines
    assert all(not r["path"].startswith("/") and not r["released"].startswith("/")
               for r in json.loads((moved / "report.json").read_text()))
    shutil.move(tmp_path / "original", out)
    monkeypatch.chdir(tmp_path)

    _flip(out / "activations" / "resid.1" / "00000.safetensors")
    sae = next((out / "train" / "saes").iterdir())
    weights = sae / "sae.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    checkpoint = next((out / "train" / "checkpoint").glob("step-*/*.pt"))
    checkpoint.unlink()
    with (out / "train" / "metrics.jsonl").open("a") as f:
        f.write('{"sae": "cut of')
    (out / "pareto.png").write_bytes(b"not a picture")
    db = out / "features.db"
    data = bytearray(db.read_bytes())
    data[100:4096] = bytes(3996)  # the schema page
    db.write_bytes(bytes(data))
    code, lines = _verify(capsys, out)
    bad = [line for line in lines if line.startswith("BAD")]
    assert code == 1 and lines[-1].endswith("6 damaged"), lines
    expect = ["activations: shard", "00000.safetensors is corrupt", f"{sae.name}:", "checkpoint file missing",
              "metrics.jsonl: line", "(cut off)", "pareto.png is missing or not a PNG", "features.db: "]
    for piece in expect:
        assert any(piece in line for line in bad), (piece, bad)

    assert _verify(capsys, tmp_path / "nowhere") == (2, [f"saescope: error: nothing at {tmp_path / 'nowhere'}"])
    (tmp_path / "empty").mkdir()
    code, lines = _verify(capsys, tmp_path / "empty")
    assert code == 2 and "holds nothing to verify" in lines[0]
