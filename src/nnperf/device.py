"""Device discovery and choice (CUDA/ROCm, XPU, MPS, CPU) and the precision policy."""

from __future__ import annotations

import contextlib
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError


def _has_xpu() -> bool:
    return hasattr(torch, "xpu") and torch.xpu.is_available()


def _has_mps() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve(spec: str = "auto") -> torch.device:
    """Turn --device into a torch.device, refusing one this machine does not have."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        if _has_xpu():
            return torch.device("xpu", 0)
        if _has_mps():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device: unknown device '{spec}' (use auto, cpu, cuda, cuda:N, xpu or mps)") from None
    if dev.type == "cpu":
        return dev
    count = {"cuda": torch.cuda.device_count, "xpu": lambda: torch.xpu.device_count() if _has_xpu() else 0,
             "mps": lambda: 1 if _has_mps() else 0}.get(dev.type)
    if count is None:
        raise UsageError(f"--device: unsupported device type '{dev.type}' (use auto, cpu, cuda, cuda:N, xpu or mps)")
    n = count() if dev.type != "cuda" or torch.cuda.is_available() else 0
    index = dev.index or 0
    if n == 0:
        raise UsageError(f"--device {spec}: no {dev.type} device on this machine (try --device auto or cpu)")
    if index >= n:
        raise UsageError(f"--device {spec}: only {n} {dev.type} device(s) here (indices 0..{n - 1})")
    return torch.device(dev.type, index) if dev.type != "mps" else dev


def cpu_flags() -> set[str]:
    """CPU feature flags from /proc/cpuinfo (empty where it is not readable)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    if dev.type == "xpu":
        return torch.xpu.get_device_name(dev)
    if dev.type == "mps":
        return "Apple MPS"
    return cpu_name()


@dataclass
class Precision:
    """What the train step runs in, and why it was chosen."""

    name: str  # fp32, bf16 or fp16
    reason: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def needs_scaler(self) -> bool:
        # fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range.
        return self.name == "fp16"


def parse_version(text: str) -> tuple[int, int]:
    """(major, minor) from a version string such as "2.7.1+cpu", "2.8.0a0+git1234" or "6.2.41133-dd7f95766";
    (0, 0) where it has none."""
    m = re.match(r"\s*v?(\d+)(?:\.(\d+))?", str(text or ""))
    return (int(m.group(1)), int(m.group(2) or 0)) if m else (0, 0)


def torch_version() -> tuple[int, int]:
    """The installed torch's (major, minor)."""
    return parse_version(torch.__version__)


def rocm_version() -> tuple[int, int] | None:
    """The ROCm (HIP) version torch was built with, or None for a CUDA (or CPU-only) build."""
    hip = getattr(torch.version, "hip", None)
    return parse_version(hip) if hip else None


# AMD architectures with bf16 matrix instructions: CDNA MI100/MI200/MI300/MI350 and RDNA3/RDNA4.
_ROCM_BF16_ARCHS = ("gfx908", "gfx90a", "gfx940", "gfx941", "gfx942", "gfx950")
_ROCM_BF16_FAMILIES = ("gfx11", "gfx12")
# Vega (MI25/MI50/Radeon VII) and RDNA1/2: packed fp16 math but no bf16 hardware.
_ROCM_FP16_ONLY = ("gfx900", "gfx906", "gfx10")


def _rocm_mixed(dev: torch.device, name: str) -> Precision:
    """ROCm: decide by the GPU's architecture (gcnArchName), never by CUDA capability numbers."""
    arch = (getattr(torch.cuda.get_device_properties(dev), "gcnArchName", "") or "").split(":")[0].strip()
    if arch in _ROCM_BF16_ARCHS or arch.startswith(_ROCM_BF16_FAMILIES):
        return Precision("bf16", f"{name} ({arch}) runs bf16 natively")
    if arch.startswith(_ROCM_FP16_ONLY):
        return Precision("fp16", f"{name} ({arch}) lacks bf16 hardware; fp16 with a gradient scaler")
    with torch.cuda.device(dev):  # is_bf16_supported asks about the current device: make it the training one
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    what = arch or "unknown architecture"
    if bf16:
        return Precision("bf16", f"{name} ({what}) reports bf16 support")
    return Precision("fp16", f"{name} ({what}) reports no bf16 support; fp16 with a gradient scaler")


def best_mixed(dev: torch.device) -> Precision:
    """The mixed precision this device runs fastest without losing accuracy."""
    if dev.type == "cuda":
        name = device_name(dev)
        if rocm_version() is not None:
            return _rocm_mixed(dev, name)
        # Ask about the training device itself (not the current one), by compute capability.
        major, minor = torch.cuda.get_device_capability(dev)
        cc = f"compute capability {major}.{minor}"
        if major >= 8:
            return Precision("bf16", f"{name} ({cc}) runs bf16 natively")
        if major == 7:
            return Precision("fp16", f"{name} ({cc}) lacks native bf16; fp16 with a gradient scaler")
        return Precision("fp32", f"{name} ({cc}, below 7.0) has no tensor cores and slow or no fp16; "
                                 "mixed precision would be slower")
    if dev.type == "xpu":
        return Precision("bf16", "Intel XPUs run bf16 natively")
    if dev.type == "mps":
        version = torch_version()
        shown = f"torch {version[0]}.{version[1]}"
        if version < (2, 5):
            return Precision("fp32", f"MPS autocast needs torch 2.5 ({shown} installed)")
        if version < (2, 8):
            return Precision("fp32", f"fp16 training on MPS (GradScaler) needs torch 2.8 ({shown} installed)")
        return Precision("fp16", f"MPS autocast supports fp16 with a gradient scaler ({shown})")
    flags = cpu_flags()
    if flags & {"amx_bf16", "avx512_bf16"}:
        found = ", ".join(sorted(flags & {"amx_bf16", "avx512_bf16"}))
        return Precision("bf16", f"CPU has {found}")
    return Precision("fp32", "CPU has no native bf16 (no avx512_bf16/amx_bf16); mixed precision would be slower")


def choose_precision(dev: torch.device, requested: str | None, amp: bool | None) -> Precision:
    """--precision wins; --no-amp means fp32; otherwise the device's best mixed precision."""
    if requested:
        if requested == "fp16" and dev.type == "cpu":
            return Precision("fp16", "requested with --precision (slow on most CPUs)")
        return Precision(requested, "requested with --precision")
    if amp is False:
        return Precision("fp32", "--no-amp")
    return best_mixed(dev)


def choose_channels_last(dev: torch.device, precision: Precision, requested: bool | None) -> tuple[bool, str]:
    """channels_last (NHWC) where the convolution libraries are fastest with it: oneDNN's bf16
    kernels on CPUs, tensor-core kernels for fp16/bf16 on CUDA and XPU, and on ROCm from version 7
    (or with PYTORCH_MIOPEN_SUGGEST_NHWC=1)."""
    if requested is not None:
        return requested, "requested with --channels-last" if requested else "--no-channels-last"
    if precision.name == "fp32":
        return False, "fp32 convolutions run as fast in NCHW"
    rocm = rocm_version() if dev.type == "cuda" else None
    if rocm is not None:
        # MIOpen's NHWC kernels are slower than NCHW on most Radeon cards and before ROCm 7,
        # unless PYTORCH_MIOPEN_SUGGEST_NHWC=1 says otherwise.
        shown = f"ROCm {rocm[0]}.{rocm[1]}"
        if os.environ.get("PYTORCH_MIOPEN_SUGGEST_NHWC") == "1":
            return True, f"{precision.name} convolutions in NHWC on {shown} (PYTORCH_MIOPEN_SUGGEST_NHWC=1)"
        if rocm[0] >= 7:
            return True, f"{precision.name} convolutions are fastest in NHWC on {shown}"
        return False, (f"MIOpen runs NCHW faster than NHWC on {shown} (before ROCm 7; "
                       "set PYTORCH_MIOPEN_SUGGEST_NHWC=1 to use NHWC)")
    if dev.type in ("cpu", "cuda", "xpu"):
        return True, f"{precision.name} convolutions are fastest in NHWC on {dev.type}"
    return False, f"NHWC brings no speed on {dev.type}"


def autocast(dev: torch.device, precision: Precision):
    """Autocast context for the forward pass, or a no-op for fp32."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev.type, dtype=precision.dtype)


def sync(dev: torch.device) -> None:
    """Wait for queued device work, so a clock read after it measures the work."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "xpu":
        torch.xpu.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()


def accumulator_dtype(dev: torch.device) -> torch.dtype:
    """The dtype of running sums kept on `dev`: float64 (exact, so a resumed epoch adds up bit for bit
    the same) where the device has it; float32 on MPS, which has no float64."""
    return torch.float32 if dev.type == "mps" else torch.float64
