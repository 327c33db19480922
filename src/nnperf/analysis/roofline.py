"""Roofline placement of the kernels in an Nsight Compute CSV export (`ncu --csv`).

Reads the long "details" page (a row per kernel and metric: ID, Kernel Name, Metric Name, Metric
Unit, Metric Value) and the wide "raw" page (a column per metric, a units row under the header).
Real captures carry noise the parser expects: a UTF-8 BOM, CRLF line ends, `==PROF==` lines and the
application's own output before the header, thousands separators ("5,323,503,232.00").

FLOPs come from the per-thread instruction counters (an FMA is 2 FLOPs) in FP64, FP32 and FP16, plus
the tensor pipe's warp instructions times the FLOPs each performs when that counter is present;
bytes from DRAM; time from gpu__time_duration or from elapsed cycles over the clock rate.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..errors import UsageError

FLOP_PREFIX = "smsp__sass_thread_inst_executed_op_"
FLOP_COUNTERS = {f"{FLOP_PREFIX}{p}{op}_pred_on.sum": (2 if op == "fma" else 1)
                 for p in "dfh" for op in ("add", "mul", "fma")}
TENSOR = "smsp__inst_executed_pipe_tensor.sum"
DRAM_TOTAL = "dram__bytes.sum"
DRAM_PARTS = (("dram__bytes_read.sum", "dram__bytes_write.sum"),
              ("dram__bytes_op_read.sum", "dram__bytes_op_write.sum"))
DURATION = "gpu__time_duration.sum"
LONG_COLUMNS = ("ID", "Kernel Name", "Metric Name", "Metric Value")
CYCLES, CLOCK = "smsp__cycles_elapsed.avg", "smsp__cycles_elapsed.avg.per_second"
USED = (*FLOP_COUNTERS, TENSOR, DRAM_TOTAL, *(p for parts in DRAM_PARTS for p in parts), DURATION, CYCLES, CLOCK)
SCALE = {"": 1, "byte": 1, "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
         "ns": 1e-9, "nsecond": 1e-9, "us": 1e-6, "usecond": 1e-6, "ms": 1e-3, "msecond": 1e-3,
         "s": 1, "second": 1, "inst": 1, "cycle": 1, "cycle/second": 1, "cycle/nsecond": 1e9,
         "cycle/usecond": 1e6, "cycle/msecond": 1e3, "hz": 1, "khz": 1e3, "mhz": 1e6, "ghz": 1e9}


@dataclass
class Kernel:
    id: str
    name: str
    flops: float
    dram_bytes: float
    seconds: float

    @property
    def intensity(self) -> float:
        return self.flops / self.dram_bytes if self.dram_bytes > 0 else math.inf

    @property
    def flops_per_s(self) -> float:
        return self.flops / self.seconds if self.seconds > 0 else math.nan


def _number(text: str) -> float | None:
    text = (text or "").strip().replace(",", "")
    if text in ("", "n/a", "N/A"):
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _csv_rows(path: Path) -> list[list[str]]:
    """The CSV part of a capture: from the header line (the first starting with "ID") to the end."""
    if path.exists() and not path.is_file():  # a folder, or a pipe that would block the reader
        raise UsageError(f"{path}: not a regular file (give an `ncu --csv` export)")
    try:
        text = path.read_text(encoding="utf-8-sig", errors="replace")
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith('"ID"')), None)
    if start is None:
        raise UsageError(f"{path}: no Nsight Compute CSV header (a line starting with \"ID\"); "
                         "export with `ncu --csv ...`")
    return [row for row in csv.reader(io.StringIO("\n".join(lines[start:]))) if row]


def read_metrics(path: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """{(launch ID, kernel name): {metric: value in base units}} from a long or wide export."""
    path = Path(path)
    rows = _csv_rows(path)
    header = rows[0]
    kernels: dict[tuple[str, str], dict[str, float]] = {}
    if "Metric Name" in header:  # long "details" page
        col = {name: header.index(name) for name in ("ID", "Kernel Name", "Metric Name", "Metric Unit",
                                                     "Metric Value") if name in header}
        lacking = [name for name in LONG_COLUMNS if name not in col]
        if lacking:
            raise UsageError(f"{path}: the CSV header has no {', '.join(repr(n) for n in lacking)} column; "
                             "export the details page with `ncu --csv --page details ...`")
        for row in rows[1:]:
            if len(row) < len(header):
                continue
            value = _number(row[col["Metric Value"]])
            unit = row[col["Metric Unit"]].strip().lower() if "Metric Unit" in col else ""
            if value is None or unit not in SCALE and unit not in ("%", "inst/cycle"):
                continue
            key = (row[col["ID"]], row[col["Kernel Name"]])
            kernels.setdefault(key, {})[row[col["Metric Name"]]] = value * SCALE.get(unit, 1)
        return kernels
    # Wide "raw" page: a units row (empty under ID) may follow the header.
    has_units = len(rows) > 1 and _number(rows[1][0]) is None
    units = rows[1] if has_units else [""] * len(header)
    name_col = header.index("Kernel Name") if "Kernel Name" in header else None
    for row in rows[2 if has_units else 1:]:
        if len(row) != len(header) or _number(row[0]) is None:
            continue
        key = (row[0], row[name_col] if name_col is not None else row[0])
        values = {}
        for metric, unit, text in zip(header, units, row):
            value, unit = _number(text), unit.strip().lower()
            if value is not None and "__" in metric and unit in SCALE:
                values[metric] = value * SCALE[unit]
        kernels[key] = values
    return kernels


def _missing(m: dict[str, float]) -> list[str]:
    missing = []
    if not any(c in m for c in FLOP_COUNTERS) and TENSOR not in m:
        missing.append(f"FLOP counters ({FLOP_PREFIX}{{d,f,h}}{{add,mul,fma}}_pred_on.sum)")
    if DRAM_TOTAL not in m and not any(all(p in m for p in parts) for parts in DRAM_PARTS):
        missing.append(f"DRAM bytes ({DRAM_TOTAL}, or dram__bytes_read.sum + dram__bytes_write.sum)")
    if DURATION not in m and not (CYCLES in m and CLOCK in m):
        missing.append(f"kernel time ({DURATION}, or {CYCLES} and {CLOCK})")
    return missing


def _check_counters(path, kid: str, name: str, m: dict[str, float]) -> None:
    """A counter that is negative or not finite means a broken export (or an edited one): refused,
    since any FLOPs, bytes or time computed from it would be wrong."""
    for metric in USED:
        value = m.get(metric)
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{path}: kernel {kid} ({name[:60]}) has {metric} = {value:g}; a counter must be a "
                             "finite number, 0 or more (export the capture again)")
    if CLOCK in m and DURATION not in m and not m[CLOCK] > 0:
        raise UsageError(f"{path}: kernel {kid} ({name[:60]}) has {CLOCK} = 0, so its time is unknown; "
                         f"export {DURATION} too")


def kernels(path: str | Path, tensor_flops_per_inst: float = 4096) -> list[Kernel]:
    """Every kernel launch in the export, or a UsageError naming the metrics it lacks."""
    found = read_metrics(path)
    if not found:
        raise UsageError(f"{path}: no kernel rows under the CSV header")
    out = []
    for (kid, name), m in found.items():
        missing = _missing(m)
        if missing:
            raise UsageError(f"{path}: kernel {kid} ({name[:60]}) lacks {'; '.join(missing)}; "
                             "profile with the roofline metrics (ncu --set roofline, or --metrics with them)")
        _check_counters(path, kid, name, m)
        flops = sum(m.get(c, 0.0) * k for c, k in FLOP_COUNTERS.items()) + m.get(TENSOR, 0.0) * tensor_flops_per_inst
        dram = m[DRAM_TOTAL] if DRAM_TOTAL in m else next(sum(m[p] for p in parts) for parts in DRAM_PARTS
                                                          if all(p in m for p in parts))
        seconds = m[DURATION] if DURATION in m else m[CYCLES] / m[CLOCK]
        if not all(math.isfinite(v) for v in (flops, dram, seconds)):
            raise UsageError(f"{path}: kernel {kid} ({name[:60]}) has counters too large to add up "
                             f"(FLOPs {flops:g}, bytes {dram:g}, seconds {seconds:g}); export the capture again")
        out.append(Kernel(kid, name, flops, dram, seconds))
    return out


def summary(ks: list[Kernel], peak_flops: float, peak_bw: float) -> pd.DataFrame:
    """One row per kernel: FLOPs, bytes, intensity, achieved FLOP/s and what bounds it."""
    ridge = peak_flops / peak_bw
    rows = []
    for k in ks:
        ceiling = min(peak_flops, k.intensity * peak_bw)
        rows.append({"id": k.id, "kernel": k.name, "flops": k.flops, "dram_bytes": k.dram_bytes,
                     "seconds": k.seconds, "intensity_flop_per_byte": k.intensity,
                     "achieved_tflops": k.flops_per_s / 1e12, "ceiling_tflops": ceiling / 1e12,
                     "share_of_ceiling": k.flops_per_s / ceiling if ceiling > 0 else math.nan,
                     "bound": "memory" if k.intensity < ridge else "compute"})
    return pd.DataFrame(rows)


def short_name(name: str, limit: int = 40) -> str:
    """`void gemm_kernel<float>(float *, ...)` -> `gemm_kernel<float>`, shortened to `limit`."""
    base = name.split("(")[0].replace("void ", "").strip() or name
    return base if len(base) <= limit else base[: limit - 1] + "…"


def plot(ks: list[Kernel], peak_flops: float, peak_bw: float, out: str | Path, label: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from . import outputs
    from .plots import text as _text  # a '$' in a kernel name or --label is not maths notation

    ridge = peak_flops / peak_bw
    placed = [k for k in ks if k.flops > 0 and 0 < k.intensity < math.inf and k.seconds > 0]
    lo = min([ridge / 100] + [k.intensity / 3 for k in placed])
    hi = max([ridge * 100] + [k.intensity * 3 for k in placed])
    x = np.logspace(math.log10(lo), math.log10(hi), 200)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    ax.loglog(x, np.minimum(peak_flops, x * peak_bw) / 1e12, color="black", linewidth=1.6,
              label=f"roof: {peak_flops / 1e12:g} TFLOP/s, {peak_bw / 1e9:g} GB/s")
    ax.axvline(ridge, color="grey", linestyle=":", linewidth=1, label=f"ridge {ridge:.1f} FLOP/byte")
    for k in placed:
        ax.scatter(k.intensity, k.flops_per_s / 1e12, s=36, zorder=3, label=_text(f"{k.id}: {short_name(k.name)}"))
    ax.set_xlabel("Arithmetic intensity (FLOP per DRAM byte)")
    ax.set_ylabel("Performance (TFLOP/s)")
    ax.set_title(_text(f"Roofline{f' — {label}' if label else ''}"))
    ax.grid(which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.11, right=0.97, top=0.92, bottom=0.12)
    try:
        outputs.write_with(out, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
