"""The sweep's results table: every trial with its settings, best top-1, time and energy."""

from __future__ import annotations

from pathlib import Path

import optuna
import pandas as pd
from optuna.trial import TrialState

from .. import fileio
from .spec import Spec


def table(study: optuna.Study, spec: Spec) -> pd.DataFrame:
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if a.get("extra"):
            continue  # made by a race between workers and closed unrun (see study.work)
        row = {"trial": t.number, "state": t.state.name.lower()}
        if "optimizer" in spec.base and "optimizer" not in t.params:
            row["optimizer"] = spec.base["optimizer"]
        row.update(t.params)
        # A pruned trial's best is the best epoch it reached.
        reached = max(t.intermediate_values.values()) if t.intermediate_values else None
        row["best_top1"] = t.value if t.state == TrialState.COMPLETE else reached
        row.update({k: a.get(k) for k in ("epochs", "seconds", "energy_j", "images_per_s", "worker")})
        rows.append(row)
    return pd.DataFrame(rows)


def best_per_optimizer(frame: pd.DataFrame) -> pd.DataFrame:
    """The best finished trial of each optimizer (or overall, when the sweep does not vary it)."""
    done = frame[frame["best_top1"].notna()] if "best_top1" in frame else frame.iloc[0:0]
    if done.empty:
        return done
    if "optimizer" not in done:
        return done.loc[[done["best_top1"].idxmax()]]
    best = done.loc[done.groupby("optimizer")["best_top1"].idxmax()]
    return best.sort_values("best_top1", ascending=False)


def write(frame: pd.DataFrame, folder: Path) -> Path:
    path = folder / "results.csv"
    fileio.write_with(path, lambda tmp: frame.to_csv(tmp, index=False, float_format="%.6g"))
    return path


def show(frame: pd.DataFrame) -> str:
    if frame.empty:
        return "no trials yet"
    counts = frame["state"].value_counts().to_dict()
    text = _text(frame)
    best = best_per_optimizer(frame)
    if not best.empty:
        text += "\n\nbest per optimizer:\n" + _text(best)
    return text + "\n\n" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def _text(frame: pd.DataFrame) -> str:
    """The table for a terminal: no worker column, 4 significant digits, "-" where nothing was measured."""
    shown = frame.drop(columns=["worker"], errors="ignore").astype(object)
    shown = shown.map(lambda v: "-" if v is None or (isinstance(v, float) and pd.isna(v))
                      else f"{v:.4g}" if isinstance(v, float) else v)
    return shown.to_string(index=False)
