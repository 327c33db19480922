"""Backend registry: which telemetry sources serve a device, and why others do not.

Every backend keeps the contract of `base.Backend`: the registry asks each candidate class
`cls.available(dev)` and builds the chosen ones as `cls(dev)`, with no case of its own for any."""

from __future__ import annotations

import torch

from .amdsmi import AmdSmiBackend
from .base import METRICS, Backend, clean, number
from .cpu import CpuBackend
from .nvml import NvmlBackend
from .rocm_smi import AmdSmiCliBackend, RocmSmiBackend
from .torch_mem import TorchMemBackend

__all__ = ["METRICS", "Backend", "clean", "number", "for_device", "candidates", "classes"]


def _is_rocm() -> bool:
    return getattr(torch.version, "hip", None) is not None


def vendor_classes(dev: torch.device) -> list[type]:
    """The vendor sources of `dev`, in order of preference: the library before its command-line tool.
    At most one of them serves a device."""
    if dev.type == "cuda":
        return [AmdSmiBackend, RocmSmiBackend, AmdSmiCliBackend] if _is_rocm() else [NvmlBackend]
    return []  # XPU and MPS: the PyTorch allocator below is their only source yet


def classes(dev: torch.device) -> list[type]:
    """Every backend class that could serve `dev`: its vendor sources, the PyTorch allocator of an
    accelerator, and the CPU (the host side of any run)."""
    return [*vendor_classes(dev), *([TorchMemBackend] if dev.type != "cpu" else []), CpuBackend]


def candidates(dev: torch.device) -> list[tuple[str, type, tuple[bool, str]]]:
    """(name, class, (available, why)) for every backend that could serve `dev`, in order of preference."""
    return [(cls.name, cls, cls.available(dev)) for cls in classes(dev)]


def for_device(dev: torch.device, warn=None) -> list[Backend]:
    """The backends to sample for training on `dev`: the first working vendor source (AMD: amdsmi,
    else rocm-smi, else amd-smi), the PyTorch allocator for accelerators, and the CPU."""
    vendors = vendor_classes(dev)
    chosen, vendor_done = [], False
    for name, cls, (ok, why) in candidates(dev):
        is_vendor = cls in vendors
        if not ok or (is_vendor and vendor_done):
            continue
        try:
            backend = cls(dev)
        except Exception as e:  # noqa: BLE001 - a source that cannot start is skipped, training goes on
            if warn:
                warn(f"backend {name} could not start ({e}); skipped")
            continue
        chosen.append(backend)
        vendor_done = vendor_done or is_vendor
    return chosen
