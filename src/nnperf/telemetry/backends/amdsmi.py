"""AMD GPUs through the `amdsmi` Python package (ROCm 6+), with the key names of each release."""

from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from .base import first_number, index_of, number


def load_amdsmi():
    return importlib.import_module("amdsmi")


def visible_index(hip_index: int, env: dict | None = None) -> int:
    """The amdsmi processor for HIP device `hip_index`, through the *_VISIBLE_DEVICES lists."""
    env = env if env is not None else os.environ
    for var in ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        entries = [e.strip() for e in env.get(var, "").split(",") if e.strip()]
        if entries and entries[hip_index].isdigit():
            return int(entries[hip_index])
    return hip_index


def pci_bdf(domain, bus, device, function: int = 0) -> str:
    """The "DDDD:BB:DD.F" spelling of a PCI address, as amdsmi_get_gpu_device_bdf prints it."""
    return f"{int(domain):04x}:{int(bus):02x}:{int(device):02x}.{int(function):x}"


def _bdf_key(bdf, with_function: bool = True) -> str | None:
    """A BDF normalised for comparison: lower case, full domain, and without ".F" unless asked."""
    if bdf is None:
        return None
    text = (bdf.decode() if isinstance(bdf, (bytes, bytearray)) else str(bdf)).strip().lower()
    try:
        head, _, function = text.partition(".")
        parts = head.split(":")
        if len(parts) == 2:
            parts = ["0", *parts]  # "BB:DD.F" without a domain
        domain, bus, device = (int(x, 16) for x in parts)
        key = f"{domain:04x}:{bus:02x}:{device:02x}"
        return f"{key}.{int(function or '0', 16):x}" if with_function else key
    except ValueError:
        return None


def torch_bdf(hip_index: int) -> str | None:
    """The PCI address of HIP device `hip_index` as torch sees it (HIP order, with HIP_ and
    ROCR_VISIBLE_DEVICES applied), function 0; None without a GPU or where this torch lacks the
    pci_domain_id / pci_bus_id / pci_device_id properties."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(hip_index)
        ids = [getattr(props, a, None) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")]
        if any(i is None for i in ids):
            return None
        return pci_bdf(*ids)
    except Exception:  # noqa: BLE001 - no address: the index mapping is used instead
        return None


def celsius(value) -> float | None:
    # The API documents millidegrees, yet amd-smi prints the raw value as degrees C and real
    # captures read 36 C: take degrees, but scale a value no GPU can reach.
    v = number(value)
    return v / 1000 if v is not None and v > 200 else v


# (metric, AmdSmiTemperatureType member): edge, junction (hotspot) and memory (VRAM) sensors.
TEMP_SENSORS = (("temp_c", "EDGE"), ("temp_hotspot_c", "HOTSPOT"), ("temp_mem_c", "VRAM"))


def _not_supported(e: Exception) -> bool:
    return "NOT_SUPPORTED" in str(getattr(e, "err_info", "")) or "not supported" in str(e).lower()


class AmdSmiBackend:
    name = "amdsmi"
    may_hang = True  # driver calls can block: its own thread and bound

    def __init__(self, device: torch.device | str, lib=None):
        hip_index = index_of(torch.device(device))
        self.lib = lib or load_amdsmi()
        self.lib.amdsmi_init()
        self.device = f"cuda:{hip_index}"
        handles = self.lib.amdsmi_get_processor_handles()
        # ROCR_ and HIP_VISIBLE_DEVICES compose and amdsmi need not list GPUs in HIP order: the PCI
        # address names the same card in both; the index mapping is the fallback.
        self.handle = self._by_bdf(handles, torch_bdf(hip_index))
        if self.handle is None:
            self.handle = handles[visible_index(hip_index)]
        self.missing: dict[str, str] = {}
        self.no_sensor: dict[str, str] = {}  # temperature metric -> why its sensor is never read
        self.readers: dict[str, Callable[[], dict]] = {
            "activity": self._activity, "power": self._power, "energy": self._energy,
            "temperature": self._temperature, "clocks": self._clocks, "vram": self._vram}

    def _by_bdf(self, handles, bdf: str | None):
        """The handle whose amdsmi BDF is `bdf`: the exact address first, then any function of the
        same device (torch reports no function number); None when none matches."""
        get = getattr(self.lib, "amdsmi_get_gpu_device_bdf", None)
        if bdf is None or get is None:
            return None
        known = []
        for handle in handles:
            try:
                known.append((handle, get(handle)))
            except Exception:  # noqa: BLE001 - a handle without an address cannot match
                continue
        for with_function in (True, False):
            want = _bdf_key(bdf, with_function)
            for handle, theirs in known:
                if want is not None and _bdf_key(theirs, with_function) == want:
                    return handle
        return None

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        if torch.device(device).type != "cuda":
            return False, "amdsmi serves ROCm (cuda) devices only"
        try:
            lib = load_amdsmi()
            lib.amdsmi_init()
            return len(lib.amdsmi_get_processor_handles()) > 0, "amdsmi (ROCm)"
        except ImportError:
            return False, "the amdsmi package is not installed (it ships with ROCm: pip install /opt/rocm/share/amd_smi)"
        except Exception as e:  # noqa: BLE001 - any failure means: not usable here
            return False, f"amdsmi did not start ({e})"

    def _activity(self) -> dict:
        a = self.lib.amdsmi_get_gpu_activity(self.handle)
        return {"gpu_util_pct": number(a.get("gfx_activity")), "mem_util_pct": number(a.get("umc_activity"))}

    def _power(self) -> dict:
        # ROCm 7 fills socket_power, MI300 reports current_, older cards average_socket_power.
        p = self.lib.amdsmi_get_power_info(self.handle)
        return {"power_w": first_number(p, "socket_power", "current_socket_power", "average_socket_power")}

    def _energy(self) -> dict:
        e = self.lib.amdsmi_get_energy_count(self.handle)
        ticks = first_number(e, "energy_accumulator", "power")  # renamed in ROCm 6.4
        resolution = number(e.get("counter_resolution"))
        if ticks is None or resolution is None:
            return {}
        return {"energy_j": ticks * resolution / 1e6}  # ticks x resolution = microjoules

    def _temperature(self) -> dict:
        """Each sensor on its own: MI300 has no edge sensor, yet its hotspot and memory read fine. A
        sensor the GPU lacks is not asked again; the group fails only when every sensor did."""
        kind, metric = self.lib.AmdSmiTemperatureType, self.lib.AmdSmiTemperatureMetric.CURRENT
        out, error = {}, None
        for key, sensor in TEMP_SENSORS:
            if key in self.no_sensor or not hasattr(kind, sensor):
                continue
            try:
                out[key] = celsius(self.lib.amdsmi_get_temp_metric(self.handle, getattr(kind, sensor), metric))
            except self.lib.AmdSmiLibraryException as e:
                error = e
                if _not_supported(e):
                    self.no_sensor[key] = f"no {sensor.lower()} sensor on this GPU ({getattr(e, 'err_info', None) or e})"
        if error is not None and not any(v is not None for v in out.values()):
            raise error  # nothing read: sample() judges the group as a whole
        return out

    def _clocks(self) -> dict:
        clk = self.lib.AmdSmiClkType
        gfx = self.lib.amdsmi_get_clock_info(self.handle, clk.GFX)
        mem = self.lib.amdsmi_get_clock_info(self.handle, clk.MEM)
        return {"sm_clock_mhz": first_number(gfx, "clk", "cur_clk"),
                "mem_clock_mhz": first_number(mem, "clk", "cur_clk")}

    def _vram(self) -> dict:
        v = self.lib.amdsmi_get_gpu_vram_usage(self.handle)
        return {"vram_used_mb": number(v.get("vram_used")), "vram_total_mb": number(v.get("vram_total"))}

    def sample(self) -> dict:
        row = {}
        for group, read in list(self.readers.items()):
            try:
                values = {k: v for k, v in read().items() if v is not None}
            except self.lib.AmdSmiLibraryException as e:
                if _not_supported(e):
                    del self.readers[group]
                    self.missing[group] = f"not supported on this GPU ({e})"
                continue
            if not values and group not in self.missing:
                self.missing[group] = "the driver answers N/A"
            row.update(values)
        return row

    def metrics(self) -> tuple[list[str], dict[str, str]]:
        recorded, why = metrics_from_probe(self.sample(), self.missing, GROUP_METRICS)
        for key, reason in self.no_sensor.items():
            if key in why:
                why[key] = reason
        return recorded, why

    def close(self) -> None:
        try:
            self.lib.amdsmi_shut_down()
        except Exception:  # noqa: BLE001 - closing must not fail
            pass


GROUP_METRICS = {"activity": ["gpu_util_pct", "mem_util_pct"], "power": ["power_w"], "energy": ["energy_j"],
                 "temperature": ["temp_c", "temp_hotspot_c", "temp_mem_c"], "clocks": ["sm_clock_mhz", "mem_clock_mhz"],
                 "vram": ["vram_used_mb", "vram_total_mb"]}


def metrics_from_probe(row: dict, missing: dict[str, str], groups: dict[str, list[str]]):
    """(metrics one sample produced, {metric it lacks: why}) for `nnperf devices`."""
    recorded = sorted(row)
    why = {}
    for group, names in groups.items():
        for name in names:
            if name not in row:
                why[name] = missing.get(group, "the device did not report it")
    return recorded, why
