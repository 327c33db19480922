"""GPU precision and layout policy (CUDA by compute capability, ROCm by architecture and version, MPS by
torch version), with devices faked at torch's API."""

import contextlib
from types import SimpleNamespace

import pytest
import torch

from nnperf import device as devices

CUDA1 = torch.device("cuda", 1)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A CUDA build whose cuda:1 has the given capability; cuda:0 (the current device) is an H100."""
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "GPU")
    # The current device supports bf16: a policy that asked it instead of cuda:1 would choose bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    def use(capability):
        def get_capability(d=None):
            assert torch.device(d) == CUDA1, f"asked about {d}, not the training device"
            return capability
        monkeypatch.setattr(torch.cuda, "get_device_capability", get_capability)
    return use


@pytest.mark.parametrize("capability,name,scaler,layout", [
    ((9, 0), "bf16", False, True),   # H100
    ((8, 6), "bf16", False, True),   # RTX 30xx
    ((7, 5), "fp16", True, True),    # T4, RTX 20xx
    ((7, 0), "fp16", True, True),    # V100
    ((6, 1), "fp32", False, False),  # GTX 10xx, P40: fp16 at a fraction of fp32
    ((5, 2), "fp32", False, False),
])
def test_cuda_precision_by_the_training_devices_capability(fake_cuda, capability, name, scaler, layout):
    fake_cuda(capability)
    p = devices.choose_precision(CUDA1, None, None)
    assert p.name == name and p.needs_scaler == scaler
    assert f"compute capability {capability[0]}.{capability[1]}" in p.reason
    assert devices.choose_channels_last(CUDA1, p, None)[0] == layout


def test_pascal_with_explicit_precision_still_wins(fake_cuda):
    fake_cuda((6, 1))
    assert devices.choose_precision(CUDA1, "fp16", None).name == "fp16"


@pytest.fixture
def fake_rocm(monkeypatch):
    """A ROCm build (torch.version.hip set): CUDA capability numbers must not be consulted."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "AMD GPU")
    monkeypatch.delenv("PYTORCH_MIOPEN_SUGGEST_NHWC", raising=False)

    def no_capability(d=None):
        raise AssertionError("CUDA compute capability consulted on ROCm")
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_capability)
    state = {"current": 0}

    @contextlib.contextmanager
    def device_ctx(d):
        before, state["current"] = state["current"], torch.device(d).index
        try:
            yield
        finally:
            state["current"] = before
    monkeypatch.setattr(torch.cuda, "device", device_ctx)

    def use(arch, hip="6.2.41133-dd7f95766", bf16_on_cuda1=True):
        monkeypatch.setattr(torch.version, "hip", hip)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace(gcnArchName=arch))
        # True only when the training device (cuda:1) is the current one.
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True: bf16_on_cuda1 and state["current"] == 1)
    return use


@pytest.mark.parametrize("arch", ["gfx90a:sramecc+:xnack-", "gfx942", "gfx1100"])
def test_rocm_bf16_by_architecture(fake_rocm, arch):
    fake_rocm(arch, bf16_on_cuda1=False)  # the architecture decides, not the bf16 query
    p = devices.choose_precision(CUDA1, None, None)
    assert p.name == "bf16" and not p.needs_scaler
    assert arch.split(":")[0] in p.reason


@pytest.mark.parametrize("arch", ["gfx906", "gfx1030"])
def test_rocm_architectures_without_bf16_use_fp16(fake_rocm, arch):
    fake_rocm(arch)
    p = devices.choose_precision(CUDA1, None, None)
    assert p.name == "fp16" and p.needs_scaler and arch in p.reason


@pytest.mark.parametrize("bf16,name", [(True, "bf16"), (False, "fp16")])
def test_rocm_unknown_architecture_asks_the_training_device(fake_rocm, bf16, name):
    fake_rocm("gfx9999", bf16_on_cuda1=bf16)
    p = devices.choose_precision(CUDA1, None, None)
    assert p.name == name and p.needs_scaler == (name == "fp16")


@pytest.mark.parametrize("hip,env,layout,why", [
    ("6.2.41133-dd7f95766", None, False, "before ROCm 7"),
    ("6.4.0", "1", True, "PYTORCH_MIOPEN_SUGGEST_NHWC=1"),
    ("6.4.0", "0", False, "before ROCm 7"),
    ("7.0.51831", None, True, "ROCm 7.0"),
])
def test_rocm_layout_by_version_and_miopen_setting(fake_rocm, monkeypatch, hip, env, layout, why):
    fake_rocm("gfx942", hip=hip)
    if env is not None:
        monkeypatch.setenv("PYTORCH_MIOPEN_SUGGEST_NHWC", env)
    p = devices.choose_precision(CUDA1, None, None)
    assert p.name == "bf16"
    got, reason = devices.choose_channels_last(CUDA1, p, None)
    assert got == layout and why in reason
    assert devices.choose_channels_last(CUDA1, p, True)[0]  # an explicit request still wins


def test_rocm_fp32_stays_nchw(fake_rocm):
    fake_rocm("gfx942", hip="7.0.0")
    assert devices.choose_channels_last(CUDA1, devices.Precision("fp32", ""), None)[0] is False


@pytest.mark.parametrize("text,expected", [
    ("2.7.1+cpu", (2, 7)), ("2.8.0a0+git1234abc", (2, 8)), ("2.10.0.dev20250601", (2, 10)),
    ("2.5.0", (2, 5)), ("6.2.41133-dd7f95766", (6, 2)), ("7", (7, 0)), ("", (0, 0)), ("unknown", (0, 0)),
])
def test_parse_version(text, expected):
    assert devices.parse_version(text) == expected


def test_torch_version_parses_the_installed_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.7.1+cpu")
    assert devices.torch_version() == (2, 7)


@pytest.mark.parametrize("version,name,why", [
    ("2.4.1", "fp32", "autocast needs torch 2.5"),
    ("2.6.0", "fp32", "needs torch 2.8"),
    ("2.7.1+cpu", "fp32", "needs torch 2.8"),
    ("2.8.0", "fp16", "torch 2.8"),
    ("2.10.0.dev20250601", "fp16", "torch 2.10"),
])
def test_mps_precision_by_torch_version(monkeypatch, version, name, why):
    monkeypatch.setattr(torch, "__version__", version)
    p = devices.choose_precision(torch.device("mps"), None, None)
    assert p.name == name and p.needs_scaler == (name == "fp16") and why in p.reason
    assert devices.choose_channels_last(torch.device("mps"), p, None)[0] is False
