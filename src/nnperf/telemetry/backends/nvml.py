"""NVIDIA GPUs through NVML (the `nvidia-ml-py` package, imported as `pynvml`)."""

from __future__ import annotations

import importlib
import os
import re
import time
import uuid as _uuid
from typing import Callable

import torch

from .base import index_of

MB = 1024 * 1024
# Clock-event (formerly "throttle") reason bits, identical in every NVML version.
REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks", 0x4: "sw_power_cap", 0x8: "hw_slowdown",
           0x10: "sync_boost", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
           0x100: "display_clocks"}
PCIE_EVERY_S = 1.0  # each PCIe query blocks for its 20 ms measuring window


def decode_reasons(mask: int) -> str:
    names = [name for bit, name in REASONS.items() if mask & bit]
    return ",".join(names) if names else "none"


def nvml_index(cuda_index: int, env: dict | None = None) -> int | str:
    """The NVML device for CUDA device `cuda_index`: NVML ignores CUDA_VISIBLE_DEVICES, so map
    through it (an integer entry is an nvidia-smi index, a GPU-/MIG- entry a UUID)."""
    visible = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES")
    if not visible:
        return cuda_index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    entry = entries[cuda_index]
    return int(entry) if entry.isdigit() else entry


def nvml_uuids(uuid) -> list[str]:
    """The NVML spellings to try for a CUDA device UUID: as given when it has its prefix already
    ("GPU-..." or "MIG-..."), else "GPU-<hex>" then "MIG-<hex>" (torch's uuid prints without one)."""
    if uuid is None:
        return []
    raw = getattr(uuid, "bytes", None)
    text = str(uuid).strip()
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16 and not re.fullmatch(r"[0-9a-fA-F-]{32,36}", text):
        text = str(_uuid.UUID(bytes=bytes(raw)))  # an object that prints no hex form
    if not text:
        return []
    if text.upper().startswith(("GPU-", "MIG-")):
        return [text]
    return [f"GPU-{text}", f"MIG-{text}"]


def torch_uuid(cuda_index: int):
    """torch's UUID of CUDA device `cuda_index` (CUDA's own order and CUDA_VISIBLE_DEVICES applied),
    or None without CUDA or where this torch does not report it."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        return getattr(torch.cuda.get_device_properties(cuda_index), "uuid", None)
    except Exception:  # noqa: BLE001 - no UUID: the index mapping is used instead
        return None


def load_pynvml():
    return importlib.import_module("pynvml")


class NvmlBackend:
    name = "nvml"
    may_hang = True  # driver calls can block (a GPU falling off the bus): its own thread and bound

    def __init__(self, device: torch.device | str, nv=None):
        cuda_index = index_of(torch.device(device))
        self.nv = nv or load_pynvml()
        self.nv.nvmlInit()
        self.device = f"cuda:{cuda_index}"
        # NVML numbers GPUs by PCI bus, CUDA fastest first: the UUID names the same card in both.
        self.handle = self._by_uuid(torch_uuid(cuda_index))
        if self.handle is None:
            self.handle = self._handle(nvml_index(cuda_index))
        # A MIG instance reports its own memory (and nothing of utilization); power, energy,
        # temperature, clocks and PCIe exist only for the whole GPU it is part of.
        self.parent = self._mig_parent(self.handle)
        self.mig = self.parent is not None
        self.board = self.parent if self.mig else self.handle
        self.missing: dict[str, str] = {}
        self.readers: dict[str, Callable[[], dict]] = {
            "utilization": self._utilization, "memory": self._memory, "temperature": self._temperature,
            "power": self._power, "energy": self._energy, "clocks": self._clocks,
            "throttle_reasons": self._throttle, "pcie": self._pcie}
        self._last_pcie = 0.0

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        if torch.device(device).type != "cuda":
            return False, "NVML serves CUDA devices only"
        try:
            nv = load_pynvml()
            nv.nvmlInit()
            return nv.nvmlDeviceGetCount() > 0, "NVML (nvidia-ml-py)"
        except ImportError:
            return False, "nvidia-ml-py is not installed (pip install 'nnperf[nvidia]')"
        except Exception as e:  # noqa: BLE001 - any NVML failure means: not usable here
            return False, f"NVML did not start ({e})"

    def _handle(self, key: int | str):
        if isinstance(key, int):
            return self.nv.nvmlDeviceGetHandleByIndex(key)
        if key.startswith("GPU-") or key.startswith("MIG-"):
            for i in range(self.nv.nvmlDeviceGetCount()):  # a unique UUID prefix is allowed
                h = self.nv.nvmlDeviceGetHandleByIndex(i)
                if self.nv.nvmlDeviceGetUUID(h).startswith(key):
                    return h
        return self.nv.nvmlDeviceGetHandleByUUID(key)

    def _by_uuid(self, uuid):
        """The NVML handle of the GPU with this CUDA UUID, or None if NVML knows no such UUID."""
        for key in nvml_uuids(uuid):
            try:
                return self.nv.nvmlDeviceGetHandleByUUID(key)
            except self.nv.NVMLError:
                continue
        return None

    def _mig_parent(self, handle):
        """The parent GPU of a MIG device handle; None for a whole GPU (or bindings without MIG calls)."""
        try:
            is_mig = self.nv.nvmlDeviceIsMigDeviceHandle(handle)
            if not getattr(is_mig, "value", is_mig):
                return None
            return self.nv.nvmlDeviceGetDeviceHandleFromMigDeviceHandle(handle)
        except (self.nv.NVMLError, AttributeError):
            return None

    def _utilization(self) -> dict:
        u = self.nv.nvmlDeviceGetUtilizationRates(self.handle)
        return {"gpu_util_pct": u.gpu, "mem_util_pct": u.memory}

    def _memory(self) -> dict:
        m = self.nv.nvmlDeviceGetMemoryInfo(self.handle)
        return {"vram_used_mb": m.used / MB, "vram_total_mb": m.total / MB}

    def _temperature(self) -> dict:
        return {"temp_c": self.nv.nvmlDeviceGetTemperature(self.board, self.nv.NVML_TEMPERATURE_GPU)}

    def _power(self) -> dict:
        return {"power_w": self.nv.nvmlDeviceGetPowerUsage(self.board) / 1000}

    def _energy(self) -> dict:
        # Millijoules since the driver loaded (Volta and later).
        return {"energy_j": self.nv.nvmlDeviceGetTotalEnergyConsumption(self.board) / 1000}

    def _clocks(self) -> dict:
        return {"sm_clock_mhz": self.nv.nvmlDeviceGetClockInfo(self.board, self.nv.NVML_CLOCK_SM),
                "mem_clock_mhz": self.nv.nvmlDeviceGetClockInfo(self.board, self.nv.NVML_CLOCK_MEM)}

    def _throttle(self) -> dict:
        get = getattr(self.nv, "nvmlDeviceGetCurrentClocksEventReasons", None)
        try:
            mask = get(self.board) if get else self.nv.nvmlDeviceGetCurrentClocksThrottleReasons(self.board)
        except self.nv.NVMLError_FunctionNotFound:  # a binding newer than the driver
            mask = self.nv.nvmlDeviceGetCurrentClocksThrottleReasons(self.board)
        return {"throttle_reasons": decode_reasons(int(mask))}

    def _pcie(self) -> dict:
        now = time.monotonic()
        if now - self._last_pcie < PCIE_EVERY_S:
            return {}
        self._last_pcie = now
        return {"pcie_tx_kbps": self.nv.nvmlDeviceGetPcieThroughput(self.board, self.nv.NVML_PCIE_UTIL_TX_BYTES),
                "pcie_rx_kbps": self.nv.nvmlDeviceGetPcieThroughput(self.board, self.nv.NVML_PCIE_UTIL_RX_BYTES)}

    def sample(self) -> dict:
        row = {"mig": True} if self.mig else {}
        for group, read in list(self.readers.items()):
            try:
                row.update(read())
            except self.nv.NVMLError as e:
                if isinstance(e, (self.nv.NVMLError_NotSupported, self.nv.NVMLError_FunctionNotFound)):
                    # This card will never answer it: stop asking, and say why in `nnperf devices`.
                    del self.readers[group]
                    self.missing[group] = f"not supported by this GPU or driver ({e})"
        return row

    def metrics(self) -> tuple[list[str], dict[str, str]]:
        self.sample()  # one probe finds what this card does not support
        names = {"utilization": ["gpu_util_pct", "mem_util_pct"], "memory": ["vram_used_mb", "vram_total_mb"],
                 "temperature": ["temp_c"], "power": ["power_w"], "energy": ["energy_j"],
                 "clocks": ["sm_clock_mhz", "mem_clock_mhz"], "throttle_reasons": ["throttle_reasons"],
                 "pcie": ["pcie_tx_kbps", "pcie_rx_kbps"]}
        recorded = [m for group in self.readers for m in names[group]]
        return recorded, {m: why for group, why in self.missing.items() for m in names[group]}

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:  # noqa: BLE001 - closing must not fail
            pass
