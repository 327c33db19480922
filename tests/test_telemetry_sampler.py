"""The sampler with fake backends: phases, files, energy, failing and hanging backends, torn lines."""

import json
import threading
import time

import pytest
import torch

from nnperf.fileio import read_jsonl
from nnperf.telemetry import Sampler, phase_file, profile
from nnperf.telemetry.energy import EnergyMeter


class FakeBackend:
    def __init__(self, name="fake", device="cuda:0", values=None, fail=None, hang=None):
        self.name, self.device = name, device
        self.values = values or (lambda n: {"gpu_util_pct": 50 + n % 10, "power_w": 100.0})
        self.fail, self.hang = fail, hang
        self.n = 0
        self.closed = False

    def sample(self):
        self.n += 1
        if self.hang is not None and self.n >= self.hang:
            time.sleep(3600)
        if self.fail is not None and self.n >= self.fail:
            raise RuntimeError("device lost")
        return self.values(self.n)

    def close(self):
        self.closed = True


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_tagged_and_split_by_phase(tmp_path):
    b = FakeBackend()
    s = Sampler([b], tmp_path, interval_s=0.05, run="r1")
    s.set_phase("train", epoch=1, step=0)
    s.start()
    time.sleep(0.3)
    s.set_phase("val", epoch=1, step=7)
    time.sleep(0.3)
    s.stop()
    train, val = _rows(tmp_path / "train_epoch.jsonl"), _rows(tmp_path / "val_epoch.jsonl")
    assert len(train) >= 3 and len(val) >= 3
    assert {(r["phase"], r["epoch"], r["device"], r["backend"], r["run"]) for r in train} == {
        ("train", 1, "cuda:0", "fake", "r1")}
    assert all(r["step"] == 7 for r in val)
    ts = [r["t"] for r in train + val]
    assert ts == sorted(ts) and 0.03 < (ts[-1] - ts[0]) / (len(ts) - 1) < 0.1
    assert b.closed and phase_file(tmp_path, "bench").name == "bench.jsonl"


def test_energy_from_a_counter_and_from_power():
    m = EnergyMeter()
    m.add("cuda:0", "nvml", "train", 1, 10.0, {"energy_j": 5000.0, "power_w": 100.0})
    out = m.add("cuda:0", "nvml", "train", 1, 11.0, {"energy_j": 5150.0, "power_w": 300.0})
    assert out["energy_j"] == 150.0  # cumulative since the sampler started, not since boot
    m.add("cuda:0", "nvml", "val", 1, 12.0, {"energy_j": 5250.0})
    m.add("cuda:1", "x", "train", 1, 10.0, {"power_w": 100.0})
    m.add("cuda:1", "x", "train", 1, 12.0, {"power_w": 200.0})  # trapezoid: (100+200)/2 * 2 s
    assert m.window("train", 1) == {"energy_j": 450.0, "energy_by_device_j": {"cuda:0": 150.0, "cuda:1": 300.0}}
    assert m.window("val", 1)["energy_j"] == 100.0
    assert m.methods == {"cuda:0": "counter", "cuda:1": "power"}
    assert m.window("train", 2) is None


def test_no_energy_is_invented():
    m = EnergyMeter()
    m.add("cpu", "cpu", "train", 1, 1.0, {"cpu_util_pct": 50})
    m.add("cpu", "cpu", "train", 1, 2.0, {"cpu_util_pct": 60})
    assert m.window("train", 1) is None


def test_counter_reset_skips_the_interval():
    m = EnergyMeter()
    m.add("g", "b", "train", 1, 1.0, {"energy_j": 100.0})
    m.add("g", "b", "train", 1, 2.0, {"energy_j": 3.0})
    m.add("g", "b", "train", 1, 3.0, {"energy_j": 5.0})
    assert m.window("train", 1)["energy_j"] == 2.0


def test_a_failing_backend_is_disabled_with_one_warning_and_others_go_on(tmp_path):
    warnings = []
    good, bad = FakeBackend("good"), FakeBackend("bad", fail=2)
    s = Sampler([bad, good], tmp_path, interval_s=0.05, warn=warnings.append).start()
    time.sleep(0.6)
    s.stop()
    rows = _rows(tmp_path / "idle.jsonl")
    assert sum(r["backend"] == "bad" for r in rows) == 1
    assert sum(r["backend"] == "good" for r in rows) >= 5
    assert len(warnings) == 1 and "bad" in warnings[0] and "failed 3 times" in warnings[0]


def test_a_hanging_backend_is_abandoned_after_a_bounded_wait(tmp_path):
    warnings = []
    s = Sampler([FakeBackend("stuck", hang=2), FakeBackend("good")], tmp_path, interval_s=0.05, timeout_s=0.2,
                warn=warnings.append)
    started = time.monotonic()
    s.start()
    time.sleep(0.8)
    s.stop()
    assert time.monotonic() - started < 2
    rows = _rows(tmp_path / "idle.jsonl")
    assert sum(r["backend"] == "good" for r in rows) >= 3
    assert len(warnings) == 1 and "did not answer within 0.2s" in warnings[0]


def test_garbage_values_are_dropped(tmp_path):
    weird = FakeBackend(values=lambda n: {"gpu_util_pct": "N/A", "power_w": float("nan"), "temp_c": "55",
                                          "whatever": 3})
    s = Sampler([weird], tmp_path, interval_s=0.05).start()
    time.sleep(0.2)
    s.stop()
    row = _rows(tmp_path / "idle.jsonl")[0]
    assert row["temp_c"] == 55.0 and "gpu_util_pct" not in row and "power_w" not in row and "whatever" not in row


def test_set_phase_never_blocks_even_while_a_backend_is_stuck(tmp_path):
    s = Sampler([FakeBackend(hang=1)], tmp_path, interval_s=0.05, timeout_s=1, warn=lambda m: None).start()
    time.sleep(0.1)  # the sampler thread is now waiting on the stuck backend
    start = time.perf_counter()
    for i in range(10_000):
        s.set_phase("train", 1, i)
    assert time.perf_counter() - start < 0.5
    s.stop()


def test_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "train_epoch.jsonl"
    path.write_text('{"t": 1, "phase": "train"}\n{"t": 2, "phase": "tr')
    assert read_jsonl(path) == [{"t": 1, "phase": "train"}]


def test_sampler_cpu_time_is_measured(tmp_path):
    s = Sampler([FakeBackend()], tmp_path, interval_s=0.05).start()
    time.sleep(0.3)
    s.stop()
    assert s.samples >= 4 and 0 < s.cpu_s < 0.3


def test_profile_as_decorator_and_context_manager(tmp_path):
    out = tmp_path / "perf" / "train_epoch.jsonl"

    @profile("train_epoch", out=out, interval_s=0.05, backends=[FakeBackend()])
    def work():
        time.sleep(0.25)
        return 42

    assert work() == 42
    rows = _rows(out)
    assert rows[-1]["phase"] == "train_epoch" and 0.2 < rows[-1]["duration_s"] < 1 and rows[-1]["ok"]
    assert sum("gpu_util_pct" in r for r in rows) >= 3
    with profile("eval", out=out, interval_s=0.05, backends=[FakeBackend()]) as sampler:
        sampler.set_phase("eval", epoch=3)
        time.sleep(0.15)
    rows = _rows(out)
    assert rows[-1]["phase"] == "eval" and any(r.get("epoch") == 3 for r in rows)


def test_profile_default_backends_sample_this_cpu(tmp_path):
    out = tmp_path / "p.jsonl"
    with profile("bench", out=out, interval_s=0.05):
        time.sleep(0.2)
    rows = _rows(out)
    assert any(r.get("backend") == "cpu" and "proc_rss_mb" in r for r in rows)
