"""Vendor libraries faked at their API boundary: the real function names, constants, return shapes
and exception classes of `pynvml` (nvidia-ml-py) and `amdsmi`, with values recorded from real cards."""

from __future__ import annotations

import ctypes
import types
from enum import IntEnum


def fake_pynvml(unsupported: set[str] = frozenset(), uuids=("GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
                                                             "GPU-1234abcd-0000-1111-2222-333344445555"),
                mig: dict | None = None):
    """`uuids`: the GPUs in NVML (PCI) order. `mig`: {MIG device UUID: index of its parent GPU}; a MIG
    handle answers memory only (utilization, power, clocks... raise NotSupported, as on an A100)."""
    nv = types.SimpleNamespace()
    mig = mig or {}

    class NVMLError(Exception):
        def __init__(self, value):
            super().__init__(value)
            self.value = value

        def __str__(self):
            return {3: "Not Supported", 13: "Function Not Found"}.get(self.value, "Unknown Error")

    class NVMLError_NotSupported(NVMLError):  # noqa: N801 - the real name
        def __init__(self):
            super().__init__(3)

    class NVMLError_FunctionNotFound(NVMLError):  # noqa: N801
        def __init__(self):
            super().__init__(13)

    class NVMLError_NotFound(NVMLError):  # noqa: N801
        def __init__(self):
            super().__init__(6)

    nv.NVMLError, nv.NVMLError_NotSupported, nv.NVMLError_FunctionNotFound, nv.NVMLError_NotFound = (
        NVMLError, NVMLError_NotSupported, NVMLError_FunctionNotFound, NVMLError_NotFound)
    nv.NVML_TEMPERATURE_GPU, nv.NVML_CLOCK_SM, nv.NVML_CLOCK_MEM = 0, 1, 2
    nv.NVML_PCIE_UTIL_TX_BYTES, nv.NVML_PCIE_UTIL_RX_BYTES = 0, 1
    nv.calls = []
    nv.device_calls = []
    nv.energy_mj = [123_456_789]

    mig_ok = {"nvmlInit", "nvmlShutdown", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex",
              "nvmlDeviceGetHandleByUUID", "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo",
              "nvmlDeviceIsMigDeviceHandle", "nvmlDeviceGetDeviceHandleFromMigDeviceHandle"}

    def api(name, result):
        def call(*args):
            nv.calls.append(name)
            if args and isinstance(args[0], tuple):
                nv.device_calls.append((name, args[0]))  # which device each query asked
            if name in unsupported or (args and isinstance(args[0], tuple) and args[0][0] == "mig"
                                       and name not in mig_ok):
                raise NVMLError_NotSupported()
            return result(*args) if callable(result) else result
        setattr(nv, name, call)

    def by_uuid(u):
        if not isinstance(u, str):
            raise TypeError("the binding takes a str or bytes UUID")
        if u in uuids:
            return ("handle", uuids.index(u))
        if u in mig:
            return ("mig", u, mig[u])
        raise NVMLError_NotFound()

    def is_mig(h):
        return ctypes.c_uint(1 if h[0] == "mig" else 0)  # the real binding returns a c_uint

    def parent(h):
        if h[0] != "mig":
            raise NVMLError(2)  # NVML_ERROR_INVALID_ARGUMENT
        return ("handle", h[2])

    api("nvmlInit", None)
    api("nvmlShutdown", None)
    api("nvmlDeviceGetCount", len(uuids))
    api("nvmlDeviceGetHandleByIndex", lambda i: ("handle", i))
    api("nvmlDeviceGetHandleByUUID", by_uuid)
    api("nvmlDeviceGetUUID", lambda h: uuids[h[1]] if h[0] == "handle" else h[1])
    api("nvmlDeviceIsMigDeviceHandle", is_mig)
    api("nvmlDeviceGetDeviceHandleFromMigDeviceHandle", parent)
    # Values of a Tesla T4 under load (nvidia-smi -q -x, driver 515, in the shared fixtures).
    api("nvmlDeviceGetUtilizationRates", lambda h: types.SimpleNamespace(gpu=87, memory=41))
    api("nvmlDeviceGetMemoryInfo", lambda h: types.SimpleNamespace(total=15_843_721_216, used=4_299_161_600,
                                                                   free=11_544_559_616))
    api("nvmlDeviceGetTemperature", lambda h, sensor: 64)
    api("nvmlDeviceGetPowerUsage", lambda h: 68_450)  # milliwatts
    api("nvmlDeviceGetTotalEnergyConsumption", lambda h: nv.energy_mj[0])  # millijoules
    api("nvmlDeviceGetClockInfo", lambda h, kind: {1: 1590, 2: 5000}[kind])
    api("nvmlDeviceGetCurrentClocksEventReasons", lambda h: 0x4 | 0x20)
    api("nvmlDeviceGetCurrentClocksThrottleReasons", lambda h: 0x1)
    api("nvmlDeviceGetPcieThroughput", lambda h, c: {0: 1200, 1: 52_000}[c])  # KB/s
    return nv


class _TempType(IntEnum):
    EDGE = 0
    HOTSPOT = 1
    JUNCTION = 1
    VRAM = 2


class _TempMetric(IntEnum):
    CURRENT = 0


class _ClkType(IntEnum):
    SYS = 0
    GFX = 0
    DF = 1
    DCEF = 2
    SOC = 3
    MEM = 4


def fake_amdsmi(rocm: str = "6.0", activity_na: bool = False, no_sensors: tuple = (),
                bdfs=("0000:c1:00.0", "0000:c2:00.0")):
    """amdsmi as ROCm 6.0 (current_socket_power, cur_clk, energy key "power") or 6.4+
    (socket_power "N/A" on Navi, clk, energy_accumulator). `no_sensors`: temperature sensors
    ("EDGE", "HOTSPOT", "VRAM") whose reads raise NOT_SUPPORTED, as the edge sensor does on MI300.
    `bdfs`: the PCI address of each GPU in amdsmi order (handles "gpu0", "gpu1", ...)."""
    lib = types.SimpleNamespace()

    class AmdSmiException(Exception):
        pass

    class AmdSmiLibraryException(AmdSmiException):
        def __init__(self, err_code):
            super().__init__(err_code)
            self.err_code = err_code
            self.err_info = "AMDSMI_STATUS_NOT_SUPPORTED" if err_code == 2 else "AMDSMI_STATUS_UNKNOWN"

    lib.AmdSmiException, lib.AmdSmiLibraryException = AmdSmiException, AmdSmiLibraryException
    lib.AmdSmiTemperatureType, lib.AmdSmiTemperatureMetric, lib.AmdSmiClkType = _TempType, _TempMetric, _ClkType
    lib.amdsmi_init = lambda *a: None
    lib.amdsmi_shut_down = lambda: None
    handles = [f"gpu{i}" for i in range(len(bdfs))]
    lib.amdsmi_get_processor_handles = lambda: list(handles)
    lib.amdsmi_get_gpu_device_bdf = lambda h: bdfs[handles.index(h)]
    new = rocm >= "6.4"
    lib.amdsmi_get_gpu_activity = lambda h: (
        {"gfx_activity": "N/A", "umc_activity": "N/A", "mm_activity": "N/A"} if activity_na
        else {"gfx_activity": 97, "umc_activity": 35, "mm_activity": 0})
    lib.amdsmi_get_power_info = lambda h: (
        {"socket_power": 212, "current_socket_power": "N/A", "average_socket_power": "N/A", "gfx_voltage": 918,
         "soc_voltage": 918, "mem_voltage": 1250, "power_limit": 300} if new
        else {"current_socket_power": "N/A", "average_socket_power": 187, "gfx_voltage": 918, "soc_voltage": 918,
              "mem_voltage": 1250, "power_limit": 300})
    counter = "energy_accumulator" if new else "power"
    lib.ticks = [10_000_000]
    lib.amdsmi_get_energy_count = lambda h: {counter: lib.ticks[0], "counter_resolution": 15.259,
                                             "timestamp": 1_700_000_000}
    lib.temp_calls = []

    def temp_metric(h, kind, metric):
        lib.temp_calls.append(_TempType(kind).name)
        if _TempType(kind).name in no_sensors:
            raise AmdSmiLibraryException(2)  # AMDSMI_STATUS_NOT_SUPPORTED
        return {_TempType.EDGE: 61, _TempType.HOTSPOT: 74_000, _TempType.VRAM: 68}[kind]

    lib.amdsmi_get_temp_metric = temp_metric
    clk_key = "clk" if new else "cur_clk"
    lib.amdsmi_get_clock_info = lambda h, kind: {clk_key: {_ClkType.GFX: 2100, _ClkType.MEM: 1000}[kind],
                                                 "min_clk": 500, "max_clk": 2500}
    lib.amdsmi_get_gpu_vram_usage = lambda h: {"vram_total": 16368, "vram_used": 9120}
    return lib


def fake_tool(folder, name: str, output: str = "", delay_s: float = 0.0, hang: bool = False):
    """An executable `name` in `folder` standing in for a vendor command-line tool (put `folder` first on
    PATH). Each call appends its process id to `folder/NAME.pids`, then prints `output` after `delay_s`;
    or, with `hang`, starts a child that never ends (its id goes to the file too) and waits forever
    itself, like a tool stuck in a driver call that had spawned a helper (which keeps the output pipe
    open after the tool is gone)."""
    pids = folder / f"{name}.pids"
    lines = ["#!/bin/sh", f'echo $$ >> "{pids}"']
    if hang:
        lines += ["sleep 1000 &", f'echo $! >> "{pids}"', "exec sleep 1000"]
    else:
        answer = folder / f"{name}.out"
        answer.write_text(output)
        lines += [f"sleep {delay_s}"] if delay_s else []
        lines.append(f'cat "{answer}"')
    tool = folder / name
    tool.write_text("\n".join(lines) + "\n")
    tool.chmod(0o755)
    return pids
