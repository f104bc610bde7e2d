"""A full disk during a harvest and during a checkpoint: a one-line error, the last good state
usable (and verified), and a rerun once there is room that ends where an uninterrupted run does.

The disk is a 3 MiB tmpfs where this machine lets us mount one; elsewhere the same writes fail
with ENOSPC past a 3 MiB budget (a patched write path), so that the test runs everywhere."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from saescope import load_sae
from saescope.cli import main
from saescope.verify import verify

LIMIT = 3 * 2**20


def _mount(path: Path, size: str, remount: bool = False) -> bool:
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    options = f"remount,size={size}" if remount else f"size={size}"
    return subprocess.run([*sudo, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


class _Budget:
    """ENOSPC for writes under `root` once `limit` bytes have gone there."""

    def __init__(self, root: Path, monkeypatch):
        from saescope import files
        from saescope.data import store
        from saescope.train import trainer

        self.root, self.used, self.limit = root.resolve(), 0, LIMIT
        real_write, real_out = files.atomic_write, store._ShardFile._out

        def charge(path: Path, n: int) -> None:
            if Path(path).resolve().is_relative_to(self.root):
                if self.used + n > self.limit:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
                self.used += n

        def atomic_write(path, data):
            charge(path, len(data))
            real_write(path, data)

        def out(shard, data):
            charge(shard.path, len(data) if isinstance(data, bytes) else data.nbytes)
            real_out(shard, data)

        for module in (files, store, trainer):
            monkeypatch.setattr(module, "atomic_write", atomic_write)
        monkeypatch.setattr(store._ShardFile, "_out", out)

    def grow(self) -> None:
        self.limit = 2**40


@pytest.fixture
def disk(tmp_path, monkeypatch):
    path = tmp_path / "disk"
    path.mkdir()
    if _mount(path, "3m"):
        yield path, lambda: _mount(path, "256m", remount=True)
        subprocess.run(([] if os.geteuid() == 0 else ["sudo", "-n"]) + ["umount", str(path)], check=True)
    else:
        budget = _Budget(path, monkeypatch)
        yield path, budget.grow


def _harvest(setup_dir: Path, out: Path) -> list[str]:
    return ["-q", "harvest", "--model", str(setup_dir / "model"), "--sites", "resid.1,mlp_in.1,mlp.1", "--tokens", "40000",
            "--seq-len", "64", "--shard-mb", "0.15", "--corpus", str(setup_dir / "docs"), "--out", str(out)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("disk")
    save_tiny_model(root / "model", tokenizer)
    (root / "docs").mkdir()
    for i in range(200):
        (root / "docs" / f"{i:03d}.txt").write_text(" ".join(f"word{(i * 7 + j) % 50}" for j in range(300)) + ".")
    return root


def test_a_full_disk_stops_a_harvest_that_then_resumes(setup, disk, tmp_path, capsys):
    path, grow = disk
    assert main(_harvest(setup, tmp_path / "whole")) == 0
    assert main(_harvest(setup, path / "store")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"saescope: error: cannot write the store {path / 'store'} (No space left on device); "
                          "it keeps its first ") and err.endswith("shards: make room and rerun to resume"), err
    assert len(err.splitlines()) == 1
    kept = int(err.split("keeps its first ")[1].split()[0])
    [check] = verify(path / "store")  # what was committed is whole, and says it is incomplete
    assert check.ok and f"{kept} shards" in check.detail and "incomplete" in check.detail, check
    grow()
    assert main(_harvest(setup, path / "store")) == 0
    for name in ("store.json", "resid.1/manifest.json", "mlp.1/manifest.json"):
        assert json.loads((path / "store" / name).read_text())["shards"] == \
            json.loads((tmp_path / "whole" / name).read_text())["shards"]


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one(setup, disk, tmp_path, capsys):
    path, grow = disk
    store = tmp_path / "store"
    assert main(_harvest(setup, store)) == 0
    # 2 SAEs of 1024 latents: each checkpoint ≈ 2 × 3 × 32 × 1024 × 4 B ≈ 1.6 MiB; the second does not fit
    train = ["-q", "train", "--store", str(store), "--sites", "resid.1", "--widths", "1024", "--lambdas", "1e-3,1e-2",
             "--tokens", str(256 * 30), "--batch-size", "256", "--lr", "1e-3", "--checkpoint-every", "10",
             "--optimizer", "adam"]
    assert main([*train, "--out", str(tmp_path / "whole")]) == 0
    capsys.readouterr()
    assert main([*train, "--out", str(path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"saescope: error: cannot write the checkpoint of step 20 in {path / 'run' / 'checkpoint'} "
                          "(No space left on device); stopped; the checkpoint of step 10 is kept"), err
    state = json.loads((path / "run" / "checkpoint" / "state.json").read_text())
    assert state["step"] == 10 and [p.name for p in (path / "run" / "checkpoint").glob("step-*")] == [state["folder"]]
    assert all(c.ok for c in verify(path / "run" / "checkpoint"))
    grow()
    assert main([*train, "--out", str(path / "run")]) == 0
    for sae in (tmp_path / "whole" / "saes").iterdir():
        want, got = load_sae(sae).state_dict(), load_sae(path / "run" / "saes" / sae.name).state_dict()
        for k, v in want.items():
            torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=f"{sae.name} {k}")
