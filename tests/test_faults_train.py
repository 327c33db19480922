"""Training under faults that need more than one command: a NaN mid-run, --nan-policy skip, --max-steps
then resume, two quick Ctrl-C, a disk that fills up or turns read-only, a write that a crash left behind,
and a metric sink whose folder is unusable."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

import safety
from conftest import TINY
from test_cli import RESUMABLE, _same_run

QUIET = [*TINY, "--no-telemetry"]


def _weights(path: Path) -> dict:
    state = torch.load(path, weights_only=True)
    return state["model"] if "model" in state else state


def _all_finite(weights: dict) -> bool:
    return all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())


def _nan_at(monkeypatch, calls_with_nan: set[int]):
    """Make the training loss NaN on the given calls of the step (1-based)."""
    from nnperf.train import step as step_module

    real = step_module.TrainStep._loss
    calls = {"n": 0}

    def loss(self, x, y):
        out, logits = real(self, x, y)
        if self.model.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] in calls_with_nan:
                out = out * float("nan")
        return out, logits

    monkeypatch.setattr(step_module.TrainStep, "_loss", loss)


def _sigint_at_step(monkeypatch, step: int, times: int = 1):
    """Send SIGINT `times` times to this process as training step `step` (1-based) starts; returns a
    function that puts the real step back."""
    from nnperf.train import step as step_module

    real_step = step_module.TrainStep.__call__
    calls = {"n": 0}

    def step_then_signal(self, x, y):
        calls["n"] += 1
        if calls["n"] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, x, y)

    monkeypatch.setattr(step_module.TrainStep, "__call__", step_then_signal)
    return lambda: monkeypatch.setattr(step_module.TrainStep, "__call__", real_step)


def test_nan_stops_at_the_step_and_keeps_the_last_finite_best(run_cli, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {9})  # step 3 of epoch 2 (6 steps per epoch)
    code, out, err = run_cli("train", *QUIET, "--epochs", "3", "--name", "n")
    assert code == 3, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert "diverged at step 9 (epoch 2)" in lines[0] and "the training loss is nan" in lines[0]
    assert "last finite loss" in lines[0] and "at step 8" in lines[0] and "--lr 0.05" in lines[0]
    ckpt = tmp_path / "runs/n/checkpoints"
    best = torch.load(ckpt / "best.pt", weights_only=True)
    assert best["epoch"] == 1 and _all_finite(best["model"])
    assert torch.load(ckpt / "last.pt", weights_only=True)["global_step"] == 6
    assert not (ckpt / "final_weights.pt").exists()


def test_nan_in_the_first_epoch_leaves_no_half_made_run(run_cli, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2})
    code, _, err = run_cli("train", *QUIET, "--epochs", "2", "--name", "n")
    assert code == 3 and "diverged at step 2" in err and "no checkpoint was saved" in err
    assert not (tmp_path / "runs" / "n").exists()


def test_nan_policy_skip_counts_and_goes_on(run_cli, tmp_path, monkeypatch):
    _nan_at(monkeypatch, {2, 9, 10})
    code, out, err = run_cli("train", *QUIET, "--epochs", "2", "--name", "s", "--nan-policy", "skip")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "runs/s/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["phase"] == "train"]
    assert [r["skipped_steps"] for r in train] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert [r["images"] for r in train] == [160, 128]  # skipped batches are not counted
    assert _all_finite(_weights(tmp_path / "runs/s/checkpoints/final_weights.pt"))


def test_max_steps_then_resume_finishes_the_epoch_exactly(run_cli, tmp_path):
    assert run_cli("train", *RESUMABLE, "--epochs", "3", "--name", "full")[0] == 0
    code, out, err = run_cli("train", *RESUMABLE, "--epochs", "3", "--name", "part", "--max-steps", "8")
    assert code == 0, err
    state = torch.load(tmp_path / "runs/part/checkpoints/last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (1, 2, 8)  # mid epoch 2, kept
    best = torch.load(tmp_path / "runs/part/checkpoints/best.pt", weights_only=True)
    assert (best["epoch"], best["step"]) == (1, 0)  # the cut-short epoch 2 never competes for best.pt
    code, out, err = run_cli("train", "--resume", "runs/part/checkpoints/last.pt")  # --max-steps not carried
    assert code == 0, err
    assert torch.load(tmp_path / "runs/part/checkpoints/best.pt", weights_only=True)["step"] == 0  # whole epochs only
    assert torch.load(tmp_path / "runs/part/checkpoints/last.pt", weights_only=True)["global_step"] == 18
    _same_run(tmp_path / "runs" / "full", tmp_path / "runs" / "part")


def test_two_quick_ctrl_c_in_the_first_epoch_still_save(run_cli, tmp_path, monkeypatch):
    restore = _sigint_at_step(monkeypatch, 2, times=2)
    code, out, err = run_cli("train", *QUIET, "--epochs", "2", "--name", "c")
    assert code == 128 + signal.SIGINT, err
    assert "stopping after this step" in err and "Traceback" not in err
    state = torch.load(tmp_path / "runs/c/checkpoints/last.pt", weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)
    restore()
    assert run_cli("train", "--resume", "runs/c/checkpoints/last.pt")[0] == 0


def test_a_crashed_write_is_cleaned_up_when_the_run_resumes(run_cli, tmp_path):
    assert run_cli("train", *QUIET, "--epochs", "1", "--name", "t")[0] == 0
    ckpt = tmp_path / "runs/t/checkpoints"
    dead = ckpt / ".last.pt.999999999.abc123.nnperf-tmp"  # no process has this pid
    dead.write_bytes(b"half a checkpoint")
    alive = ckpt / f".last.pt.{os.getppid()}.abc123.nnperf-tmp"  # a live writer's file stays
    alive.write_bytes(b"being written")
    user = ckpt / ".notes.tmp"
    user.write_text("not ours")
    assert run_cli("train", "--resume", str(ckpt / "last.pt"), "--epochs", "2")[0] == 0
    assert not dead.exists() and alive.exists() and user.exists()


def test_an_unusable_tensorboard_folder_is_a_warning(run_cli, tmp_path):
    assert run_cli("train", *QUIET, "--epochs", "1", "--name", "tb")[0] == 0
    (tmp_path / "runs/tb/tb").write_text("a file where TensorBoard wants a folder")
    code, out, err = run_cli("train", "--resume", "runs/tb/checkpoints/last.pt", "--epochs", "2", "--tensorboard")
    assert code == 0, err
    assert "--tensorboard: could not start" in out + err
    assert "FINAL" in out


def test_disk_full_mid_run_is_one_line_and_the_checkpoint_survives(run_cli, tmp_path):
    disk = tmp_path / "disk"
    with safety.tmpfs(disk, "8m"):
        args = [*QUIET, "--width", "32", "--out-dir", str(disk), "--name", "r"]
        assert run_cli("train", *args, "--epochs", "1")[0] == 0
        last = disk / "r/checkpoints/last.pt"
        before = last.read_bytes()
        filler = safety.fill(disk, leave_bytes=64 << 10)  # room for metrics, not for a checkpoint
        code, out, err = run_cli("train", "--resume", str(last), "--epochs", "3")
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
        assert "no space left" in lines[0] and f"--resume {last}" in lines[0]
        assert last.read_bytes() == before
        assert not list(disk.rglob("*.nnperf-tmp"))
        filler.unlink()
        code, out, err = run_cli("train", "--resume", str(last), "--epochs", "3")
        assert code == 0, err


def test_read_only_out_dir_is_one_line(run_cli, tmp_path):
    disk = tmp_path / "ro"
    with safety.tmpfs(disk, "1m"):
        (disk / "mine.txt").write_text("keep")
        safety.remount(disk, read_only=True)
        code, out, err = run_cli("train", *QUIET, "--epochs", "1", "--out-dir", str(disk), "--name", "r")
        assert code == 1, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "read-only" in lines[0] and "Traceback" not in err
        assert sorted(p.name for p in disk.iterdir()) == ["mine.txt"]


def test_resume_a_ctrl_c_checkpoint_with_max_steps(run_cli, tmp_path, monkeypatch):
    restore = _sigint_at_step(monkeypatch, 2)
    assert run_cli("train", *QUIET, "--epochs", "2", "--name", "m")[0] == 128 + signal.SIGINT
    restore()
    code, out, err = run_cli("train", "--resume", "runs/m/checkpoints/last.pt", "--max-steps", "5")
    assert code == 0, err
    assert "FINAL top1" in out and "cut short by --max-steps" in out and "Traceback" not in err
    assert not (tmp_path / "runs/m/checkpoints/best.pt").exists()
    state = torch.load(tmp_path / "runs/m/checkpoints/last.pt", weights_only=True)
    assert (state["epoch"], state["step"], state["global_step"]) == (0, 5, 5)
    code, out, err = run_cli("train", "--resume", "runs/m/checkpoints/last.pt")
    assert code == 0, err
    assert torch.load(tmp_path / "runs/m/checkpoints/last.pt", weights_only=True)["global_step"] == 12


def test_out_of_memory_is_one_line_and_leaves_no_run(run_cli, tmp_path, monkeypatch):
    from nnperf.train import build

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 38654705664 bytes.")

    monkeypatch.setattr(build, "train_batches", no_memory)
    code, out, err = run_cli("train", *QUIET, "--epochs", "1", "--name", "m")
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "out of memory" in lines[0] and "--batch-size" in lines[0]
    assert not (tmp_path / "runs" / "m").exists()


def test_a_crashed_write_is_cleaned_up_when_plot_writes_there_again(run_cli, tmp_path):
    assert run_cli("train", *QUIET, "--epochs", "1", "--name", "p")[0] == 0
    out = tmp_path / "plots"
    out.mkdir()
    dead = out / ".summary.csv.999999999.abc123.nnperf-tmp"
    dead.write_bytes(b"half a table")
    assert run_cli("plot", "runs/p", "--out", str(out))[0] == 0
    assert not dead.exists() and (out / "summary.csv").is_file()
