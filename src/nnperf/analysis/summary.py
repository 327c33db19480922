"""Per-run summary: duration, throughput, energy, accuracy, and mean/max/p95 of each metric."""

from __future__ import annotations

import pandas as pd

from .plots import unit

STATS = ("mean", "max", "p95")


def _energy(tele: pd.DataFrame, mets: pd.DataFrame) -> float | None:
    """Joules for the run: the per-epoch figures the training loop measured when it has them, else
    the cumulative counters' rise per device; None when the hardware never said. With several
    processes a device is one per host: hosts' "cuda:0"s differ, a host's ranks share its CPU."""
    if "energy_j" in mets.columns and mets["energy_j"].notna().any():
        return float(mets["energy_j"].sum())
    if "energy_j" in tele.columns and tele["energy_j"].notna().any():
        rows = tele.dropna(subset=["energy_j"])
        keys = [rows["host"].fillna(""), "device"] if "host" in rows.columns else "device"
        counters = rows.groupby(keys)["energy_j"]
        return float((counters.max() - counters.min()).sum())
    return None


def _run_row(run: str, tele: pd.DataFrame, mets: pd.DataFrame, metric_names: list[str]) -> dict:
    row: dict = {"run": run}
    train = mets[mets["phase"] == "train"] if "phase" in mets.columns else mets.iloc[0:0]
    val = mets[mets["phase"] == "val"] if "phase" in mets.columns else mets.iloc[0:0]
    if len(tele):
        row["duration_s"] = float(tele["t"].max() - tele["t"].min())
    elif "seconds" in mets.columns and len(mets):
        row["duration_s"] = float(mets["seconds"].sum())
    if "epoch" in mets.columns and mets["epoch"].notna().any():
        row["epochs"] = int(mets["epoch"].max())
    if {"images", "seconds"} <= set(train.columns) and train["seconds"].sum() > 0:
        row["images_per_s"] = float(train["images"].sum() / train["seconds"].sum())
    energy = _energy(tele, mets)
    if energy is not None:
        row["energy_j"] = energy
        if row.get("epochs"):
            row["energy_per_epoch_j"] = energy / row["epochs"]
    if "top1" in val.columns and val["top1"].notna().any():
        row["best_val_top1"] = float(val["top1"].max())
        row["final_val_top1"] = float(val.sort_values("epoch")["top1"].iloc[-1])
    for m in metric_names:
        values = tele[m].dropna().astype(float) if m in tele.columns else pd.Series(dtype=float)
        if len(values):
            row[f"{m}_mean"], row[f"{m}_max"], row[f"{m}_p95"] = values.mean(), values.max(), values.quantile(0.95)
    return row


def summarise(tele: pd.DataFrame, mets: pd.DataFrame, metric_names: list[str]) -> pd.DataFrame:
    runs = sorted(set(tele.get("run", pd.Series(dtype=str))) | set(mets.get("run", pd.Series(dtype=str))))
    rows = [_run_row(r, tele[tele["run"] == r] if len(tele) else tele,
                     mets[mets["run"] == r] if len(mets) else mets, metric_names) for r in runs]
    return pd.DataFrame(rows)


def format_number(value, digits: int = 4) -> str:
    """A number for people: "-" when absent, thousands grouped from 1,000, else `digits` significant."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"
    return str(value)


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    if isinstance(value, float) and abs(value) >= 10_000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_summary(summary: pd.DataFrame, metric_names: list[str]) -> str:
    """Two terminal tables: one line per run, then each metric's mean / max / p95 per run."""
    if summary.empty:
        return "no runs"
    head = {"duration_s": ("time (s)", 0), "epochs": ("epochs", 0), "images_per_s": ("images/s", 0),
            "energy_j": ("energy (J)", 0), "energy_per_epoch_j": ("J/epoch", 0),
            "best_val_top1": ("best val top-1", 4), "final_val_top1": ("final val top-1", 4)}
    cols = [c for c in head if c in summary.columns]
    runs = pd.DataFrame({head[c][0]: [_fmt(v, head[c][1]) for v in summary[c]] for c in cols},
                        index=summary["run"].rename("run"))
    text = runs.to_string() if cols else "\n".join(summary["run"])
    stats = {}
    for m in metric_names:
        if f"{m}_mean" not in summary.columns:
            continue
        label = f"{m} ({unit(m)})" if unit(m) else m
        stats[label] = [" / ".join(_fmt(r.get(f"{m}_{s}")) for s in STATS) for _, r in summary.iterrows()]
    if stats:
        table = pd.DataFrame(stats, index=summary["run"]).T
        table.index.name = "metric: mean / max / p95"
        text += "\n\n" + table.to_string()
    return text
