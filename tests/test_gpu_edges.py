"""GPU edge cases without a GPU, each faked at its API boundary: energy at phase edges shorter than the
sampling interval, device sync around `profile`, XPU free memory in `fits_on`, and a compiled graph
whose backward fails."""

import json
import threading
import time
import types

import pytest
import torch
from torch import nn

from nnperf import device as devices
from nnperf.data import loader
from nnperf.telemetry import Sampler, profile
from nnperf.telemetry.sampler import energy_reader
from nnperf.train import step as step_mod


class CounterBackend:
    """A device whose energy counter grows by `per_read` joules at every read, samples included."""

    def __init__(self, name="fake", device="cuda:0", per_read=10.0, may_hang=True, style="method"):
        self.name, self.device, self.per_read, self.may_hang = name, device, per_read, may_hang
        self.joules = 1000.0
        self.lock = threading.Lock()
        self.reads = []  # which thread read the counter
        if style == "readers":  # as NVML and amdsmi expose it: an "energy" reader group
            self.readers = {"energy": lambda: {"energy_j": self._read()}}
        elif style == "method":
            self.read_energy_j = self._read

    def _read(self):
        with self.lock:
            self.joules += self.per_read
            self.reads.append(threading.current_thread().name)
            return self.joules

    def sample(self):
        return {"energy_j": self._read(), "power_w": 100.0}

    def close(self):
        pass


@pytest.mark.parametrize("style, may_hang", [("method", True), ("readers", True), ("method", False)])
def test_a_phase_shorter_than_the_interval_gets_its_own_energy(tmp_path, style, may_hang):
    b = CounterBackend(style=style, may_hang=may_hang)
    s = Sampler([b], tmp_path, interval_s=30.0, warn=lambda m: None)  # no tick inside the phases below
    s.set_phase("train", 1, 0)
    s.start()
    deadline = time.monotonic() + 5
    while not b.reads and time.monotonic() < deadline:  # the first sample, at start
        time.sleep(0.01)
    s.set_phase("train", 1, 5)  # same phase, a new step: no read
    assert len(b.reads) == 1
    s.set_phase("val", 1, 10)  # closes train: one read
    s.set_phase("train", 2, 10)  # closes val, far shorter than the interval: one read
    s.stop()
    assert len(b.reads) == 3
    assert s.energy.window("val", 1) == {"energy_j": 10.0, "energy_by_device_j": {"cuda:0": 10.0}}
    assert s.energy.window("train", 1)["energy_j"] == 10.0  # first sample -> the val edge: its own, not val's
    assert s.energy.methods["cuda:0"] == "counter"


def test_edges_read_only_backends_with_an_in_process_counter(tmp_path):
    tool = CounterBackend(name="rocm-smi", style="none")  # a vendor tool: sample() runs a process
    assert energy_reader(tool) is None
    s = Sampler([tool], tmp_path, interval_s=30.0, warn=lambda m: None).start()
    time.sleep(0.1)
    n = len(tool.reads)
    s.set_phase("val", 1, 0)
    assert len(tool.reads) == n  # never called from the training loop's thread
    s.stop()


def test_a_sample_started_before_an_edge_is_not_counted_twice():
    from nnperf.telemetry.energy import EnergyMeter

    m = EnergyMeter()
    m.add("g", "b", "train", 1, 1.0, {"energy_j": 100.0})
    m.edge("g", "b", "train", 1, 2.0, 130.0)  # train -> val
    m.add("g", "b", "train", 1, 1.9, {"energy_j": 120.0})  # a worker's sample, collected late
    m.edge("g", "b", "val", 1, 2.5, 140.0)  # val -> train 2
    m.add("g", "b", "train", 2, 3.0, {"energy_j": 150.0})
    assert m.window("train", 1)["energy_j"] == 30.0
    assert m.window("val", 1)["energy_j"] == 10.0
    assert m.window("train", 2)["energy_j"] == 10.0


def test_a_failing_or_slow_edge_read_is_not_tried_again(tmp_path):
    b = CounterBackend()
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("driver gone")

    b.read_energy_j = broken
    s = Sampler([b], tmp_path, interval_s=30.0, warn=lambda m: None).start()
    s.set_phase("val", 1, 0)
    s.set_phase("train", 2, 0)
    s.stop()
    assert len(calls) == 1


def test_profile_syncs_the_device_at_start_and_end(tmp_path, monkeypatch):
    events = []

    def fake_sync(dev):
        events.append(("sync", str(dev)))
        if len(events) > 1:
            time.sleep(0.3)  # the queued work the block left behind

    monkeypatch.setattr(devices, "sync", fake_sync)
    out = tmp_path / "p.jsonl"
    with profile("bench", out=out, interval_s=0.05, device="cuda:0", backends=[]):
        events.append(("body",))
    assert events == [("sync", "cuda:0"), ("body",), ("sync", "cuda:0")]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["ok"] and row["duration_s"] >= 0.3


def _fake_xpu(monkeypatch, free=None, total=8 * 2**30):
    props = types.SimpleNamespace(total_memory=total)
    xpu = types.SimpleNamespace(get_device_properties=lambda dev: props)
    if free is not None:
        xpu.mem_get_info = lambda dev: (free, total)
    monkeypatch.setattr(torch, "xpu", xpu, raising=False)


def test_fits_on_xpu_checks_free_memory(monkeypatch):
    _fake_xpu(monkeypatch, free=2**30)
    dev = torch.device("xpu:0")
    assert loader.fits_on(dev, 100 * 2**20)
    assert not loader.fits_on(dev, 2**30)  # fits the total, not 40% of what is free


def test_fits_on_xpu_without_mem_get_info_uses_the_total(monkeypatch):
    _fake_xpu(monkeypatch, free=None, total=2**30)
    dev = torch.device("xpu:0")
    assert loader.fits_on(dev, 100 * 2**20)
    assert not loader.fits_on(dev, 2**30)


FP32 = devices.Precision("fp32", "test")


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("inductor: backward codegen failed\nmore detail")


class _BrokenBackward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return _RaiseInBackward.apply(self.model(x))


def test_a_compiled_backward_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kw: _BrokenBackward(model))
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    reference = nn.Linear(4, 3)
    reference.load_state_dict(model.state_dict())
    logs = []
    fwd = step_mod.CompiledOrEager(model, logs.append)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ts = step_mod.TrainStep(model, opt, None, torch.device("cpu"), FP32, forward=fwd)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    ts(x, y)
    ts(x, y)
    assert fwd.failed
    assert logs == ["--compile: torch.compile failed in backward (RuntimeError: inductor: backward codegen "
                    "failed); running eager"]
    # The step was done eagerly, once: the same weights as two plain eager steps.
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    for _ in range(2):
        ref_opt.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        ref_opt.step()
    assert torch.allclose(model.weight, reference.weight) and torch.allclose(model.bias, reference.bias)


def test_an_eager_backward_failure_still_raises(monkeypatch):
    model = _BrokenBackward(nn.Linear(4, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ts = step_mod.TrainStep(model, opt, None, torch.device("cpu"), FP32)
    with pytest.raises(RuntimeError, match="backward codegen failed"):
        ts(torch.randn(2, 4), torch.tensor([0, 1]))
