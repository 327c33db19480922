"""CPU and host memory through psutil; CPU package energy from RAPL (powercap) where readable."""

from __future__ import annotations

import os
from pathlib import Path

import psutil

POWERCAP = Path("/sys/class/powercap")
MB = 1024 * 1024


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

    def __init__(self, powercap: Path = POWERCAP):
        self.process = psutil.Process(os.getpid())
        # The first cpu_percent() call only starts the measurement; later calls give the average since.
        self.process.cpu_percent(None)
        psutil.cpu_percent(None)
        self.rapl = Rapl(powercap)

    @staticmethod
    def available() -> tuple[bool, str]:
        return True, "psutil"

    def sample(self) -> dict:
        mem = psutil.virtual_memory()
        row = {"cpu_util_pct": self.process.cpu_percent(None), "sys_cpu_util_pct": psutil.cpu_percent(None),
               "proc_rss_mb": self.process.memory_info().rss / MB,
               "sys_mem_used_mb": (mem.total - mem.available) / MB, "sys_mem_total_mb": mem.total / MB}
        if self.rapl.available:
            row["energy_j"] = self.rapl.joules()
        return row

    def metrics(self) -> tuple[list[str], dict[str, str]]:
        """(metrics it records, {missing metric: why})."""
        recorded = ["cpu_util_pct", "sys_cpu_util_pct", "proc_rss_mb", "sys_mem_used_mb", "sys_mem_total_mb"]
        if self.rapl.available:
            return recorded + ["energy_j"], {}
        return recorded, {"energy_j": f"no readable RAPL package counter under {POWERCAP}"}

    def close(self) -> None:
        pass
