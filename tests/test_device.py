"""Device choice and precision policy, with device capabilities faked at torch's API."""

import pytest
import torch

from nnperf import device as devices
from nnperf.errors import UsageError


@pytest.mark.parametrize("flags,expected", [
    ({"avx512f", "avx512_bf16"}, "bf16"),
    ({"amx_bf16", "amx_tile"}, "bf16"),
    ({"avx2", "avx512f"}, "fp32"),
    (set(), "fp32"),
])
def test_cpu_precision_follows_bf16_support(monkeypatch, flags, expected):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    cpu = torch.device("cpu")
    p = devices.choose_precision(cpu, None, None)
    assert p.name == expected and (p.dtype is None) == (expected == "fp32")
    layout, _ = devices.choose_channels_last(cpu, p, None)
    assert layout == (expected == "bf16")


@pytest.mark.parametrize("capability,expected,scaler", [((8, 0), "bf16", False), ((7, 5), "fp16", True)])
def test_cuda_precision_follows_the_card(monkeypatch, capability, expected, scaler):
    # Decided by the training device's compute capability (is_bf16_supported asks the current device).
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4" if capability < (8, 0) else "A100")
    p = devices.choose_precision(torch.device("cuda", 0), None, None)
    assert p.name == expected and p.needs_scaler == scaler
    assert devices.choose_channels_last(torch.device("cuda", 0), p, None)[0]


def test_xpu_and_mps_policies(monkeypatch):
    monkeypatch.setattr(devices, "torch_version", lambda: (2, 8))
    assert devices.best_mixed(torch.device("xpu", 0)).name == "bf16"
    assert devices.best_mixed(torch.device("mps")).name == "fp16"
    assert not devices.choose_channels_last(torch.device("mps"), devices.Precision("fp16", ""), None)[0]


def test_explicit_choices_win(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512_bf16"})
    cpu = torch.device("cpu")
    assert devices.choose_precision(cpu, "fp32", None).name == "fp32"
    assert devices.choose_precision(cpu, None, False).name == "fp32"
    assert devices.choose_precision(cpu, "bf16", False).name == "bf16"
    p = devices.choose_precision(cpu, None, None)
    assert devices.choose_channels_last(cpu, p, False) == (False, "--no-channels-last")


def test_resolve_with_faked_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve("auto") == torch.device("cuda", 0)
    assert devices.resolve("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UsageError, match="only 2 cuda"):
        devices.resolve("cuda:2")
