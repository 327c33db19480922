"""The telemetry backend protocol and the helpers every backend uses."""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch

# Every metric a row may carry, with its unit in its name (DESIGN.md, telemetry row).
METRICS = (
    "gpu_util_pct", "mem_util_pct", "vram_used_mb", "vram_total_mb", "power_w", "energy_j", "temp_c",
    "temp_hotspot_c", "temp_mem_c", "sm_clock_mhz", "mem_clock_mhz", "throttle_reasons", "pcie_tx_kbps",
    "pcie_rx_kbps", "torch_mem_alloc_mb", "torch_mem_reserved_mb", "torch_max_mem_alloc_mb", "cpu_util_pct",
    "sys_cpu_util_pct", "proc_rss_mb", "sys_mem_used_mb", "sys_mem_total_mb",
)
TEXT_METRICS = {"throttle_reasons"}
# Flags that describe a row rather than measure: kept only when true ("mig": the device is a MIG
# instance, and its power, energy, temperatures and clocks are those of the whole parent GPU).
FLAGS = {"mig"}
NUMERIC = frozenset(METRICS) - TEXT_METRICS - FLAGS
_INF = math.inf


class Backend(Protocol):
    """The telemetry contract: one source of samples for one device.

    Every backend class is asked `available(device)` and, when that says yes, built as `cls(device)`:
    one constructor shape for all (a vendor backend derives its GPU from the device's index). Tests
    that fake a vendor library pass it as a keyword after the device (`NvmlBackend(dev, nv=fake)`).

    `sample()` returns {metric: value} with only the metrics it could read this time; a metric it
    cannot read is absent, never 0. `close()` releases what the backend holds; it must not raise.

    `may_hang` says whether one `sample()` may block: a driver call (NVML, amdsmi) or a vendor
    command-line tool can, so the sampler gives such a backend a thread of its own and a bound on each
    call (and gives up on a call that outlasts it); one that reads process or system counters cannot,
    and the sampler calls it on its own thread. An object without the attribute (a test's fake) counts
    as one that may hang.

    Optional: `abandon()`, called from another thread when the sampler gives up on a `sample()` in
    flight: it must end that call without blocking (a tool is killed); `timeout_s`, how long one
    `sample()` may take before the sampler calls it stuck (plus a margin), for a source slower than the
    sampler's default bound (a vendor tool on a multi-GPU node); `metrics()`, (metrics it records,
    {metric it lacks: why}) for `nnperf devices`; and `read_energy_j()` or an "energy" reader group,
    an in-process energy counter read at phase edges."""

    name: str
    device: str
    may_hang: bool

    def __init__(self, device: torch.device) -> None: ...

    @classmethod
    def available(cls, device: torch.device) -> tuple[bool, str]:
        """(whether this backend can serve `device` here, why or why not) in a few words."""
        ...

    def sample(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def index_of(device) -> int:
    """The accelerator index of a torch device (cuda:N, xpu:N), 0 where it names none."""
    return getattr(device, "index", None) or 0


def number(value: Any) -> float | None:
    """A finite float from an int, float or numeric string ("31.0", "1,024", "36 C"); None for
    "N/A" and its variants, empty strings, NaN, and anything else."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, str):
        text = value.strip().replace(",", "")
        head = text.split()[0] if text else ""
        try:
            result = float(head)
        except ValueError:
            return None
        return result if math.isfinite(result) else None
    return None


def first_number(d: dict, *keys: str) -> float | None:
    """The first of `keys` whose value in `d` is a number (tools rename keys between releases)."""
    for key in keys:
        v = number(d.get(key))
        if v is not None:
            return v
    return None


def clean(raw: Any) -> dict[str, Any]:
    """Keep only known metrics with usable values: what a backend returns is not trusted blindly."""
    if not isinstance(raw, dict):
        raise TypeError(f"sample() returned {type(raw).__name__}, not a dict")
    out = {}
    for key, value in raw.items():
        if type(value) is float and key in NUMERIC:  # the common case, without number()'s checks
            if 0.0 <= value < _INF:  # false for NaN too
                out[key] = value
        elif key in FLAGS:
            if value is True:
                out[key] = True
        elif key in TEXT_METRICS:
            if isinstance(value, str) and value:
                out[key] = value
        elif key in METRICS:
            v = number(value)
            if v is not None and v >= 0:
                out[key] = v
    return out
