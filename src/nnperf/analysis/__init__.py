"""Analysis of run directories and JSONL logs: plots, summaries, montages, roofline, report.

Reads only files (DESIGN.md's run directory), so it works on runs copied from other machines;
imports no training code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..errors import UsageError
from . import logs, outputs, plots, ranks, summary

SUMMARY = "summary"


@dataclass
class PlotResult:
    written: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    table: str = ""
    curves: list[Path] = field(default_factory=list)      # the per-epoch curve PNGs
    telemetry: list[Path] = field(default_factory=list)   # a PNG per telemetry metric
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)
    stragglers: pd.DataFrame = field(default_factory=pd.DataFrame)  # ranks.table: empty for single-process runs
    straggler_plot: Path | None = None


def plot_runs(paths: list[str], out: str | Path, only: list[str] | None = None, flag: str = "--out") -> PlotResult:
    """One PNG + CSV per telemetry metric, training curves, and summary.csv, all under `out`.
    Runs with several processes also get stragglers.csv and .png (ranks.table). Nothing is written
    unless every file it would write is safe to write (`flag` names `out` in the one line that says
    why not)."""
    srcs = logs.sources(paths)
    out = outputs.folder_target(flag, out)
    tele, mets = logs.telemetry(srcs), logs.metrics(srcs)
    if tele.empty and mets.empty:
        raise UsageError(f"{', '.join(paths)}: the files hold no rows to plot")
    present = logs.metric_columns(tele, plots.ORDER)
    wanted = present if only is None else only
    result = PlotResult(skipped=[m for m in (plots.ORDER if only is None else only) if m not in present])
    names = [m for m in wanted if m in present]
    curves = [k for k in plots.CURVES if k in mets.columns and mets[k].notna().any()]
    strag = ranks.table(tele, mets)
    straggling = [out / f"{ranks.STRAGGLERS}{ext}" for ext in (".csv", ".png")] if len(strag) else []
    curve_stems = {f"curve_{k}" for k in plots.CURVES}
    stems = plots.file_stems(names, taken=curve_stems | {SUMMARY} | ({ranks.STRAGGLERS} if straggling else set()))
    planned = ([out / f"{stems[m]}{ext}" for m in names for ext in (".png", ".csv")]
               + [out / f"curve_{k}.png" for k in curves] + [out / f"{SUMMARY}.csv"] + straggling)
    outputs.refuse_writing_over(flag, out, planned, outputs.read_paths(srcs, paths))
    spans = plots.validation_spans(tele) if names else {}
    for metric in names:
        png, csv = out / f"{stems[metric]}.png", out / f"{stems[metric]}.csv"
        plots.plot_metric(tele, metric, png, spans)
        plots.metric_csv(tele, metric, csv)
        result.written += [png, csv]
        result.telemetry.append(png)
    for key in curves:
        plots.plot_curve(mets, key, out / f"curve_{key}.png")
        result.written.append(out / f"curve_{key}.png")
        result.curves.append(out / f"curve_{key}.png")
    table = summary.summarise(tele, mets, names)
    outputs.write_with(out / f"{SUMMARY}.csv", lambda tmp: table.to_csv(tmp, index=False, float_format="%.10g"))
    result.written.append(out / f"{SUMMARY}.csv")
    result.summary = table
    result.table = summary.format_summary(table, names)
    if straggling:
        _write_stragglers(strag, *straggling, result)
    return result


def _write_stragglers(strag: pd.DataFrame, csv: Path, png: Path, result: PlotResult) -> None:
    outputs.write_with(csv, lambda tmp: strag.to_csv(tmp, index=False, float_format="%.10g"))
    ranks.plot(strag, png)
    result.written += [csv, png]
    result.stragglers, result.straggler_plot = strag, png
    result.table += "\n\n" + ranks.format_epochs(strag)
