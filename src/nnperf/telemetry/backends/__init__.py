"""Backend registry: which telemetry sources serve a device, and why others do not."""

from __future__ import annotations

import torch

from .amdsmi import AmdSmiBackend
from .base import METRICS, Backend, clean, number
from .cpu import CpuBackend
from .nvml import NvmlBackend
from .rocm_smi import AmdSmiCliBackend, RocmSmiBackend
from .torch_mem import TorchMemBackend

__all__ = ["METRICS", "Backend", "clean", "number", "for_device", "candidates"]


def _is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def candidates(dev: torch.device) -> list[tuple[str, type | None, tuple[bool, str]]]:
    """(name, class, (available, why)) for every backend that could serve `dev`, in order of
    preference. The vendor library comes before its command-line tool."""
    out = []
    if dev.type == "cuda":
        vendor = [AmdSmiBackend, RocmSmiBackend, AmdSmiCliBackend] if _is_rocm() else [NvmlBackend]
        out += [(cls.name, cls, cls.available()) for cls in vendor]
    if dev.type != "cpu":
        out.append(("torch", TorchMemBackend, TorchMemBackend.available_for(dev)))
    out.append(("cpu", CpuBackend, CpuBackend.available()))
    return out


def _build(cls: type, dev: torch.device) -> Backend:
    """Vendor backends take the device index, the allocator the device, the CPU nothing."""
    if cls is CpuBackend:
        return cls()
    if cls is TorchMemBackend:
        return cls(dev)
    return cls(dev.index or 0)


def for_device(dev: torch.device, warn=None) -> list[Backend]:
    """The backends to sample for training on `dev`: the first working vendor source (AMD: amdsmi,
    else rocm-smi, else amd-smi), the PyTorch allocator for accelerators, and the CPU."""
    chosen, vendor_done = [], False
    for name, cls, (ok, why) in candidates(dev):
        is_vendor = name not in ("torch", "cpu")
        if not ok or (is_vendor and vendor_done):
            continue
        try:
            backend = _build(cls, dev)
        except Exception as e:  # noqa: BLE001 - a source that cannot start is skipped, training goes on
            if warn:
                warn(f"backend {name} could not start ({e}); skipped")
            continue
        chosen.append(backend)
        vendor_done = vendor_done or is_vendor
    return chosen
