"""torch.distributed training, launched by torchrun with gloo and 2 processes on this machine: each
mode against single-process training on the same global batches, a dying rank, resuming on
another number of ranks, and the refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import interrupt_training
from saescope import SaescopeError, load_sae
from saescope.config import ParallelConfig, SAESpec, TrainConfig, config_from_file
from saescope.data import ActivationStore, StoreWriter, TensorSource
from saescope.train import Trainer, train, trainer_for
from saescope.train.distributed import Ranks, assign

SITES = {"resid.0": 8, "resid.1": 8, "mlp_in.0": 6, "mlp.0": 8}

SUITE = """
tokens = {tokens}
batch_size = 256
optimizer = "adam"      # signum's sign of a near-zero gradient tips with the ranks' summation order
lr_scale = "none"
loss = "mse"
lr = 1e-3
checkpoint_every = 10
log_every = 5
dead_tokens = 512
buffer_rows = 1024
lr_warmup_steps = 4
lambda_warmup_steps = 8

[[saes]]
sites = ["resid.0", "resid.1"]
widths = [16, 24]
lambdas = [1e-2]

[[saes]]                # AuxK on dead latents; at 2048 latents few fire, so rows are sent sparsely
sites = ["resid.0"]
arch = "topk"
widths = [16, 2048]
ks = [2]

[[saes]]
sites = ["resid.0"]
arch = "batchtopk"
widths = [16]
ks = [3]
norm_cap = 5.0          # the cap's median is each rank's share's (README: Objectives); BatchTopK's 1 binds on half the rows

[[saes]]
sites = ["resid.0"]
arch = "relu"
widths = [16]
lambdas = [1e-2]

[[saes]]
sites = ["mlp_in.0"]
transcoder = true
widths = [16]
lambdas = [1e-2]

[[saes]]
sites = ["resid.1"]
widths = [16]
lambdas = [1e-2]
target_l0 = [3.0]
sparsity = "l0"         # the λ controller, from θ₀: a quantile θ sits on a pre-activation, where rounding decides
threshold_init = "constant"
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Six shards of 500 rows at four aligned sites."""
    root = tmp_path_factory.mktemp("dist") / "store"
    g = torch.Generator().manual_seed(0)
    writer = StoreWriter(root, model="toy", sites=SITES, dtype="float32", seq_len=50, corpus={"source": "toy"},
                         special_ids=[0])
    for _ in range(6):
        writer.begin_shard(torch.randint(1, 100, (10, 50), generator=g))
        x = torch.randn(500, 8, generator=g) * 5 + 2
        writer.append({"resid.0": x, "resid.1": x.roll(1, 1) * 2, "mlp_in.0": x[:, :6], "mlp.0": x.tanh() * 3})
        writer.commit_shard()
    writer.finish()
    return root


def _config(folder: Path, store: Path, steps: int = 40) -> Path:
    path = folder / "suite.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'store = "{store}"\n' + SUITE.format(tokens=steps * 256))
    return path


def _torchrun(*args: str, wait: bool = True, timeout: float = 300, command: str = "train"):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--monitor-interval=0.2",
           "-m", "saescope", "-q", command, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _single(config: Path, out: Path, **overrides) -> None:
    """The same suite in this process, as one rank with the data parts of a 2-rank job."""
    cfg = config_from_file(TrainConfig, config, **{"parallel": {"data_parts": 2}, **overrides})
    train(cfg, out, progress=False)


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_sae(p).state_dict() for p in sorted((folder / "saes").iterdir())}


def _assert_same(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert sorted(a) == sorted(b) and len(a) == 10
    for name, state in a.items():
        for key, value in state.items():
            torch.testing.assert_close(value, b[name][key], rtol=rtol, atol=atol, msg=f"{name} {key}")


@pytest.fixture(scope="module")
def single(store, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("single")
    _single(_config(out, store), out / "run")
    return _weights(out / "run")


def test_data_parallel_equals_one_process_on_the_same_batches(store, single, tmp_path):
    done = _torchrun("--config", str(_config(tmp_path, store)), "--out", str(tmp_path / "dp"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("10 SAEs in") == 1  # rank 0 reports
    # every SAE within float rounding of its single-process twin (the sums run in another order)
    _assert_same(_weights(tmp_path / "dp"), single, rtol=1e-4, atol=1e-5)
    state = json.loads((tmp_path / "dp" / "checkpoint" / "state.json").read_text())
    assert (state["parts"], state["ranks"], state["mode"], state["step"]) == (2, 2, "data", 40)
    lines = [json.loads(line) for line in (tmp_path / "dp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 8 * 10  # one writer, whole-batch metrics
    assert any(line["dead_fraction"] > 0 for line in lines if "topk-2k" in line["sae"])  # AuxK had dead latents


def test_sharded_mode_trains_every_sae_as_one_process_would(store, single, tmp_path):
    done = _torchrun("--config", str(_config(tmp_path, store)), "--parallel", "sae", "--data-parts", "2",
                     "--out", str(tmp_path / "sh"))
    assert done.returncode == 0, done.stdout + done.stderr
    # whole batches on every rank: the same arithmetic as one process, to the bit
    _assert_same(_weights(tmp_path / "sh"), single, rtol=0, atol=0)
    files = sorted(p.stem for p in (tmp_path / "sh" / "checkpoint").glob("step-*/*.pt"))
    assert files == sorted(single)  # each rank wrote its own SAEs' checkpoint files
    lines = (tmp_path / "sh" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8 * 10 and len(set(lines)) == len(lines)


OBJECTIVES = """
tokens = 7680
batch_size = 256
checkpoint_every = 0
log_every = 5
buffer_rows = 1024
lr_warmup_steps = 4
lambda_warmup_steps = 8
{recipe}

[[saes]]                # linear in the batch: the ranks' gradients sum to one process's
sites = ["resid.0"]
widths = [16]
lambdas = [1e-2]
target_l0 = [3.0]
sparsity = "quadratic"
quadratic_form = "token"
input_ste = true

[[saes]]
sites = ["resid.0"]
widths = [16]
lambdas = [1e-2]
sparsity = "tanh"
matryoshka = [4, 8]

[[saes]]                # of the batch as a whole: each rank's share, averaged (README: Objectives)
sites = ["resid.1"]
widths = [16]
lambdas = [1e-2]
target_l0 = [3.0]
sparsity = "quadratic"
frequency_penalty = 1.0
"""


@pytest.mark.parametrize("recipe", ['optimizer = "adam"\nlr = 1e-3\nlr_scale = "none"\nloss = "mse"',
                                    'optimizer = "adam"\nlr = 3e-5\nloss = "fvu"\nlr_scale = "width"'])  # × 32 at width 16
def test_the_objectives_train_data_parallel(recipe, store, tmp_path):
    config = tmp_path / "objectives.toml"
    config.write_text(f'store = "{store}"\n' + OBJECTIVES.format(recipe=recipe))
    done = _torchrun("--config", str(config), "--out", str(tmp_path / "dp"))
    assert done.returncode == 0, done.stdout + done.stderr
    _single(config, tmp_path / "one")
    dp, one = _weights(tmp_path / "dp"), _weights(tmp_path / "one")
    for name, state in one.items():
        if "resid.1" in name:  # the batch-level penalties differ by the share they see, not by a blow-up
            assert all(torch.isfinite(v).all() for v in dp[name].values())
            assert (dp[name]["W_dec"] - state["W_dec"]).abs().max() < 0.05
            continue
        for key, value in state.items():
            torch.testing.assert_close(dp[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def _rank_pid(parent: int, rank: int) -> int:
    for line in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{line}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(line)
    raise AssertionError(f"no rank {rank} under {parent}")


def test_a_dying_rank_ends_the_job_and_the_run_resumes_on_one_process(store, single, tmp_path):
    config = _config(tmp_path, store)
    job = _torchrun("--config", str(config), "--out", str(tmp_path / "cut"), wait=False)
    state = tmp_path / "cut" / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 10):
        assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.stdout else ""
        time.sleep(0.02)
    os.kill(_rank_pid(job.pid, 1), signal.SIGKILL)
    killed = time.monotonic()
    output, _ = job.communicate(timeout=60)
    assert job.returncode != 0 and time.monotonic() - killed < 30, output
    assert "another rank has died" in output or "SIGKILL" in output
    step = json.loads(state.read_text())["step"]
    assert 10 <= step < 40 and not (tmp_path / "cut" / "saes").exists()
    # the 2-rank checkpoint resumes in one process: its 2 data parts replay the same batches
    _single(config, tmp_path / "cut", parallel={})
    _assert_same(_weights(tmp_path / "cut"), single, rtol=1e-4, atol=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 40


def test_a_one_process_run_resumes_sharded_on_two_ranks(store, single, tmp_path, monkeypatch):
    config = _config(tmp_path, store)
    interrupt_training(monkeypatch, Trainer, 25)
    with pytest.raises(KeyboardInterrupt):
        _single(config, tmp_path / "cut")
    monkeypatch.undo()
    assert json.loads((tmp_path / "cut" / "checkpoint" / "state.json").read_text())["step"] == 20
    done = _torchrun("--config", str(config), "--parallel", "sae", "--out", str(tmp_path / "cut"))
    assert done.returncode == 0, done.stdout + done.stderr
    _assert_same(_weights(tmp_path / "cut"), single, rtol=0, atol=0)


def test_a_rank_that_fails_stops_every_rank_with_its_reason(store, tmp_path):
    import shutil

    bad = tmp_path / "store"
    shutil.copytree(store, bad)
    shard = bad / "resid.0" / "00003.safetensors"  # data part 1's: only rank 1 reads it
    data = bytearray(shard.read_bytes())
    data[-8] ^= 0xFF
    shard.write_bytes(bytes(data))
    start = time.monotonic()
    done = _torchrun("--config", str(_config(tmp_path, bad)), "--out", str(tmp_path / "run"), timeout=120)
    assert done.returncode != 0 and time.monotonic() - start < 90
    assert "rank 1 of 2: shard" in done.stderr and "00003.safetensors is corrupt" in done.stderr


@pytest.mark.slow
def test_streaming_from_a_model_on_two_ranks(model_dir, tmp_path):
    """No disk: each rank harvests its data parts; sharded mode shares them by all-gather."""
    common = ["--model", str(model_dir), "--sites", "resid.1", "--widths", "16,24", "--tokens", "2048",
              "--harvest-tokens", "8192",
              "--batch-size", "128", "--lr", "1e-3", "--log-every", "4"]
    for mode in ("data", "sae"):
        done = _torchrun(*common, "--parallel", mode, "--out", str(tmp_path / mode))
        assert done.returncode == 0, done.stdout + done.stderr
    from saescope.cli import main

    assert main(["-q", "train", *common, "--data-parts", "2", "--out", str(tmp_path / "one")]) == 0
    one, sharded, data = (_weights(tmp_path / d) for d in ("one", "sae", "data"))
    assert len(one) == 2
    for name, state in one.items():
        for key, value in state.items():
            torch.testing.assert_close(sharded[name][key], value, rtol=0, atol=0, msg=f"{name} {key}")
            torch.testing.assert_close(data[name][key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")


def test_data_parts_fix_the_rank_counts_a_run_can_use(store, tmp_path):
    cfg = TrainConfig(store=str(store), saes=[SAESpec(sites=["resid.0"], widths=[16], lambdas=[1e-2, 2e-2, 3e-2])],
                      tokens=20 * 240, batch_size=240, checkpoint_every=10, parallel=ParallelConfig(data_parts=2))
    train(cfg, tmp_path / "run", progress=False)
    three = Ranks(rank=0, world=3)  # the checks come before any collective
    with pytest.raises(SaescopeError, match=r"the checkpoint of step 20 .* was made of 2 data parts, which 3 ranks "
                                            r"cannot share evenly; use a number of ranks that divides 2, or SAE-sharded"):
        trainer_for(cfg.model_copy(update={"parallel": ParallelConfig()}), tmp_path / "run", ranks=three)
    sharded = ParallelConfig(mode="sae")  # reading a store, each rank reads every part: any count
    assert trainer_for(cfg.model_copy(update={"parallel": sharded}), tmp_path / "run", ranks=three).parts == 2
    with pytest.raises(SaescopeError, match="holds a run with 2 data parts; a run keeps its data parts"):
        trainer_for(cfg.model_copy(update={"parallel": ParallelConfig(data_parts=4)}), tmp_path / "run")
    with pytest.raises(SaescopeError, match="batch_size 240 does not split into 7 equal data parts"):
        trainer_for(cfg.model_copy(update={"parallel": ParallelConfig(data_parts=7)}), tmp_path / "fresh")
    with pytest.raises(SaescopeError, match=r"has 6 shards, fewer than the 8 data parts"):
        ActivationStore(store).part(0, 8)
    with pytest.raises(SaescopeError, match="SAE-sharded training of 3 SAEs cannot use 4 ranks"):
        trainer_for(cfg.model_copy(update={"parallel": ParallelConfig(mode="sae", data_parts=4)}), tmp_path / "fresh",
                ranks=Ranks(rank=0, world=4))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(SaescopeError, match="checkpoint of an earlier saescope"):
        trainer_for(cfg, tmp_path / "old")


def test_data_parts_split_every_source_disjointly(store):
    whole = ActivationStore(store)
    parts = [whole.part(p, 3) for p in range(3)]
    assert [v._pool for v in parts] == [[0, 3], [1, 4], [2, 5]] and sum(v.n_rows() for v in parts) == whole.n_rows()
    assert all(v.norm_scalar("resid.0") == whole.norm_scalar("resid.0") for v in parts)
    x = torch.arange(10.0).view(5, 2)
    src = TensorSource({"resid.0": x})
    assert src.part(1, 2).acts["resid.0"].tolist() == [[2.0, 3.0], [6.0, 7.0]]
    assert src.part(1, 2).norm_scalar("resid.0") == src.norm_scalar("resid.0") and src.part(0, 1) is src


def test_sharding_balances_sizes_and_keeps_sites_together():
    members = [("a", frozenset({"resid.0"}), 100), ("b", frozenset({"resid.0"}), 50), ("c", frozenset({"resid.1"}), 50),
               ("d", frozenset({"resid.1"}), 10), ("e", frozenset({"resid.0"}), 40)]
    assert assign(members, 2) == [["a", "e"], ["b", "c", "d"]]  # e joins a (both read resid.0) on a tie
    assert sorted(sum(assign(members, 3), [])) == list("abcde")
    assert assign(members, 1) == [["a", "b", "c", "e", "d"]]


def test_the_whole_pipeline_under_torchrun(run_config, tmp_path):
    """`saescope run` on two ranks: rank 0 harvests, both train (sharded here), rank 0 evaluates and reports."""
    run_config.write_text(run_config.read_text().replace("[eval]", "[train.parallel]\nmode = \"sae\"\n\n[eval]"))
    done = _torchrun("--config", str(run_config), "--out", str(tmp_path / "out"), command="run")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("report:") == 1
    records = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(records) == 6 and (tmp_path / "out" / "features.db").is_file()
    state = json.loads((tmp_path / "out" / "train" / "checkpoint" / "state.json").read_text())
    assert (state["ranks"], state["mode"]) == (2, "sae")
    assert ActivationStore(tmp_path / "out" / "activations").n_shards >= 2  # a shard per rank, had they been data-parallel


MULTI = """
store = "{store}"
tokens = 10240
batch_size = 256
optimizer = "adam"      # signum's sign of a near-zero gradient tips with the ranks' summation order
lr_scale = "none"
lr = 1e-3
checkpoint_every = 10
log_every = 5
dead_tokens = 512

[[saes]]                # trained as BatchTopK over every rank's latents, converted per group
sites = ["mlp_in.0", "mlp_in.1", "mlp_in.2"]
clt = true
widths = [16]
target_l0 = [3]

[[saes]]                # JumpReLU as itself: the quadratic penalty reads the summed firing count
sites = ["mlp_in.0", "mlp_in.1", "mlp_in.2"]
clt = true
widths = [16]
target_l0 = [3]
train_as = "jumprelu"
dead_aux = 0.03
threshold_init = "constant"  # a quantile θ sits on a pre-activation, where rounding decides

[[saes]]                # TopK per token over every rank's latents, AuxK over every rank's dead ones
sites = ["resid.0", "resid.2"]
crosscoder = true
arch = "topk"
widths = [16]
ks = [3]

[[saes]]                # a single-layer SAE beside them, on one rank
sites = ["resid.0"]
widths = [16]
lambdas = [1e-2]
"""


@pytest.fixture(scope="module")
def layered_store(tmp_path_factory) -> Path:
    """Three layers' MLP inputs and outputs and two residual sites, 3,000 rows."""
    root = tmp_path_factory.mktemp("layered") / "store"
    g = torch.Generator().manual_seed(5)
    sites = {f"mlp_in.{i}": 8 for i in range(3)} | {f"mlp.{i}": 6 for i in range(3)} | {"resid.0": 8, "resid.2": 8}
    writer = StoreWriter(root, model="toy", sites=sites, dtype="float32", seq_len=50, corpus={"source": "toy"},
                         special_ids=[0])
    for _ in range(6):
        writer.begin_shard(torch.randint(1, 100, (10, 50), generator=g))
        x = [torch.randn(500, 8, generator=g) * (i + 1) + i for i in range(3)]
        writer.append({**{f"mlp_in.{i}": x[i] for i in range(3)},
                       **{f"mlp.{i}": (x[i][:, :6] + x[0][:, 2:] * (i > 0)).tanh() * 3 for i in range(3)},
                       "resid.0": x[0] * 2, "resid.2": x[0] + x[2]})
        writer.commit_shard()
    writer.finish()
    return root


def test_multi_layer_dictionaries_split_over_ranks_train_as_one_process(layered_store, tmp_path):
    """Each rank holds half of every group's latents; the two ranks' run equals one process's within
    float rounding (the writes are summed across ranks in another order), its checkpoint holds
    each whole dictionary once, and a data-parallel job is refused in one line."""
    from saescope import load_dictionary

    config = tmp_path / "multi.toml"
    config.write_text(MULTI.format(store=layered_store))
    train(config_from_file(TrainConfig, config), tmp_path / "one", progress=False)
    done = _torchrun("--config", str(config), "--parallel", "sae", "--out", str(tmp_path / "two"))
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(p.name for p in (tmp_path / "one" / "saes").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two" / "saes").iterdir()) and len(names) == 4
    for name in names:
        one, two = load_dictionary(tmp_path / "one" / "saes" / name), load_dictionary(tmp_path / "two" / "saes" / name)
        assert one.cfg.d_sae == two.cfg.d_sae == 16
        for key, value in one.state_dict().items():
            torch.testing.assert_close(two.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
    assert sorted(p.stem for p in (tmp_path / "two" / "checkpoint").glob("step-*/*.pt")) == names
    lines = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["sae"], r["step"]) for r in lines] == [(r["sae"], r["step"]) for r in ones]
    for a, b in zip(lines, ones):
        assert a["l0"] == pytest.approx(b["l0"], rel=1e-4) and a["dead_fraction"] == pytest.approx(b["dead_fraction"])
    done = _torchrun("--config", str(config), "--out", str(tmp_path / "dp"), timeout=120)
    assert done.returncode != 0 and "set parallel.mode = 'sae'" in done.stderr
