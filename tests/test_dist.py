"""Several processes, one run (torchrun / DDP, Gloo on this CPU): sharding, sums, launcher checks."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nnperf import data
from nnperf.data.sources import Split, make_synthetic
from nnperf.train import dist, launch, syncbn

from conftest import TINY

AUGMENTS = [data.Augment(crop=True, flip="random", pad=2), data.Augment(crop=True, flip="alternate", pad=2, cutout=4)]


def _split(n: int = 70) -> Split:
    return Split(*make_synthetic(n, 10, 3, 12, seed=3))


@pytest.mark.parametrize("augment", AUGMENTS)
def test_the_ranks_rows_together_are_one_process_s_batch(augment):
    """Every global batch, the last short one too: the ranks' rows in rank order are the single
    process's batch, pixel for pixel (crops, flips and cutout drawn for the whole batch)."""
    split = _split()
    one = data.Batches(split, 16, torch.device("cpu"), [0.5] * 3, [0.25] * 3, shuffle=True, augment=augment, seed=7)
    for world in (2, 3):
        ranks = [data.Batches(split, 16, torch.device("cpu"), [0.5] * 3, [0.25] * 3, shuffle=True, augment=augment,
                              seed=7, shard=data.Shard(r, world)) for r in range(world)]
        for epoch in (0, 1):
            whole = list(one.epoch(epoch))
            parts = [list(b.epoch(epoch)) for b in ranks]
            assert all(len(p) == len(whole) == 5 for p in parts)  # 70 images, batch 16: the last holds 6
            for step, (x, y) in enumerate(whole):
                assert torch.equal(torch.cat([p[step][0] for p in parts]), x)
                assert torch.equal(torch.cat([p[step][1] for p in parts]), y)
                assert sum(len(p[step][1]) for p in parts) == one.global_rows(step)


def test_evaluation_shards_are_whole_batches():
    split = _split()
    one = list(data.Batches(split, 16, torch.device("cpu"), [0.5] * 3, [0.25] * 3).epoch(0))
    ranks = [list(data.Batches(split, 16, torch.device("cpu"), [0.5] * 3, [0.25] * 3,
                               shard=data.Shard(r, 2, whole_batches=True)).epoch(0)) for r in range(2)]
    assert [len(r) for r in ranks] == [3, 2]
    for step, (x, y) in enumerate(one):
        got = ranks[step % 2][step // 2]
        assert torch.equal(got[0], x) and torch.equal(got[1], y)


def test_the_loss_weight_makes_ddp_s_mean_the_global_batch_s():
    # A last batch of 5 images split 2 + 3. DDP's gradient is (1/2) sum_r w_r * (1/s_r) sum_i grad(loss_i):
    # every image's loss must count 1/5, as in one process's mean over the batch.
    for rank, rows in ((0, 2), (1, 3)):
        w = dist.loss_weight(dist.World(rank, rank, 2, 2), rows, 5)
        assert w / (2 * rows) == pytest.approx(1 / 5)
    assert dist.loss_weight(dist.SINGLE, 7, 9) == 1.0


def test_world_from_torchrun_s_environment(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert dist.from_env() is dist.SINGLE
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    w = dist.from_env()
    assert (w.rank, w.local_rank, w.size, w.local_size, w.main, w.many) == (3, 1, 4, 2, False, True)
    assert data.Shard(w.rank, w.size).rows(10) == slice(7, 10)
    assert dist.backend_for(torch.device("cpu")) == "gloo" and dist.backend_for(torch.device("cuda", 0)) == "nccl"


def test_without_nproc_keeps_everything_else():
    argv = ["train", "--nproc", "2", "--model", "x", "--max-restarts=1", "--nproc=3", "--name", "--nproc-like"]
    assert launch.without_nproc(argv) == ["train", "--model", "x", "--name", "--nproc-like"]


@pytest.mark.parametrize("args, message", [
    (["--sync-bn"], "--sync-bn: needs several processes"),
    (["--nproc", "2", "--batch-size", "33"], "--batch-size 33: the global batch must divide among 2 processes; use 32 or 34"),
    (["--nproc", "4096"], "--nproc 4096: this machine has"),
    (["--nproc", "0"], "--nproc 0: must be 1 or more"),
    (["--max-restarts", "2"], "--max-restarts: only with --nproc N"),
    (["--nproc", "2", "--jit", "trace"], "--jit trace: DistributedDataParallel"),
])
def test_bad_distributed_settings_are_one_line(run_cli, tmp_path, args, message, monkeypatch):
    if "--jit" in args:  # checked in each process: pretend to be one
        monkeypatch.setattr(launch, "start", lambda *a, **k: _as_rank_of_two(run_cli, a[1], monkeypatch))
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "r", *[a for a in args])
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs" / "r").exists()


def _as_rank_of_two(run_cli, argv, monkeypatch) -> int:
    monkeypatch.setenv(launch.LAUNCHED, "test")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    code, out, err = run_cli(*launch.without_nproc(argv))
    print(err, file=sys.stderr, end="")
    return code


# ---- two real processes (Gloo) ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _in_group(rank: int, world: int, port: int, fn, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(dist.World(rank, rank, world, world, "h", "gloo"))
        torch.save(result, f"{out}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _run_two(fn, tmp_path: Path) -> list:
    out = str(tmp_path / "result")
    mp.spawn(_in_group, args=(2, _free_port(), fn, out), nprocs=2, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]


def _evaluate_shard(world: dist.World) -> dict:
    from nnperf import device as devices
    from nnperf.models import build
    from nnperf.train.step import evaluate

    torch.manual_seed(0)
    model = build("small_cifar", 3, 10, 12, width=8)
    batches = data.Batches(_split(), 16, torch.device("cpu"), [0.5] * 3, [0.25] * 3,
                           shard=data.Shard(world.rank, world.size, whole_batches=True))
    return evaluate(model, batches, torch.device("cpu"), devices.Precision("fp32", ""), world=world)


def test_sharded_evaluation_equals_one_process(tmp_path):
    both = _run_two(_evaluate_shard, tmp_path)
    one = _evaluate_shard(dist.SINGLE)
    for got in both:
        assert got["images"] == one["images"] == 70
        assert (got["top1"], got["top5"]) == (one["top1"], one["top5"])  # counts: exact
        assert got["loss"] == pytest.approx(one["loss"], rel=1e-12)  # float64 sums added in another order


def _sync_bn_step(world: dist.World) -> dict:
    """One forward+backward of BatchNorm over the rank's rows of a batch of 8."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    if world.many:
        bn = syncbn.convert(bn, torch.device("cpu"))
    rows = data.Shard(world.rank, world.size).rows(8)
    mine = x[rows].clone().requires_grad_()
    y = bn(mine)
    (y * torch.arange(1.0, 5.0).view(1, 4, 1, 1)).sum().backward()
    return {"y": y.detach(), "dx": mine.grad, "dw": bn.weight.grad * 1.0, "mean": bn.running_mean,
            "var": bn.running_var}


def test_all_reduce_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    one = _sync_bn_step(dist.SINGLE)
    both = _run_two(_sync_bn_step, tmp_path)
    assert torch.allclose(torch.cat([b["y"] for b in both]), one["y"], atol=1e-5)
    assert torch.allclose(torch.cat([b["dx"] for b in both]), one["dx"], atol=1e-5)
    # Each rank's weight gradient is its rows' share; DDP would add them.
    assert torch.allclose(both[0]["dw"] + both[1]["dw"], one["dw"], atol=1e-4)
    for b in both:
        assert torch.allclose(b["mean"], one["mean"], atol=1e-6) and torch.allclose(b["var"], one["var"], atol=1e-5)


# ---- the real launcher: nnperf train --nproc 2 ---------------------------------------------------

def _final(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "final_weights.pt", weights_only=True)


@pytest.mark.parametrize("extra", [[], ["--freeze-epochs", "1"]], ids=["plain", "frozen-first-epoch"])
def test_two_processes_train_as_one_does(run_cli, tmp_path, extra):
    """2 ranks with the global batch against 1 process, fp32, --sync-bn: the same images per step
    (the shard test above), and losses and final weights equal up to the order in which float sums
    are added (DDP adds the two halves' gradients; one process sums over the batch at once). With a
    frozen first epoch DDP is made again when the backbone thaws: its gradients are averaged too."""
    common = [*TINY, "--epochs", "2", "--precision", "fp32", "--no-channels-last", "--no-telemetry", "--no-report",
              *extra]
    code, out, err = run_cli("train", *common, "--name", "one")
    assert code == 0, err
    code, out, err = run_cli("train", *common, "--name", "two", "--nproc", "2", "--sync-bn")
    assert code == 0, err
    one, two = tmp_path / "runs" / "one", tmp_path / "runs" / "two"
    a, b = _final(one), _final(two)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=2e-4, rtol=1e-3), k
    rows = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two)]
    for r1, r2 in zip(*rows):
        assert (r1["phase"], r1["epoch"], r1.get("images")) == (r2["phase"], r2["epoch"], r2.get("images"))
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-3)
    env = json.loads((two / "env.json").read_text())
    assert env["distributed"]["world_size"] == 2 and env["distributed"]["backend"] == "gloo"


# ---- signals, a lost rank, restarts: the real command in its own process ---------------------------

import signal  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import psutil  # noqa: E402

# 8 steps of 32 per epoch: long enough to stop in the middle of one.
LONG = [*TINY[:3], "256", *TINY[4:], "--precision", "fp32", "--no-channels-last", "--no-telemetry", "--no-report"]


def _start(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "nnperf", "train", *LONG, *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "NNPERF_CACHE": str(tmp_path / "cache")})


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert path.exists(), proc.communicate(timeout=60)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            if child.environ().get("RANK") == str(rank) and "nnperf" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no rank {rank} process")


def _weights_close(a: dict, b: dict, atol: float = 2e-4) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-3), k


def test_sigterm_stops_every_rank_after_the_same_step_then_resume_on_1_or_2(run_cli, tmp_path):
    code, out, err = run_cli("train", *LONG, "--epochs", "3", "--name", "full")
    assert code == 0, err
    proc = _start(tmp_path, "--epochs", "3", "--name", "cut", "--nproc", "2", "--sync-bn", "--save-every-steps", "3")
    _wait_for(tmp_path / "runs" / "cut" / "checkpoints" / "last.pt", proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume runs/cut/checkpoints/last.pt" in err and "Traceback" not in err
    state = torch.load(tmp_path / "runs/cut/checkpoints/last.pt", weights_only=True)
    assert 3 <= state["global_step"] < 24
    for name, more in (("one", []), ("two", ["--nproc", "2"])):
        code, out, err = run_cli("train", "--resume", "runs/cut/checkpoints/last.pt", "--name", name, *more)
        assert code == 0, err
        _weights_close(_final(tmp_path / "runs" / "full"), _final(tmp_path / "runs" / name))


def test_a_killed_rank_is_one_line_and_a_restart_finishes_the_run(run_cli, tmp_path):
    proc = _start(tmp_path, "--epochs", "40", "--name", "dies", "--nproc", "2", "--dist-timeout", "30")
    _wait_for(tmp_path / "runs" / "dies" / "metrics.jsonl", proc)
    started = time.time()
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert time.time() - started < 60 and proc.returncode != 0
    assert "rank 1" in err and "SIGKILL" in err and "Traceback" not in err, err

    code, out, err = run_cli("train", *LONG, "--epochs", "3", "--name", "whole", "--nproc", "2")
    assert code == 0, err
    proc = _start(tmp_path, "--epochs", "3", "--name", "restarted", "--nproc", "2", "--max-restarts", "1",
                  "--save-every-steps", "2")
    _wait_for(tmp_path / "runs" / "restarted" / "checkpoints" / "last.pt", proc)
    os.kill(_rank_pid(proc, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert "restart 1: continuing" in out
    _weights_close(_final(tmp_path / "runs" / "whole"), _final(tmp_path / "runs" / "restarted"), atol=1e-5)


def test_each_rank_writes_its_own_telemetry(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--name", "t", "--nproc", "2", "--no-report")
    assert code == 0, err
    run = tmp_path / "runs" / "t"
    for rank in (0, 1):
        rows = [json.loads(line) for line in (run / "telemetry" / f"rank{rank}" / "train_epoch.jsonl").read_text()
                .splitlines()]
        assert rows and all(r["rank"] == rank and r["host"] == socket.gethostname() for r in rows)
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert [r["rank"] for r in train["ranks"]] == [0, 1] and sum(r["images"] for r in train["ranks"]) == 192


@pytest.mark.slow
def test_a_hung_rank_makes_the_other_stop_after_the_timeout(tmp_path, request):
    """SIGSTOP rank 1: rank 0's next collective gives up after --dist-timeout with one line (the launcher
    then waits torchrun's 30 s before it kills the stopped rank)."""
    if "slow" not in (request.config.getoption("-m") or ""):  # pyproject deselects nothing by default
        pytest.skip("45 s: run with -m slow")
    proc = _start(tmp_path, "--epochs", "400", "--name", "hangs", "--nproc", "2", "--dist-timeout", "5")
    _wait_for(tmp_path / "runs" / "hangs" / "metrics.jsonl", proc)
    os.kill(_rank_pid(proc, 1), signal.SIGSTOP)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "rank 0 on" in err and "lost contact with the other processes" in err and "--dist-timeout 5s" in err
    assert "Traceback" not in err
