"""`nnperf profile`: warm-up then exactly one captured step, its NVTX/profiler marks, RUN/profile/."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from nnperf import models
from nnperf.perf import flops, profile
from nnperf.train.step import TrainStep

from conftest import TINY

# 192 images in batches of 32: 6 batches an epoch.
PER_EPOCH = 6


@pytest.fixture
def steps(monkeypatch):
    """The training steps taken, in order, as "train_step" entries of a shared event log."""
    log: list[str] = []
    real = TrainStep.__call__

    def counted(self, x, y):
        log.append("train_step")
        return real(self, x, y)

    monkeypatch.setattr(TrainStep, "__call__", counted)
    return log


@pytest.fixture
def fake_cuda_tools(monkeypatch, steps):
    """NVTX and cudaProfilerStart/Stop recorded at their API boundary, on a run that takes the
    device for CUDA (the tensors stay on the CPU)."""
    monkeypatch.setattr(profile, "uses_nvidia_tools", lambda dev: True)
    monkeypatch.setattr(torch.cuda.nvtx, "range_push", lambda name: steps.append(f"push:{name}"))
    monkeypatch.setattr(torch.cuda.nvtx, "range_pop", lambda: steps.append("pop"))
    monkeypatch.setattr(torch.cuda.profiler, "start", lambda: steps.append("start"))
    monkeypatch.setattr(torch.cuda.profiler, "stop", lambda: steps.append("stop"))
    return steps


MARKED_STEP = ["start", "push:step", "train_step", "push:forward", "pop", "push:backward", "pop",
               "push:optimizer", "pop", "pop", "stop"]


def test_profile_captures_step_n_plus_k_across_epochs_and_writes_the_tables(run_cli, steps):
    code, out, err = run_cli("profile", *TINY, "--epochs", "2", "--warmup-iters", PER_EPOCH, "--profile-iter", 2,
                             "--name", "p")
    assert code == 0, err
    assert steps == ["train_step"] * (PER_EPOCH + 2)  # 6 warm-up, 1 more, the captured one; nothing after
    assert "capturing epoch 2, batch 2 of 6 (global step 8)" in out
    top = out.split("top ops by self CPU time:\n")[1].split("\nNsight")[0].splitlines()
    ms = [float(line.split()[-5]) for line in top]  # '<name, may hold spaces> <ms> ms <share>%  <n> calls'
    assert len(top) == profile.TOP_OPS and ms == sorted(ms, reverse=True)
    assert not {line.split()[0] for line in top} & {"step", "forward", "backward", "optimizer", "module:"}
    folder = Path("runs/p/profile")
    trace = json.loads(gzip.decompress((folder / "trace.json.gz").read_bytes()))
    names = [e.get("name") for e in trace["traceEvents"]]
    assert {"step", "forward", "backward", "optimizer"} <= set(names)
    assert any(n.startswith("aten::convolution") for n in names if n)
    with open(folder / "key_averages.csv") as f:
        ops = list(csv.DictReader(f))
    self_cpu = [float(r["self_cpu_us"]) for r in ops]
    assert self_cpu == sorted(self_cpu, reverse=True) and self_cpu[0] > 0
    assert "Self CPU" in (folder / "key_averages.txt").read_text()
    with open(folder / "modules.csv") as f:
        modules = {r["module"]: r for r in csv.DictReader(f)}
    assert {"features", "head"} <= set(modules)
    assert float(modules["features"]["forward_cpu_us"]) > 0 and float(modules["features"]["backward_cpu_us"]) > 0
    # FLOPs per module are FlopCounterMode's, backward included (torch.profiler counts no FLOPs for
    # convolution_backward and counts an autocast convolution twice).
    counted = flops.step_flops(models.build("small_cifar", 3, 10, 16, width=8), (32, 3, 16, 16), 10).by_module
    for name in ("features", "head"):
        assert int(modules[name]["forward_flops"]) == counted[name]["forward"] > 0
        assert int(modules[name]["backward_flops"]) == counted[name]["backward"] > 0
    assert json.loads((folder / "profile.json").read_text())["captured"]["global_step"] == 8
    # A run directory of its own that reruns the profile, with no training in it.
    assert Path("runs/p/config.yaml").is_file() and not Path("runs/p/metrics.jsonl").exists()
    assert not list(Path("runs/p/checkpoints").iterdir())
    assert "nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -o runs/p/profile/nsys nnperf " \
           "profile" in out
    assert 'ncu --nvtx --nvtx-include "step/" --set full -o runs/p/profile/ncu nnperf profile' in out


def test_nvtx_ranges_and_cuda_profiler_wrap_only_the_captured_step(run_cli, fake_cuda_tools):
    code, out, err = run_cli("profile", *TINY, "--epochs", "1", "--warmup-iters", 2, "--profile-iter", 2,
                             "--name", "p")
    assert code == 0, err
    # Three steps, then the NVTX probe, then the captured step marked and bracketed.
    assert fake_cuda_tools == ["train_step"] * 3 + ["push:nnperf", "pop"] + MARKED_STEP
    assert "not used on" not in out


def test_without_nvtx_the_capture_goes_on_with_one_line(run_cli, fake_cuda_tools, monkeypatch):
    def broken(name):
        raise RuntimeError("NVTX functions not installed. Are you sure you have a CUDA build?")

    monkeypatch.setattr(torch.cuda.nvtx, "range_push", broken)
    code, out, err = run_cli("profile", *TINY, "--epochs", "1", "--warmup-iters", 0, "--name", "p")
    assert code == 0, err
    assert out.count("NVTX: unavailable in this torch build (NVTX functions not installed") == 1
    assert fake_cuda_tools == ["start", "train_step", "stop"]
    assert Path("runs/p/profile/trace.json.gz").is_file()


class _FakeNvtx:
    def __init__(self):
        self.calls: list[str] = []

    def range_push(self, name):
        self.calls.append(f"push:{name}")

    def range_pop(self):
        self.calls.append("pop")


def test_step_marks_close_backward_when_no_update_and_ignore_a_second_forward():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    nvtx = _FakeNvtx()
    x = torch.randn(3, 4)
    with profile.StepMarks(model, optimizer, nvtx):  # an fp16 step the scaler skipped: no optimizer step
        model(x).sum().backward()
    assert nvtx.calls == ["push:step", "push:forward", "pop", "push:backward", "pop", "pop"]
    nvtx.calls.clear()
    with profile.StepMarks(model, optimizer, nvtx) as marks:  # SAM: a second pass inside the optimizer step
        model(x).sum().backward()
        optimizer.register_step_pre_hook(lambda *a: model(x).sum().backward())
        optimizer.step()
    assert nvtx.calls == ["push:step", "push:forward", "pop", "push:backward", "pop", "push:optimizer", "pop", "pop"]
    assert marks.open == [] and not model._forward_hooks and not model._forward_pre_hooks


def test_a_training_run_is_refused_and_profiled_only_through_its_checkpoint(run_cli, steps):
    assert run_cli("train", *TINY, "--epochs", "1", "--max-steps", "2", "--name", "r")[0] == 0
    run = Path("runs/r")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_cli("profile", *TINY, "--name", "r", "--overwrite")
    assert code == 2 and "runs/r holds a training run; nnperf profile never replaces one" in err
    steps.clear()
    code, out, err = run_cli("profile", "--resume", "runs/r/checkpoints/last.pt", "--warmup-iters", 1)
    assert code == 0, err
    assert steps == ["train_step"] * 2 and "(global step 4)" in out  # from the checkpoint's step 2
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "profile" not in p.parts}
    assert after == before  # checkpoints, metrics, config and env untouched
    assert (run / "profile" / "modules.txt").is_file()


def test_an_earlier_profile_of_the_same_name_is_replaced(run_cli):
    assert run_cli("profile", *TINY, "--epochs", "1", "--warmup-iters", 0, "--name", "p")[0] == 0
    Path("runs/p/profile/old.txt").write_text("earlier")
    code, _, err = run_cli("profile", *TINY, "--epochs", "1", "--warmup-iters", 1, "--name", "p")
    assert code == 0, err
    assert not Path("runs/p/profile/old.txt").exists()
    assert json.loads(Path("runs/p/profile/profile.json").read_text())["warmup_iters"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--warmup-iters", "-1"], "--warmup-iters -1: must be 0 or more"),
    (["--profile-iter", "0"], "--profile-iter 0: must be 1 or more"),
    (["--warmup-iters", "6", "--epochs", "1"], "--warmup-iters 6 --profile-iter 1: the capture would be step 7, "
                                               "but an epoch has 6 batches and --epochs 1 makes 6 steps;"),
])
def test_bad_counts_are_one_line_and_leave_nothing(run_cli, flags, message):
    code, out, err = run_cli("profile", *TINY, *flags, "--name", "p")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not Path("runs/p").exists()


def test_a_torch_without_the_profiler_is_one_line(run_cli, monkeypatch):
    monkeypatch.setattr(torch.profiler, "supported_activities", lambda: set())
    code, _, err = run_cli("profile", *TINY, "--name", "p")
    assert code == 1 and "torch.profiler is unavailable in this torch build" in err
    assert not Path("runs/p").exists()


def test_under_nsight_torch_profiler_leaves_the_gpu_to_it(monkeypatch):
    everything = {torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA}
    monkeypatch.setattr(torch.profiler, "supported_activities", lambda: everything)
    cuda = torch.device("cuda")
    assert profile.profiler_activities(cuda, {}) == [torch.profiler.ProfilerActivity.CPU,
                                                     torch.profiler.ProfilerActivity.CUDA]
    assert profile.profiler_activities(cuda, {"CUDA_INJECTION64_PATH": "/x/libToolsInjection64.so"}) == [
        torch.profiler.ProfilerActivity.CPU]
    monkeypatch.setattr(torch.profiler, "supported_activities", lambda: {torch.profiler.ProfilerActivity.CPU})
    with pytest.raises(profile.EnvError, match="cannot trace cuda kernels"):
        profile.profiler_activities(cuda, {})


def test_the_command_line_is_the_users_quoted_with_the_name_pinned():
    import argparse

    from nnperf import config as configs

    ns = argparse.Namespace(config=None, warmup_iters=5, profile_iter=1)
    cfg = configs.build({}, {"dataset": "synthetic", "name": "n1"})
    argv = ["/venv/bin/nnperf", "profile", "--dataset", "synthetic", "--data", "my data"]
    assert profile.command_line(ns, {"dataset": "synthetic"}, cfg, argv) == \
        "nnperf profile --dataset synthetic --data 'my data' --name n1"
    given = {"dataset": "synthetic", "data": "my data", "name": "n1", "amp": False}
    assert profile.command_line(ns, given, cfg, ["pytest", "-q"]) == \
        "nnperf profile --dataset synthetic --data 'my data' --name n1 --no-amp --warmup-iters 5 --profile-iter 1"
