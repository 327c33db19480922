"""Energy per (phase, epoch) window, from each device's energy counter where it has one, otherwise by
integrating sampled power over time (trapezoid rule)."""

from __future__ import annotations

import threading
from collections import defaultdict


class EnergyMeter:
    """Fed every sample; the energy between two consecutive samples of a device is charged to the
    window (phase, epoch) of the later one. A counter read at each phase change (`edge`) closes one
    window and opens the next exactly; without one (a device known by its power alone), a boundary's
    error is at most one sampling interval."""

    def __init__(self):
        self._lock = threading.Lock()
        # (device, backend) -> its last reading (t, counter, power[, "edge" for one taken at a phase change])
        self._prev: dict[tuple, tuple] = {}
        self._base: dict[tuple, float] = {}
        self._windows: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.methods: dict[str, str] = {}

    def add(self, device: str, backend: str, phase: str, epoch, t: float, values: dict) -> dict:
        """Account one sample; returns `values` with energy_j counted from the sampler's start."""
        key = (device, backend)
        raw, power = values.get("energy_j"), values.get("power_w")
        with self._lock:
            if raw is not None:
                values = {**values, "energy_j": raw - self._base.setdefault(key, raw)}
            prev = self._prev.get(key)
            if prev is not None and len(prev) > 3 and t < prev[0]:
                # Started before the phase edge read since: the edge already closed that interval.
                return values
            self._prev[key] = (t, raw, power)
            if prev is not None:
                self._charge(device, phase, epoch, prev, t, raw, power)
        return values

    def edge(self, device: str, backend: str, phase: str, epoch, t: float, raw: float | None) -> None:
        """An energy counter read at a phase change: the energy since the device's last reading is
        charged to the window (phase, epoch) that ends now, and the next sample's interval starts here,
        so a phase shorter than the sampling interval still gets its energy, and no other phase's."""
        if raw is None:
            return
        key = (device, backend)
        with self._lock:
            self._base.setdefault(key, raw)
            prev = self._prev.get(key)
            self._prev[key] = (t, raw, None, "edge")
            if prev is not None:
                self._charge(device, phase, epoch, prev, t, raw, None)

    def _charge(self, device: str, phase: str, epoch, prev: tuple, t: float, raw, power) -> None:
        """Charge the interval from reading `prev` to (t, raw, power) to (phase, epoch); the lock is held."""
        t0, raw0, power0 = prev[:3]
        if raw is not None and raw0 is not None:
            if raw < raw0:
                return  # counter reset (driver reload): this interval is unknown
            joules, method = raw - raw0, "counter"
        elif power is not None and power0 is not None:
            joules, method = 0.5 * (power + power0) * (t - t0), "power"
        else:
            return
        self._windows[(phase, epoch)][device] += joules
        self.methods[device] = method

    def window(self, phase: str, epoch) -> dict | None:
        """{"energy_j": total, "energy_by_device_j": {device: joules}} of a window, or None if no device
        could tell its energy."""
        with self._lock:
            by_device = dict(self._windows.get((phase, epoch), {}))
        if not by_device:
            return None
        return {"energy_j": sum(by_device.values()), "energy_by_device_j": by_device}
