"""The telemetry contract: what every backend class declares, how the registry uses only that, and the
sampler's own API (energy_window, describe), its writes at phase edges and its schedule of flushes."""

import inspect
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import torch

from nnperf.telemetry import Sampler
from nnperf.telemetry import backends as registry
from nnperf.telemetry import sampler as sampler_module
from nnperf.telemetry.backends.amdsmi import AmdSmiBackend
from nnperf.telemetry.backends.cpu import MB, CpuBackend
from nnperf.telemetry.backends.nvml import NvmlBackend
from nnperf.telemetry.backends.rocm_smi import AmdSmiCliBackend, RocmSmiBackend
from nnperf.telemetry.backends.torch_mem import TorchMemBackend
from nnperf.train import loop

from fake_vendor import fake_amdsmi, fake_pynvml
from test_telemetry_sampler import FakeBackend

ALL = [NvmlBackend, AmdSmiBackend, RocmSmiBackend, AmdSmiCliBackend, TorchMemBackend, CpuBackend]
ROOT = Path(__file__).resolve().parents[1]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.name)
def test_every_backend_class_declares_the_contract(cls):
    assert isinstance(cls.name, str) and cls.name
    assert isinstance(inspect.getattr_static(cls, "may_hang"), bool)
    assert isinstance(inspect.getattr_static(cls, "available"), classmethod)
    assert callable(cls.sample) and callable(cls.close)
    first = list(inspect.signature(cls.__init__).parameters)[1]
    assert first == "device"  # one constructor shape: cls(device)
    for dev in (torch.device("cpu"), torch.device("cuda", 0)):
        ok, why = cls.available(dev)
        assert isinstance(ok, bool) and isinstance(why, str) and why


def test_may_hang_says_which_backends_get_a_thread():
    assert not CpuBackend.may_hang and not TorchMemBackend.may_hang
    assert NvmlBackend.may_hang and AmdSmiBackend.may_hang and RocmSmiBackend.may_hang and AmdSmiCliBackend.may_hang


def test_the_sampler_threads_exactly_the_backends_that_may_hang(tmp_path):
    quick, blocking, unknown = FakeBackend("quick"), FakeBackend("blocking"), FakeBackend("unknown")
    quick.may_hang, blocking.may_hang = False, True  # unknown: a fake without the attribute may hang
    s = Sampler([quick, blocking, unknown], tmp_path, interval_s=0.05).start()
    try:
        threaded = {w.backend.name: w.thread is not None for w in s.workers}
    finally:
        s.stop()
    assert threaded == {"quick": False, "blocking": True, "unknown": True}


def test_vendor_backends_take_their_gpu_from_the_device():
    nv = fake_pynvml(uuids=("GPU-a", "GPU-b"))
    b = NvmlBackend(torch.device("cuda", 1), nv=nv)
    assert b.device == "cuda:1" and b.handle == ("handle", 1)
    assert AmdSmiBackend(torch.device("cuda", 1), lib=fake_amdsmi(bdfs=("0000:c1:00.0", "0000:c2:00.0"))).device == "cuda:1"
    tool = RocmSmiBackend(torch.device("cuda", 1), run=lambda *a, **k: None)
    assert tool.device == "cuda:1" and tool.index == 1 and "1" in tool.command
    assert AmdSmiCliBackend(torch.device("cuda"), run=lambda *a, **k: None).index == 0  # no index: the first
    assert TorchMemBackend(torch.device("cuda", 1)).device == "cuda:1"
    assert CpuBackend(torch.device("cuda", 1)).device == "cpu"  # the host side of any device


def test_vendor_backends_serve_their_device_type_only(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml())
    assert NvmlBackend.available(torch.device("cuda", 0))[0]
    for cls in (NvmlBackend, AmdSmiBackend, RocmSmiBackend, AmdSmiCliBackend):
        ok, why = cls.available(torch.device("cpu"))
        assert not ok and "only" in why
    assert not TorchMemBackend.available(torch.device("cpu"))[0]
    assert TorchMemBackend.available(torch.device("xpu", 0))[0]


def test_the_registry_asks_every_class_and_builds_each_from_the_device(monkeypatch):
    calls = []

    def fake(name, ok, vendor=False, fails=False):
        class Fake:
            may_hang = False

            def __init__(self, device):
                calls.append(("build", name, device))
                if fails:
                    raise RuntimeError("no driver")
                self.name, self.device = name, str(device)

            @classmethod
            def available(cls, device):
                calls.append(("available", name, device))
                return ok, f"{name} says {ok}"

            def sample(self):
                return {}

            def close(self):
                pass

        Fake.name = name
        return Fake

    lib, tool, later = fake("lib", True, fails=True), fake("tool", True), fake("later", True)
    off, host = fake("off", False), fake("host", True)
    monkeypatch.setattr(registry, "vendor_classes", lambda dev: [lib, tool, later])
    monkeypatch.setattr(registry, "classes", lambda dev: [lib, tool, later, off, host])
    dev = torch.device("cuda", 3)
    warnings = []
    chosen = registry.for_device(dev, warn=warnings.append)
    assert [b.name for b in chosen] == ["tool", "host"]  # the first vendor source that starts, then the rest
    assert {c[0] for c in calls if c[1] == "off"} == {"available"}  # asked, never built
    assert all(c[2] == dev for c in calls)
    assert warnings == ["backend lib could not start (no driver); skipped"]
    assert registry.candidates(dev)[3] == ("off", off, (False, "off says False"))


def test_the_registry_candidates_keep_their_order(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    assert registry.classes(torch.device("cuda", 0)) == [NvmlBackend, TorchMemBackend, CpuBackend]
    assert registry.classes(torch.device("xpu", 0)) == [TorchMemBackend, CpuBackend]
    assert registry.classes(torch.device("cpu")) == [CpuBackend]
    assert [type(b) for b in registry.for_device(torch.device("cpu"))] == [CpuBackend]


def test_energy_window_is_empty_when_unknown_and_the_meter_s_otherwise(tmp_path):
    counter = iter(range(1000, 10**6, 10))
    gpu = FakeBackend("gpu", values=lambda n: {"energy_j": float(next(counter))})
    host = FakeBackend("host", device="cpu", values=lambda n: {"cpu_util_pct": 5.0})
    s = Sampler([gpu, host], tmp_path, interval_s=0.05)
    s.set_phase("train", 1)
    s.start()
    time.sleep(0.4)
    s.stop()
    window = s.energy_window("train", 1)
    assert window == s.energy.window("train", 1) and window["energy_j"] > 0
    assert set(window["energy_by_device_j"]) == {"cuda:0"}
    assert s.energy_window("val", 1) == {} and s.energy_window("train", 2) == {}
    only_host = Sampler([FakeBackend(values=lambda n: {"gpu_util_pct": 50.0})], tmp_path / "b", interval_s=0.05)
    only_host.set_phase("train", 1)
    only_host.start()
    time.sleep(0.2)
    only_host.stop()
    assert only_host.energy_window("train", 1) == {}  # no power, no counter: nothing made up


def test_describe_is_what_the_training_loop_records(tmp_path):
    counter = iter(range(1000, 10**6, 10))
    gpu = FakeBackend("nvml", values=lambda n: {"energy_j": float(next(counter)), "power_w": 70.0})
    watts = FakeBackend("amdsmi", device="cuda:1", values=lambda n: {"power_w": 100.0})
    broken = FakeBackend("broken", device="cuda:2", fail=1)
    s = Sampler([gpu, watts, broken], tmp_path, interval_s=0.05, warn=lambda m: None)
    s.set_phase("train", 1)
    s.start()
    time.sleep(0.5)
    s.stop()
    info = s.describe()
    run = types.SimpleNamespace(sampler=s, cfg=types.SimpleNamespace(telemetry_interval=0.05))
    assert info == loop._telemetry_info(run)
    assert list(info) == ["enabled", "interval_s", "backends", "energy_method", "sampler_cpu_s", "samples"]
    assert info["enabled"] is True and info["interval_s"] == 0.05 and info["samples"] == s.samples >= 5
    assert info["energy_method"] == {"cuda:0": "energy counter differences",
                                     "cuda:1": "sampled power integrated over time (trapezoid)"}
    assert info["backends"][:2] == [{"name": "nvml", "device": "cuda:0", "disabled": None},
                                    {"name": "amdsmi", "device": "cuda:1", "disabled": None}]
    assert "failed 3 times" in info["backends"][2]["disabled"]
    assert 0 < info["sampler_cpu_s"] < 0.5


def test_rows_are_on_disk_at_each_phase_edge_without_waiting_for_a_flush(tmp_path, monkeypatch):
    monkeypatch.setattr(sampler_module, "FLUSH_EVERY_S", 3600.0)  # only edges and stop write
    quick = FakeBackend("quick", device="cpu", values=lambda n: {"cpu_util_pct": 1.0})
    quick.may_hang = False
    s = Sampler([quick, FakeBackend("threaded")], tmp_path, interval_s=0.05)
    s.set_phase("train", 1)
    s.start()
    time.sleep(0.4)
    assert _rows(tmp_path / "train_epoch.jsonl") == []  # queued, not yet written
    s.set_phase("val", 1)
    deadline = time.monotonic() + 2
    while len(_rows(tmp_path / "train_epoch.jsonl")) < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    train = _rows(tmp_path / "train_epoch.jsonl")
    assert time.monotonic() < deadline, "the closed phase's rows did not reach the disk at the edge"
    assert {r["backend"] for r in train} == {"quick", "threaded"} and {r["phase"] for r in train} == {"train"}
    time.sleep(0.3)
    s.stop()
    val = _rows(tmp_path / "val_epoch.jsonl")
    assert len(val) >= 8 and {r["phase"] for r in val} == {"val"}  # the rest at stop


def test_rows_reach_the_disk_within_the_flush_interval_while_sampling(tmp_path, monkeypatch):
    monkeypatch.setattr(sampler_module, "FLUSH_EVERY_S", 0.2)
    b = FakeBackend(device="cpu", values=lambda n: {"cpu_util_pct": float(n)})
    b.may_hang = False
    s = Sampler([b], tmp_path, interval_s=0.05).start()
    try:
        time.sleep(0.6)
        written = _rows(tmp_path / "idle.jsonl")
    finally:
        s.stop()
    assert len(written) >= 4  # written while sampling went on
    assert [r["cpu_util_pct"] for r in _rows(tmp_path / "idle.jsonl")] == [float(n) for n in range(1, b.n + 1)]


def test_cpu_backend_reads_the_system_figures_psutil_reports():
    b = CpuBackend()
    try:
        row = b.sample()
        assert row["sys_mem_total_mb"] == psutil.virtual_memory().total / MB
        assert abs(row["sys_mem_used_mb"] - (psutil.virtual_memory().total - psutil.virtual_memory().available) / MB) < 256
        assert 0 <= row["sys_cpu_util_pct"] <= 100
        b._stat = b._meminfo = None  # /proc not readable: psutil itself
        b._system_due = 0.0
        row = b.sample()
        assert row["sys_mem_total_mb"] == psutil.virtual_memory().total / MB and 0 <= row["sys_cpu_util_pct"] <= 100
    finally:
        b.close()
        b.close()


def test_the_overhead_benchmark_refuses_zero_rounds_in_one_line():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "telemetry_overhead.py"), "--rounds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("argument --rounds: must be at least 1, got 0")
