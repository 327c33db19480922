"""Energy per (phase, epoch) window, from each device's energy counter where it has one, otherwise by
integrating sampled power over time (trapezoid rule)."""

from __future__ import annotations

import threading
from collections import defaultdict


class EnergyMeter:
    """Fed every sample; the energy between two consecutive samples of a device is charged to the
    window (phase, epoch) of the later one, so windows partition the run's energy with an error of at
    most one sampling interval at each boundary."""

    def __init__(self):
        self._lock = threading.Lock()
        self._prev: dict[tuple, tuple[float, float | None, float | None]] = {}
        self._base: dict[tuple, float] = {}
        self._windows: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.methods: dict[str, str] = {}

    def add(self, device: str, backend: str, phase: str, epoch, t: float, values: dict) -> dict:
        """Account one sample; returns `values` with energy_j counted from the sampler's start."""
        key = (device, backend)
        raw, power = values.get("energy_j"), values.get("power_w")
        if raw is not None:
            values = {**values, "energy_j": raw - self._base.setdefault(key, raw)}
        prev = self._prev.get(key)
        self._prev[key] = (t, raw, power)
        if prev is None:
            return values
        t0, raw0, power0 = prev
        if raw is not None and raw0 is not None:
            if raw < raw0:
                return values  # counter reset (driver reload): this interval is unknown
            joules, method = raw - raw0, "counter"
        elif power is not None and power0 is not None:
            joules, method = 0.5 * (power + power0) * (t - t0), "power"
        else:
            return values
        with self._lock:
            self._windows[(phase, epoch)][device] += joules
            self.methods[device] = method
        return values

    def window(self, phase: str, epoch) -> dict | None:
        """{"energy_j": total, "energy_by_device_j": {device: joules}} of a window, or None if no device
        could tell its energy."""
        with self._lock:
            by_device = dict(self._windows.get((phase, epoch), {}))
        if not by_device:
            return None
        return {"energy_j": sum(by_device.values()), "energy_by_device_j": by_device}
