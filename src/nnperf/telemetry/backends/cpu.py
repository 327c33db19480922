"""CPU and host memory through psutil; CPU package energy from RAPL (powercap) where readable."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import psutil
import torch

POWERCAP = Path("/sys/class/powercap")
MB = 1024 * 1024
SYSTEM_EVERY_S = 1.0
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_monotonic, _process_time, _pread = time.monotonic, time.process_time, getattr(os, "pread", None)


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

    def __init__(self, device: torch.device | str = "cpu", powercap: Path = POWERCAP):
        # Serves every device: the host side of a run (its device only chooses the candidates).
        self.process = psutil.Process(os.getpid())
        # Process CPU % from the process's own CPU clock (a cheap syscall, no /proc parsing); the
        # system's from psutil, whose first call only starts its measurement.
        self._last = (time.monotonic(), time.process_time())
        self._system_due = 0.0
        self._statm = _open("/proc/self/statm")
        # System CPU and memory from /proc/stat and /proc/meminfo read through kept-open descriptors and
        # parsed for the few numbers recorded (psutil parses every field: ~5x the CPU time per read).
        self._stat, self._meminfo = _open("/proc/stat"), _open("/proc/meminfo")
        self._cpu_ticks = self._system_ticks()
        self.rapl = Rapl(powercap)
        self._rapl = self.rapl if self.rapl.available else None

    @classmethod
    def available(cls, device: torch.device | None = None) -> tuple[bool, str]:
        return True, "psutil"

    def sample(self) -> dict:
        # Called ten times a second on a cold cache: every call and attribute here costs; kept flat.
        wall, cpu = _monotonic(), _process_time()
        last, self._last = self._last, (wall, cpu)
        row = {"cpu_util_pct": 100 * (cpu - last[1]) / ((wall - last[0]) or 1e-9)}
        if wall >= self._system_due:
            # Memory and system-wide figures change slowly and cost most of a sample: once a second. Even
            # /proc/self/statm through a kept-open descriptor costs 40-60 us of kernel time per read on a
            # cold cache (an AMD EPYC VM), as much as the rest of a sample.
            self._system_due = wall + SYSTEM_EVERY_S
            statm = self._statm
            rss = int(_pread(statm, 128, 0).split()[1]) * PAGE if statm is not None else self.process.memory_info().rss
            total, available = self._memory()
            row.update({"proc_rss_mb": rss / MB, "sys_cpu_util_pct": self._system_cpu_pct(),
                        "sys_mem_used_mb": (total - available) / MB, "sys_mem_total_mb": total / MB})
        if self._rapl is not None:
            row["energy_j"] = self._rapl.joules()
        return row

    def _system_ticks(self) -> tuple[int, int] | None:
        """(busy, total) clock ticks of all CPUs since boot, counted as psutil.cpu_percent counts them
        (guest time is inside user and nice; idle and iowait are not busy); None without /proc/stat."""
        if self._stat is None:
            return None
        try:
            fields = [int(x) for x in os.pread(self._stat, 256, 0).split(b"\n", 1)[0].split()[1:11]]
        except (OSError, ValueError):
            return None
        total = sum(fields) - sum(fields[8:10])  # guest, guest_nice
        return total - fields[3] - (fields[4] if len(fields) > 4 else 0), total

    def _system_cpu_pct(self) -> float:
        """System-wide CPU % since the last call (the first: since the backend started), as
        psutil.cpu_percent(None) computes it; from psutil itself where /proc/stat cannot be read."""
        now, before = self._system_ticks(), self._cpu_ticks
        if now is None or before is None:
            return psutil.cpu_percent(None)
        self._cpu_ticks = now
        busy, total = now[0] - before[0], now[1] - before[1]
        return round(100 * busy / total, 1) if total > 0 else 0.0

    def _memory(self) -> tuple[int, int]:
        """(total, available) bytes of host memory: MemTotal and MemAvailable of /proc/meminfo, which
        psutil.virtual_memory reports too; psutil itself where either is missing or implausible."""
        if self._meminfo is not None:
            try:
                text = os.pread(self._meminfo, 4096, 0)
                total, available = _kb(text, b"MemTotal:"), _kb(text, b"MemAvailable:")
            except (OSError, ValueError):
                total = available = None
            if total and available and available <= total:
                return total, available
        mem = psutil.virtual_memory()
        return mem.total, mem.available

    def metrics(self) -> tuple[list[str], dict[str, str]]:
        """(metrics it records, {missing metric: why})."""
        recorded = ["cpu_util_pct", "sys_cpu_util_pct", "proc_rss_mb", "sys_mem_used_mb", "sys_mem_total_mb"]
        if self.rapl.available:
            return recorded + ["energy_j"], {}
        return recorded, {"energy_j": f"no readable RAPL package counter under {POWERCAP}"}

    def close(self) -> None:
        for attr in ("_statm", "_stat", "_meminfo"):
            fd = getattr(self, attr)
            if fd is not None:
                setattr(self, attr, None)
                with contextlib.suppress(OSError):
                    os.close(fd)


def _open(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:
        return None


def _kb(text: bytes, key: bytes) -> int | None:
    """The bytes of one "Key:   N kB" line of /proc/meminfo, or None where it has no such line."""
    if text.startswith(key):
        at = 0
    else:
        at = text.find(b"\n" + key)
        if at < 0:
            return None
        at += 1
    start = at + len(key)
    end = text.find(b"\n", start)
    return int(text[start:end if end >= 0 else len(text)].split()[0]) * 1024
