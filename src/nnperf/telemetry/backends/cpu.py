"""CPU and host memory through psutil; CPU package energy from RAPL (powercap) where readable."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil

POWERCAP = Path("/sys/class/powercap")
MB = 1024 * 1024
SYSTEM_EVERY_S = 1.0
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Rapl:
    """Cumulative energy of the CPU packages from the RAPL counters in sysfs, in joules.

    Each package domain (`intel-rapl:N`, name "package-N") counts microjoules up to
    `max_energy_range_uj` and wraps to zero; wraps are added back, so the total only grows.
    """

    def __init__(self, root: Path = POWERCAP):
        self.domains = []
        for d in sorted(root.glob("intel-rapl:*")):
            name = (d / "name").read_text().strip() if (d / "name").is_file() else ""
            if ":" in d.name[len("intel-rapl:"):] or not name.startswith("package"):
                continue  # sub-domains (core, uncore, dram) are inside the package total
            try:
                max_uj = int((d / "max_energy_range_uj").read_text())
                last = int((d / "energy_uj").read_text())
            except (OSError, ValueError):
                continue  # not readable (recent kernels restrict it to root)
            self.domains.append([d / "energy_uj", max_uj, last, 0])

    @property
    def available(self) -> bool:
        return bool(self.domains)

    def joules(self) -> float:
        total_uj = 0
        for domain in self.domains:
            path, max_uj, last, wrapped = domain
            now = int(path.read_text())
            if now < last:
                wrapped += max_uj
            domain[2], domain[3] = now, wrapped
            total_uj += wrapped + now
        return total_uj / 1e6


class CpuBackend:
    name = "cpu"
    device = "cpu"
    may_hang = False  # reads process counters: it cannot block, so the sampler calls it directly

    def __init__(self, powercap: Path = POWERCAP):
        self.process = psutil.Process(os.getpid())
        # Process CPU % from the process's own CPU clock (a cheap syscall, no /proc parsing); the
        # system's from psutil, whose first call only starts its measurement.
        self._last = (time.monotonic(), time.process_time())
        self._system_due = 0.0
        try:
            self._statm = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._statm = None
        psutil.cpu_percent(None)
        self.rapl = Rapl(powercap)

    @staticmethod
    def available() -> tuple[bool, str]:
        return True, "psutil"

    def sample(self) -> dict:
        wall, cpu = time.monotonic(), time.process_time()
        (wall0, cpu0), self._last = self._last, (wall, cpu)
        row = {"cpu_util_pct": 100 * (cpu - cpu0) / max(wall - wall0, 1e-9),
               "proc_rss_mb": self._rss_bytes() / MB}
        if wall >= self._system_due:
            # System-wide figures change slowly and cost most of a sample (/proc parsing): once a second.
            self._system_due = wall + SYSTEM_EVERY_S
            mem = psutil.virtual_memory()
            row.update({"sys_cpu_util_pct": psutil.cpu_percent(None), "sys_mem_used_mb": (mem.total - mem.available) / MB,
                        "sys_mem_total_mb": mem.total / MB})
        if self.rapl.available:
            row["energy_j"] = self.rapl.joules()
        return row

    def _rss_bytes(self) -> int:
        # /proc/self/statm read through a kept-open descriptor costs a few microseconds, psutil ~20.
        if self._statm is not None:
            return int(os.pread(self._statm, 128, 0).split()[1]) * PAGE
        return self.process.memory_info().rss

    def metrics(self) -> tuple[list[str], dict[str, str]]:
        """(metrics it records, {missing metric: why})."""
        recorded = ["cpu_util_pct", "sys_cpu_util_pct", "proc_rss_mb", "sys_mem_used_mb", "sys_mem_total_mb"]
        if self.rapl.available:
            return recorded + ["energy_j"], {}
        return recorded, {"energy_j": f"no readable RAPL package counter under {POWERCAP}"}

    def close(self) -> None:
        if self._statm is not None:
            os.close(self._statm)
            self._statm = None
