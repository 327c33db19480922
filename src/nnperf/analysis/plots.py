"""Telemetry time series and training curves as PNG + CSV, several runs overlaid."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.csv as pa_csv  # noqa: E402
import pandas as pd  # noqa: E402

from .. import names  # noqa: E402
from . import outputs  # noqa: E402

# Telemetry metrics in the order people read them, with a title (units come from the name's suffix).
TITLES = {
    "gpu_util_pct": "Accelerator utilisation", "mem_util_pct": "Memory-controller utilisation",
    "vram_used_mb": "Device memory used", "vram_total_mb": "Device memory total", "power_w": "Board power",
    "energy_j": "Energy since start", "temp_c": "Temperature", "temp_hotspot_c": "Hotspot temperature",
    "temp_mem_c": "Memory temperature", "sm_clock_mhz": "Core clock", "mem_clock_mhz": "Memory clock",
    "pcie_tx_kbps": "PCIe transmit", "pcie_rx_kbps": "PCIe receive",
    "torch_mem_alloc_mb": "PyTorch allocated memory", "torch_mem_reserved_mb": "PyTorch reserved memory",
    "torch_max_mem_alloc_mb": "PyTorch peak allocated memory", "cpu_util_pct": "Process CPU utilisation",
    "sys_cpu_util_pct": "System CPU utilisation", "proc_rss_mb": "Process resident memory",
    "sys_mem_used_mb": "System memory used", "sys_mem_total_mb": "System memory total",
}
ORDER = tuple(TITLES)
UNITS = {"_pct": "%", "_mb": "MB", "_w": "W", "_j": "J", "_c": "°C", "_mhz": "MHz", "_kbps": "kB/s", "_s": "s"}
CURVES = {"loss": "Loss", "top1": "Top-1 accuracy", "top5": "Top-5 accuracy", "lr": "Learning rate"}
MAX_POINTS = 1600  # per line: a min and a max per pixel column of the plot; more only slows drawing


def file_stems(metrics: list[str], taken: set[str] = frozenset()) -> dict[str, str]:
    """{metric: file name stem}. Metric keys come from the logs, which may be copied or edited, so
    each is made a safe single name (never '..' or a '/'), and two keys that end up alike (also
    when they differ only in case, as on a case-insensitive disk) or like a name in `taken` get
    '-2', '-3', ... rather than writing over each other."""
    used = {t.lower() for t in taken}
    stems = {}
    for metric in metrics:
        base = names.safe_component(metric, fallback="metric")
        stem, n = base, 1
        while stem.lower() in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem.lower())
        stems[metric] = stem
    return stems


def text(value: object) -> str:
    """Text from the data for a title or legend: a '$' would start matplotlib's maths notation, and
    a bad formula fails the whole figure."""
    shown = "".join(c if c.isprintable() else "?" for c in str(value))  # no glyph for NUL and friends
    return shown.replace("$", r"\$")


def unit(metric: str) -> str:
    return next((u for suffix, u in UNITS.items() if metric.endswith(suffix)), "")


def title(metric: str) -> str:
    return TITLES.get(metric, metric.replace("_", " "))


def axis_label(metric: str) -> str:
    u = unit(metric)
    return f"{title(metric)} ({u})" if u else title(metric)


def _thin(x: pd.Series, y: pd.Series) -> tuple[pd.Series, pd.Series]:
    """At most ~MAX_POINTS points per line, keeping each bucket's minimum and maximum so that
    spikes stay visible."""
    if len(x) <= MAX_POINTS:
        return x, y
    buckets = pd.Series(range(len(x)), index=x.index) * (MAX_POINTS // 2) // len(x)
    keep = pd.concat([y.groupby(buckets.values).idxmin(), y.groupby(buckets.values).idxmax()]).sort_values()
    keep = keep.drop_duplicates()
    return x.loc[keep], y.loc[keep]


def phase_spans(run_rows: pd.DataFrame, phase: str = "val") -> list[tuple[float, float]]:
    """(start, end) in elapsed seconds of each stretch of consecutive rows in `phase`; a stretch
    ends where the next row of another phase begins (a short phase may have a single row)."""
    times = run_rows.drop_duplicates("t")
    inside = times["phase"].eq(phase).to_numpy()
    elapsed = times["elapsed_s"].to_numpy()
    before = np.concatenate([[False], inside[:-1]])
    starts = np.flatnonzero(inside & ~before)
    ends = np.flatnonzero(~inside & before)  # the first row after each stretch
    end_times = list(elapsed[ends]) + [elapsed[-1]] * (len(starts) - len(ends))
    return [(float(a), float(b)) for a, b in zip(elapsed[starts], end_times)]


def series_label(run: str, device: str, several_devices: bool) -> str:
    return text(f"{run} · {device}" if several_devices and device else run)


def rank_label(run: str, rank: float, device: str, several_runs: bool) -> str:
    """A line of one process of a multi-process run: "rank1 cuda:1", the run first when the figure
    holds several runs (the title names a lone one)."""
    own = " ".join(s for s in (f"rank{int(rank)}", device) if s)
    return text(f"{run} · {own}" if several_runs else own)


def _series(rows: pd.DataFrame):
    """((run, rank, device), rows) per line: a line per (run, device), and per rank too where rows
    carry one (several processes' rows of a device would zigzag between them on one line)."""
    if "rank" not in rows.columns:
        for (run, device), part in rows.groupby(["run", "device"], sort=True):
            yield (run, np.nan, device), part
        return
    for key, part in rows.groupby(["run", "rank", "device"], sort=True, dropna=False):
        yield key, part


def validation_spans(df: pd.DataFrame) -> dict[str, list[tuple[float, float]]]:
    return {run: phase_spans(_first_rank(rows)) for run, rows in df.groupby("run", sort=False)}


def _first_rank(run_rows: pd.DataFrame) -> pd.DataFrame:
    """One process's rows of a multi-process run: the ranks change phase a moment apart, and their
    rows interleaved would cut a validation span into slivers."""
    if "rank" not in run_rows.columns or run_rows["rank"].isna().all():
        return run_rows
    return run_rows[run_rows["rank"] == run_rows["rank"].min()]


def plot_metric(df: pd.DataFrame, metric: str, path: Path, spans_by_run: dict | None = None) -> None:
    """One PNG: `metric` against seconds since start, a line per (run, device), and per rank for a
    multi-process run, val phases shaded (`spans_by_run` from validation_spans(df), computed here
    when not given)."""
    rows = df[df[metric].notna()]
    several_devices = rows.groupby("run")["device"].nunique().max() > 1
    several_runs = rows["run"].nunique() > 1
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=110)
    for (run, rank, device), part in _series(rows):
        x, y = _thin(part["elapsed_s"], part[metric].astype(float))
        label = (series_label(run, device, several_devices) if pd.isna(rank)
                 else rank_label(run, rank, device, several_runs))
        ax.plot(x, y, linewidth=1.0, label=label)
    spans_by_run = validation_spans(df) if spans_by_run is None else spans_by_run
    spans = {(round(a, 1), round(b, 1)) for run in rows["run"].unique() for a, b in spans_by_run.get(run, [])}
    for start, end in sorted(spans):
        ax.axvspan(start, max(end, start + 1e-3), color="grey", alpha=0.15, linewidth=0,
                   label="validation (shaded)" if (start, end) == min(spans) else None)
    ax.set_title(text(f"{title(metric)}" + (f" — {rows['run'].iloc[0]}" if rows["run"].nunique() == 1 else "")))
    ax.set_xlabel("Time since start (s)")
    ax.set_ylabel(text(axis_label(metric)))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def plot_curve(metrics: pd.DataFrame, key: str, path: Path) -> None:
    """Per-epoch training curve: train solid, validation dashed, one colour per run."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for run, part in metrics.groupby("run", sort=True):
        colour = None
        for phase, style in (("train", "-"), ("val", "--")):
            rows = part[(part["phase"] == phase) & part[key].notna()].sort_values("epoch")
            if rows.empty:
                continue
            (line,) = ax.plot(rows["epoch"], rows[key], style, marker="o", markersize=3, color=colour,
                              label=text(f"{run} {phase}" if key != "lr" else run))
            colour = line.get_color()
    ax.set_title(CURVES.get(key, key) + (" per epoch" if key != "lr" else " at the end of each epoch"))
    ax.set_xlabel("Epoch")
    ax.set_ylabel(CURVES.get(key, key))
    if key in ("top1", "top5"):
        ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def _save(fig, path: Path) -> None:
    # Fixed margins that fit the longest labels: tight_layout would draw every figure twice.
    width = fig.get_figwidth()
    fig.subplots_adjust(left=0.95 / width, right=1 - 0.15 / width, top=0.9, bottom=0.14)
    try:
        outputs.write_with(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)


def metric_csv(df: pd.DataFrame, metric: str, path: Path) -> None:
    cols = [c for c in ("run", "rank", "host", "device", "phase", "epoch", "step", "t", "elapsed_s") if c in df.columns]
    rows = pa.Table.from_pandas(df.loc[df[metric].notna(), cols + [metric]], preserve_index=False)
    # Arrow's writer: ~7x faster than DataFrame.to_csv on million-row logs.
    outputs.write_with(path, lambda tmp: pa_csv.write_csv(rows, tmp))
