"""GPU-only paths of training, tested on the CPU with device capabilities faked: no float64 on an
MPS device, grad norms of steps the fp16 scaler skipped, and the training device's RNG state."""

from __future__ import annotations

import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY
from nnperf import device as devices
from nnperf.models import fast
from nnperf.train import checkpoint, step


class _Float64Watch(TorchDispatchMode):
    """Records every op that makes a float64 tensor, except while `on_host` (code that, on a real
    accelerator, runs on the CPU by construction)."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []
        self.on_host = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.on_host:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    self.seen.append(str(func))
        return out


def test_a_run_makes_no_float64_tensor_when_the_device_is_mps_like(run_cli, monkeypatch):
    # On MPS (no float64) the accumulators are float32; fake that decision for the CPU run.
    monkeypatch.setattr(devices, "accumulator_dtype", lambda dev: torch.float32)
    watch = _Float64Watch()
    real = fast._whitening_filters

    def whitening_filters(cov, eps):  # runs on the CPU whatever the device (checked below)
        watch.on_host = True
        try:
            return real(cov, eps)
        finally:
            watch.on_host = False

    monkeypatch.setattr(fast, "_whitening_filters", whitening_filters)
    with watch:
        code, out, err = run_cli("train", *TINY, "--model", "fast", "--epochs", "1", "--no-telemetry")
    assert code == 0, err
    assert watch.seen == []


def test_whitening_runs_eigh_on_the_cpu_and_returns_float32(monkeypatch):
    seen = []
    real = torch.linalg.eigh

    def eigh(a, *args, **kwargs):
        seen.append((a.device.type, a.dtype))
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    cov = torch.eye(12) * 2
    filters = fast._whitening_filters(cov, 5e-4)
    assert seen == [("cpu", torch.float64)]
    assert filters.dtype == torch.float32 and filters.device == cov.device
    assert torch.allclose(filters @ cov @ filters.T, torch.eye(12), atol=1e-3)


def test_accumulators_stay_float64_on_the_cpu():
    assert devices.accumulator_dtype(torch.device("cpu")) == torch.float64
    assert devices.accumulator_dtype(torch.device("cuda", 1)) == torch.float64
    assert devices.accumulator_dtype(torch.device("mps")) == torch.float32
    assert step.EpochSums.zero(torch.device("cpu")).loss.dtype == torch.float64


def test_non_finite_grad_norms_are_left_out_and_counted():
    from nnperf import track

    norms = [torch.tensor(v) for v in (1.0, float("inf"), 3.0, float("nan"), 2.0)]
    grad_norm, skipped = step.grad_norm_summary(norms)
    row = {"train": {"loss": 1.0, "top1": 0.5, "top5": 1.0, "lr": 0.1}, "val": None, "batch_size": 32,
           "grad_norm": grad_norm, "scaler_skipped_steps": skipped}
    scalars = track.epoch_scalars(row)
    assert scalars["train/grad_norm"] == 2.0
    assert scalars["train/scaler_skipped_steps"] == 2


def test_grad_norm_summary_all_skipped_or_none():
    assert step.grad_norm_summary([]) == (None, None)
    mean, skipped = step.grad_norm_summary([torch.tensor(float("inf"))] * 3)
    assert mean is None and skipped == 3
    mean, skipped = step.grad_norm_summary([torch.tensor(1.0, dtype=torch.float16), torch.tensor(2.0)])
    assert math.isclose(mean, 1.5) and skipped == 0


def _fake_cuda(monkeypatch):
    calls = []
    states = {0: torch.tensor([0], dtype=torch.uint8), 1: torch.tensor([1], dtype=torch.uint8)}

    def get(device="cuda"):
        calls.append(("get", torch.device(device)))
        return states[torch.device(device).index]

    def set_(state, device="cuda"):
        calls.append(("set", torch.device(device), state.tolist()))

    monkeypatch.setattr(torch.cuda, "get_rng_state", get)
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_)
    for name in ("get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError(name)))
    return calls


def test_rng_saves_and_restores_only_the_training_gpu(monkeypatch):
    calls = _fake_cuda(monkeypatch)
    dev = torch.device("cuda", 1)
    rng = checkpoint.rng_state(dev)
    assert isinstance(rng["torch"], torch.Tensor)  # what checkpoint validation checks
    assert rng["device"]["type"] == "cuda" and rng["device"]["state"].tolist() == [1]
    assert "cuda" not in rng
    checkpoint.restore_rng(rng, dev)
    assert calls == [("get", dev), ("set", dev, [1])]


def test_rng_of_an_old_checkpoint_with_every_gpu_listed(monkeypatch):
    calls = _fake_cuda(monkeypatch)
    old = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([10], dtype=torch.uint8),
                                                     torch.tensor([11], dtype=torch.uint8)]}
    checkpoint.restore_rng(old, torch.device("cuda", 1))
    assert calls == [("set", torch.device("cuda", 1), [11])]
    calls.clear()
    checkpoint.restore_rng(old, torch.device("cuda", 3))  # that GPU's entry is missing: CPU state only
    assert calls == []


def test_rng_of_xpu_and_mps_is_saved(monkeypatch):
    got = []
    for module in ("xpu", "mps"):
        fake = type("Fake", (), {})()
        fake.get_rng_state = lambda *a, _m=module: torch.tensor([7], dtype=torch.uint8)
        fake.set_rng_state = lambda state, *a, _m=module: got.append((_m, state.tolist(), a))
        monkeypatch.setattr(torch, module, fake, raising=False)
    for dev in (torch.device("xpu", 0), torch.device("mps")):
        rng = checkpoint.rng_state(dev)
        assert rng["device"]["type"] == dev.type
        checkpoint.restore_rng(rng, dev)
    assert got == [("xpu", [7], (torch.device("xpu", 0),)), ("mps", [7], ())]
    got.clear()
    checkpoint.restore_rng(checkpoint.rng_state(torch.device("mps")), torch.device("cpu"))  # another device: CPU only
    assert got == []


def test_cpu_rng_round_trip():
    rng = checkpoint.rng_state(torch.device("cpu"))
    assert set(rng) == {"torch"}
    a = torch.rand(3)
    checkpoint.restore_rng(rng, torch.device("cpu"))
    assert torch.equal(torch.rand(3), a)
