"""Telemetry inside `nnperf train` and `nnperf devices`."""

import json
import os
import signal
import sys
import threading

import pytest
import torch

from nnperf.telemetry import backends as registry

from conftest import TINY
from fake_vendor import fake_pynvml
from test_telemetry_sampler import FakeBackend


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_records_telemetry_per_phase(run_cli, tmp_path):
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--telemetry-interval", "0.05", "--name", "t",
                             "--synthetic-size", "1024")
    assert code == 0, err
    tel = tmp_path / "runs" / "t" / "telemetry"
    train = _rows(tel / "train_epoch.jsonl")
    assert train and {r["phase"] for r in train} == {"train"} and {r["epoch"] for r in train} <= {1, 2}
    assert all(r["backend"] == "cpu" and r["device"] == "cpu" and "cpu_util_pct" in r for r in train)
    assert "proc_rss_mb" in train[0]  # memory is read once a second, the first sample included
    assert sorted(p.name for p in tel.iterdir()) in (["train_epoch.jsonl"], ["train_epoch.jsonl", "val_epoch.jsonl"])
    env = json.loads((tmp_path / "runs/t/env.json").read_text())
    assert env["telemetry"]["enabled"] and env["telemetry"]["backends"][0]["name"] == "cpu"
    # This machine has no readable energy counter or power sensor: no energy anywhere, not a 0.
    metrics = _rows(tmp_path / "runs/t/metrics.jsonl")
    assert not any("energy_j" in r for r in metrics) and env["telemetry"]["energy_method"] == {}
    assert not [t for t in threading.enumerate() if t.name == "nnperf-sampler"]


def test_energy_per_epoch_reaches_metrics(run_cli, tmp_path, monkeypatch):
    joules = iter(range(0, 10**9, 7))
    gpu = FakeBackend(values=lambda n: {"power_w": 70.0, "energy_j": float(next(joules))})
    monkeypatch.setattr(registry, "for_device", lambda dev, warn=None: [gpu])
    code, _, err = run_cli("train", *TINY, "--epochs", "2", "--telemetry-interval", "0.05", "--name", "e",
                           "--synthetic-size", "2048")
    assert code == 0, err
    metrics = [r for r in _rows(tmp_path / "runs/e/metrics.jsonl") if r["phase"] == "train"]
    assert all(r["energy_j"] > 0 and r["energy_j"] % 7 == 0 for r in metrics)
    assert all(r["energy_by_device_j"] == {"cuda:0": r["energy_j"]} for r in metrics)
    env = json.loads((tmp_path / "runs/e/env.json").read_text())
    assert env["telemetry"]["energy_method"] == {"cuda:0": "energy counter differences"}


def test_no_telemetry(run_cli, tmp_path):
    assert run_cli("train", *TINY, "--epochs", "1", "--no-telemetry", "--name", "n")[0] == 0
    assert not (tmp_path / "runs/n/telemetry").exists()
    assert json.loads((tmp_path / "runs/n/env.json").read_text())["telemetry"] == {"enabled": False}


def test_bad_interval_is_one_line(run_cli):
    code, _, err = run_cli("train", *TINY, "--telemetry-interval", "0.01")
    assert code == 2 and "--telemetry-interval" in err and len(err.strip().splitlines()) == 1


def test_a_failing_backend_never_stops_training(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "for_device", lambda dev, warn=None: [FakeBackend(fail=1)])
    code, out, err = run_cli("train", *TINY, "--epochs", "2", "--telemetry-interval", "0.05", "--name", "f",
                             "--synthetic-size", "1024")
    assert code == 0 and out.splitlines()[-1].startswith("FINAL")


def test_sampler_stops_when_a_signal_stops_training(run_cli, tmp_path, monkeypatch):
    from nnperf.train import step as step_module

    real = step_module.TrainStep.__call__
    calls = {"n": 0}

    def step(self, x, y):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, x, y)

    monkeypatch.setattr(step_module.TrainStep, "__call__", step)
    code, _, _ = run_cli("train", *TINY, "--epochs", "2", "--telemetry-interval", "0.05", "--name", "s")
    assert code == 128 + signal.SIGTERM
    assert not [t for t in threading.enumerate() if t.name == "nnperf-sampler"]


def test_devices_on_this_machine(run_cli):
    code, out, _ = run_cli("devices")
    assert code == 0
    assert out.startswith("cpu [CPU]") and "cpu       records cpu_util_pct" in out


def test_devices_with_a_faked_nvidia_gpu(run_cli, monkeypatch):
    nv = fake_pynvml(unsupported={"nvmlDeviceGetTotalEnergyConsumption"})
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    monkeypatch.setattr(torch.version, "hip", None)
    from nnperf.telemetry.backends import torch_mem
    monkeypatch.setattr(torch_mem.TorchMemBackend, "sample", lambda self: {"torch_mem_alloc_mb": 1.0})
    monkeypatch.setattr(torch_mem.TorchMemBackend, "metrics",
                        lambda self: (["torch_mem_alloc_mb", "torch_mem_reserved_mb", "torch_max_mem_alloc_mb"], {}))
    code, out, _ = run_cli("devices")
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0] == "cuda:0 [CUDA] Tesla T4"
    assert lines[1].startswith("  nvml      records gpu_util_pct, mem_util_pct") and "power_w" in lines[1]
    assert "no energy_j: not supported by this GPU or driver (Not Supported)" in out
    assert "torch     records torch_mem_alloc_mb" in out


def test_backend_choice_prefers_the_vendor_library(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.1.40091")
    names = [name for name, _, _ in registry.candidates(torch.device("cuda", 0))]
    assert names == ["amdsmi", "rocm-smi", "amd-smi", "torch", "cpu"]
    monkeypatch.setattr(torch.version, "hip", None)
    assert [n for n, _, _ in registry.candidates(torch.device("cuda", 0))] == ["nvml", "torch", "cpu"]
    assert [n for n, _, _ in registry.candidates(torch.device("cpu"))] == ["cpu"]


def test_devices_with_a_source_that_fails_is_a_line_of_the_report(run_cli, monkeypatch):
    from nnperf.telemetry.backends import cpu

    def broken(self):
        raise TimeoutError("rocm-smi did not answer within 5 s")

    monkeypatch.setattr(cpu.CpuBackend, "metrics", broken)
    code, out, err = run_cli("devices")
    assert code == 0, err
    assert "cpu       failed: TimeoutError: rocm-smi did not answer" in out
