"""The straggler view of a multi-process run: per epoch, each rank's step time, input wait and
utilisation, and the slowest rank named with how much slower it was than the fastest.

Step times come from metrics.jsonl (rank 0 gathers every rank's share of each training epoch into
the row's "ranks" list); utilisation from each rank's own telemetry (telemetry/rank{R}/). Runs with
a single process have neither, and get no rows.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import logs, plots, summary  # noqa: E402

STRAGGLERS = "stragglers"  # the stem of `nnperf plot`'s CSV and PNG
# Utilisation shown per rank, first found wins: the accelerator's, else the process's CPU share
# (the CPU backend's), else the whole machine's.
UTIL = ("gpu_util_pct", "cpu_util_pct", "sys_cpu_util_pct")
REPORTED = ("seconds", "images", "data_wait_s", "step_s")  # each rank's fields in a "ranks" entry
COLUMNS = ["run", "epoch", "rank", "host", "step_s", "seconds", "images", "data_wait_s", "util_pct", "util_metric",
           "slowest", "slowest_rank", "ratio"]
KEYS = ["run", "epoch", "rank"]
MOST_RANKS = 2**31  # a rank or epoch past this is an edited log's nonsense, not a process


def _entries(value) -> list[dict]:
    """The dicts of one row's "ranks" value: a list from the line reader, an array from Arrow's,
    anything else (absent, or edited into text or a number) none."""
    if isinstance(value, (list, tuple, np.ndarray)):
        return [e for e in value if isinstance(e, dict)]
    return []


def _whole(values: pd.Series) -> pd.Series:
    """Which values can be a rank or an epoch: whole numbers from 0 (NaN and infinities cannot)."""
    numbers = pd.to_numeric(values, errors="coerce").astype(float)
    return numbers.between(0, MOST_RANKS) & (numbers == np.floor(numbers))


def _reported(mets: pd.DataFrame) -> pd.DataFrame:
    """A row per (run, epoch, rank) from the train rows' "ranks" lists; a resumed run that repeats
    an epoch keeps the last telling."""
    if "ranks" not in mets.columns or "phase" not in mets.columns:
        return pd.DataFrame(columns=KEYS)
    rows = []
    for run, epoch, value in mets.loc[mets["phase"] == "train", ["run", "epoch", "ranks"]].itertuples(index=False):
        for entry in _entries(value):
            host = entry.get("host")
            rows.append({"run": run, "epoch": epoch, "rank": logs._as_number(entry.get("rank")),
                         "host": host if isinstance(host, str) else None,
                         **{k: logs._as_number(entry.get(k)) for k in REPORTED}})
    frame = pd.DataFrame(rows, columns=[*KEYS, "host", *REPORTED])
    frame = frame[_whole(frame["epoch"]) & _whole(frame["rank"])]
    frame["step_s"] = frame["step_s"].where(frame["step_s"] > 0)  # a step takes time: 0 or less is no telling
    return frame.drop_duplicates(KEYS, keep="last")


def _train_rows(tele: pd.DataFrame) -> pd.DataFrame:
    """The rank-tagged telemetry rows of training phases."""
    if not {"rank", "epoch", "phase"} <= set(tele.columns):
        return tele.iloc[0:0]
    return tele[(tele["phase"] == "train") & _whole(tele["rank"]) & _whole(tele["epoch"])]


def _utilisation(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean utilisation per (run, epoch, rank) over each epoch's training rows, in the first of
    UTIL that the run's rows hold."""
    frames = [pd.DataFrame(columns=KEYS)]
    for run, part in rows.groupby("run", sort=False):
        metric = next((m for m in UTIL if m in part.columns and part[m].notna().any()), None)
        if metric is not None:
            means = part.groupby(["epoch", "rank"])[metric].mean().rename("util_pct").reset_index()
            frames.append(means.assign(run=run, util_metric=metric))
    return pd.concat(frames, ignore_index=True)


def _hosts(rows: pd.DataFrame) -> pd.DataFrame:
    """Each rank's host as its telemetry names it, for epochs that metrics.jsonl does not cover."""
    if "host" not in rows.columns:
        return pd.DataFrame(columns=["run", "rank", "host_seen"])
    named = rows.dropna(subset=["host"])
    return named.groupby(["run", "rank"])["host"].last().rename("host_seen").reset_index()


def table(tele: pd.DataFrame, mets: pd.DataFrame) -> pd.DataFrame:
    """A row per (run, epoch, rank) of every run with several ranks (COLUMNS): step_s, seconds,
    images and data_wait_s as the rank reported them, util_pct its mean utilisation (util_metric
    says which), and per epoch the slowest rank (largest step_s), flagged in `slowest`, with
    `ratio` its step time over the fastest's. Empty when no run has several ranks."""
    rows = _train_rows(tele)
    frames = [_reported(mets), _utilisation(rows)]
    for frame in frames:  # one type for the keys, whichever reader and log they came from
        frame[["epoch", "rank"]] = frame[["epoch", "rank"]].astype(float)
    both = frames[0].merge(frames[1], on=KEYS, how="outer")
    both = both[both.groupby("run")["rank"].transform("nunique") > 1] if len(both) else both
    if both.empty:
        return pd.DataFrame(columns=COLUMNS)
    hosts = _hosts(rows).astype({"rank": float})
    both = both.reindex(columns=COLUMNS[:10]).merge(hosts, on=["run", "rank"], how="left")
    # Object columns: either may be all absent (float) or Arrow-backed text, which do not mix.
    both["host"] = both["host"].astype(object).fillna(both["host_seen"].astype(object)).fillna("")
    both = both.drop(columns="host_seen").sort_values(KEYS, ignore_index=True)
    both[["epoch", "rank"]] = both[["epoch", "rank"]].astype(int)
    return _mark_slowest(both)


def _mark_slowest(both: pd.DataFrame) -> pd.DataFrame:
    """`slowest`, `slowest_rank` and `ratio` per epoch; an epoch without step times names none.
    On a tie the lower rank is named (rows are in rank order)."""
    known = both.dropna(subset=["step_s"])
    slowest = known.groupby(["run", "epoch"])["step_s"].idxmax()
    both["slowest"] = both.index.isin(slowest.to_numpy())
    named = both.loc[slowest.to_numpy(), ["run", "epoch", "rank"]].rename(columns={"rank": "slowest_rank"})
    both = both.merge(named, on=["run", "epoch"], how="left")
    by_epoch = both.groupby(["run", "epoch"])["step_s"]
    fastest = by_epoch.transform("min")
    both["ratio"] = (by_epoch.transform("max") / fastest).where(fastest > 0)
    return both[COLUMNS]


def epochs(strag: pd.DataFrame) -> pd.DataFrame:
    """A row per (run, epoch): the slowest rank, its step time and the fastest's (ms), their ratio,
    and each rank's mean utilisation (%) as `rank{R} util (%)` columns."""
    rows = []
    for (run, epoch), part in strag.groupby(["run", "epoch"], sort=True):
        slow = part[part["slowest"]]
        row = {"run": run, "epoch": epoch,
               "slowest rank": f"rank{slow['rank'].iloc[0]}" if len(slow) else None,
               "slowest step (ms)": 1000 * slow["step_s"].iloc[0] if len(slow) else np.nan,
               "fastest step (ms)": 1000 * part["step_s"].min(), "ratio": part["ratio"].iloc[0]}
        row.update({f"rank{r} util (%)": u for r, u in zip(part["rank"], part["util_pct"])})
        rows.append(row)
    return pd.DataFrame(rows)


def headline(strag: pd.DataFrame, run: str) -> str | None:
    """One phrase for a run: the rank that was slowest in the most epochs (the lower on a tie) and
    the mean over epochs of slowest/fastest step time, such as "rank1 (1.07x)"; None without ranks."""
    per_epoch = strag[strag["run"] == run].drop_duplicates("epoch")
    named = per_epoch["slowest_rank"].dropna().astype(int)
    if named.empty:
        return None
    counts = named.value_counts()
    rank = min(counts.index[counts == counts.max()])
    ratio = per_epoch["ratio"].mean()
    shown = f"{ratio:.2f}x" if pd.notna(ratio) else "-"
    where = "" if counts[rank] == len(named) else f" in {counts[rank]} of {len(named)} epochs"
    return f"rank{rank}{where} ({shown})"


def format_epochs(strag: pd.DataFrame) -> str:
    """The per-epoch straggler table for a terminal, with which utilisation it shows."""
    table = epochs(strag).set_index(["run", "epoch"])
    shown = table.apply(lambda col: col.map(lambda v: summary.format_number(v, 3)))
    metrics = ", ".join(sorted(strag["util_metric"].dropna().unique())) or "none reported"
    return f"stragglers per epoch (utilisation: mean {metrics} while training)\n{shown.to_string()}"


def plot(strag: pd.DataFrame, path: Path) -> None:
    """stragglers.png: each rank's mean step time per epoch, a line per (run, rank), each epoch's
    slowest rank ringed."""
    several_runs = strag["run"].nunique() > 1
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for (run, rank), part in strag.dropna(subset=["step_s"]).groupby(["run", "rank"], sort=True):
        many_hosts = strag.loc[strag["run"] == run, "host"].nunique() > 1
        host = part["host"].iloc[0] if many_hosts else ""
        ax.plot(part["epoch"], 1000 * part["step_s"], marker="o", markersize=3, linewidth=1.0,
                label=plots.rank_label(run, rank, host, several_runs))
    slow = strag[strag["slowest"]]
    ax.scatter(slow["epoch"], 1000 * slow["step_s"], s=110, facecolors="none", edgecolors="red", linewidths=1.4,
               label="slowest rank of the epoch", zorder=3)
    one = f" — {strag['run'].iloc[0]}" if not several_runs else ""
    ax.set_title(plots.text(f"Step time per rank{one}"))
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Mean step time (ms)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    plots._save(fig, path)
