"""Analysis of run directories and JSONL logs: plots, summaries, montages, roofline, report.

Reads only files (DESIGN.md's run directory), so it works on runs copied from other machines;
imports no training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import fileio
from ..errors import UsageError
from . import logs, plots, summary


@dataclass
class PlotResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    table: str = ""


def plot_runs(paths: list[str], out: str | Path, only: list[str] | None = None) -> PlotResult:
    """One PNG + CSV per telemetry metric, training curves, and summary.csv, all under `out`."""
    srcs = logs.sources(paths)
    tele, mets = logs.telemetry(srcs), logs.metrics(srcs)
    present = logs.metric_columns(tele, plots.ORDER)
    wanted = present if only is None else only
    result = PlotResult(skipped=[m for m in (plots.ORDER if only is None else only) if m not in present])
    out = Path(out)
    names = [m for m in wanted if m in present]
    spans = plots.validation_spans(tele) if names else {}
    for metric in names:
        plots.plot_metric(tele, metric, out / f"{metric}.png", spans)
        plots.metric_csv(tele, metric, out / f"{metric}.csv")
        result.written += [out / f"{metric}.png", out / f"{metric}.csv"]
    for key in plots.CURVES:
        if key in mets.columns and mets[key].notna().any():
            plots.plot_curve(mets, key, out / f"curve_{key}.png")
            result.written.append(out / f"curve_{key}.png")
    if tele.empty and mets.empty:
        raise UsageError(f"{', '.join(paths)}: the files hold no rows to plot")
    table = summary.summarise(tele, mets, names)
    fileio.write_with(out / "summary.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.10g"))
    result.written.append(out / "summary.csv")
    result.table = summary.format_summary(table, names)
    return result
