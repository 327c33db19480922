"""Runs side by side: one column per run, the facts and results, then the config keys that differ."""

from __future__ import annotations

import pandas as pd

from ..errors import UsageError
from . import logs, plots, ranks, runinfo, summary


STRAGGLER_ROW = "slowest rank (mean step-time ratio)"


def _fmt(value) -> str:
    return summary.format_number(value) if value is None or isinstance(value, float) else str(value)


def side_by_side(srcs: list[logs.Source]) -> tuple[pd.DataFrame, list[str]]:
    """(table with a row per fact and a column per run, the config keys that differ)."""
    tele, mets = logs.telemetry(srcs), logs.metrics(srcs)
    _require_rows(srcs, tele, mets)
    names = logs.metric_columns(tele, plots.ORDER)
    table = summary.summarise(tele, mets, names).set_index("run") if len(tele) or len(mets) else pd.DataFrame()
    configs = [runinfo.config(s) for s in srcs]
    differ = runinfo.differing_keys(configs)
    strag = ranks.table(tele, mets)  # empty unless some run has several processes
    columns = {}
    for src, cfg in zip(srcs, configs):
        env = runinfo.env(src)
        best = runinfo.final(mets[mets["run"] == src.label]) if len(mets) else {}
        test = runinfo.test_result(src)
        row = table.loc[src.label] if src.label in table.index else pd.Series(dtype=object)
        col = {f"config: {k}": cfg.get(k) for k in runinfo.HEADLINE if k in cfg}
        col.update({"device": env.get("device_name") or env.get("device"), "precision": env.get("precision"),
                    "final top-1": best.get("top1"), "final top-5": best.get("top5"),
                    "best epoch": best.get("epoch"), "test top-1": test.get("top1"),
                    "time (s)": row.get("duration_s"), "images/s": row.get("images_per_s"),
                    "energy (J)": row.get("energy_j"), "energy/epoch (J)": row.get("energy_per_epoch_j"),
                    "MFU (mean of epochs)": runinfo.mean_mfu(mets[mets["run"] == src.label] if len(mets) else mets)})
        for m in ("gpu_util_pct", "power_w", "cpu_util_pct"):
            if f"{m}_mean" in row:
                col[f"mean {m}"] = row[f"{m}_mean"]
        if len(strag):
            col[STRAGGLER_ROW] = ranks.headline(strag, src.label)
        col.update({f"differs: {k}": cfg.get(k) for k in differ if k not in runinfo.HEADLINE})
        columns[src.label] = col
    frame = pd.DataFrame(columns)
    frame = frame.loc[[i for i in frame.index if frame.loc[i].notna().any()]]
    if frame.empty:
        raise UsageError(f"{_where(srcs)}: nothing to compare (no results, times or config in these runs' files)")
    return frame, differ


def _where(srcs: list[logs.Source]) -> str:
    return ", ".join(str(s.run_dir or s.metrics or s.telemetry[0]) for s in srcs)


def _require_rows(srcs: list[logs.Source], tele: pd.DataFrame, mets: pd.DataFrame) -> None:
    """One line naming the runs whose logs hold no rows: a column of dashes compares nothing."""
    have = set(tele.get("run", [])) | set(mets.get("run", []))
    empty = [s for s in srcs if s.label not in have]
    if empty:
        raise UsageError(f"{_where(empty)}: nothing to compare: no metrics or telemetry rows "
                         f"(an empty or unfinished run?); leave {'it' if len(empty) == 1 else 'them'} out")


def format_table(frame: pd.DataFrame) -> str:
    return frame.apply(lambda col: col.map(_fmt)).to_string()
