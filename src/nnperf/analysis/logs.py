"""Read run directories and JSONL logs into pandas tables, for the analysis commands.

Accepts what DESIGN.md's run directory holds (`metrics.jsonl`, `telemetry/*.jsonl`, and with several
processes `telemetry/rank{R}/*.jsonl`, rows tagged with rank, local_rank and host) and the older
profiler's loose `train_epoch.jsonl` / `val_epoch.jsonl` files, which may name the time `timestamp`
and leave the phase to the file name. pandas and Arrow's JSON reader (the fast path for million-row
logs); no training code.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json

from ..errors import UsageError

# Columns that say where a row belongs rather than what was measured.
BOOKKEEPING = {"t", "run", "phase", "epoch", "step", "device", "backend", "elapsed_s", "source", "rank",
               "local_rank", "host"}
# Fields that hold text, and fields that hold numbers, in DESIGN.md's telemetry and metrics rows.
TEXT_FIELDS = {"phase", "host"}
NUMBER_FIELDS = {"t", "epoch", "step", "loss", "top1", "top5", "lr", "images", "seconds", "images_per_s",
                 "data_wait_s", "energy_j", "rank", "local_rank"}
TIME_KEYS = ("t", "timestamp", "time", "ts")
PHASE_FILES = {"train_epoch": "train", "val_epoch": "val", "test_epoch": "test"}


@dataclass
class Source:
    """One run: its label, its telemetry files and its metrics file (either may be absent)."""

    label: str
    telemetry: list[Path] = field(default_factory=list)
    metrics: Path | None = None
    run_dir: Path | None = None


def sources(paths: list[str]) -> list[Source]:
    """Run directories, folders of JSONL logs, or single JSONL files -> one Source per run."""
    found: list[Source] = []
    for given in paths:
        path = Path(given)
        if not path.exists():
            raise UsageError(f"{given}: no such file or directory (give a run directory or a .jsonl file)")
        if path.is_dir():
            found.append(_from_dir(path))
        elif not path.is_file():  # a FIFO or a device would block the reader or never end
            raise UsageError(f"{given}: not a regular file (give a run directory or a .jsonl file)")
        elif path.suffix == ".jsonl":
            label = _label_for_file(path)
            found.append(Source(label, metrics=path) if path.name == "metrics.jsonl" else Source(label, [path]))
        else:
            raise UsageError(f"{given}: not a .jsonl file or a run directory")
    return _merge_same_label(found)


RANK_FOLDER = re.compile(r"rank\d+")  # telemetry/rank{R}/: one per process of a multi-process run


def _rank_files(telemetry: Path) -> list[Path]:
    """telemetry/rank{R}/*.jsonl in rank order (rank10 after rank2)."""
    folders = [d for d in telemetry.glob("rank*") if RANK_FOLDER.fullmatch(d.name) and d.is_dir()]
    return [p for d in sorted(folders, key=lambda d: int(d.name[4:])) for p in sorted(d.glob("*.jsonl"))
            if p.is_file()]


def _from_dir(path: Path) -> Source:
    own = sorted(p for p in (path / "telemetry").glob("*.jsonl") if p.is_file()) + _rank_files(path / "telemetry")
    telemetry = own or sorted(p for p in path.glob("*.jsonl") if p.name != "metrics.jsonl" and p.is_file())
    metrics = path / "metrics.jsonl"
    src = Source(path.resolve().name, telemetry, metrics if metrics.is_file() else None, path)
    if not src.telemetry and src.metrics is None:
        raise UsageError(f"{path}: no metrics.jsonl or telemetry/*.jsonl in this folder (is it a run directory?)")
    return src


def _run_folder(file: Path) -> Path:
    """The run directory of a loose log file: its folder, or the run above telemetry/ or telemetry/rank{R}/."""
    folder = file.resolve().parent
    if RANK_FOLDER.fullmatch(folder.name) and folder.parent.name == "telemetry":
        folder = folder.parent
    return folder.parent if folder.name == "telemetry" else folder


def _label_for_file(path: Path) -> str:
    return _run_folder(path).name


def _merge_same_label(found: list[Source]) -> list[Source]:
    """Files given one by one from the same run become one Source; distinct runs that share a
    folder name get the parent folder added to their label."""
    merged: dict[tuple, Source] = {}
    for src in found:
        if src.run_dir is None:
            key = (src.label, _run_folder((src.telemetry or [src.metrics])[0]))
        else:
            key = (src.label, src.run_dir.resolve())
        if key in merged:
            merged[key].telemetry += src.telemetry
            merged[key].metrics = merged[key].metrics or src.metrics
        else:
            merged[key] = src
    # Runs that share a folder name get as many parent folders in their label as tell them apart.
    for depth in range(1, 8):
        labels = [s.label for s in merged.values()]
        clashing = [(k, s) for k, s in merged.items() if labels.count(s.label) > 1]
        if not clashing:
            break
        for (label, folder), src in clashing:
            parents = Path(folder).parts[-depth - 1:-1]
            src.label = "/".join([*parents, label])
    return list(merged.values())


def read_jsonl_frame(path: Path) -> pd.DataFrame:
    """A JSONL file as a table. A torn last line (a crash mid-write leaves one) is dropped; a file
    that Arrow's fast reader refuses (a bad line inside, a key whose type changes) is read line by
    line, skipping the lines that do not parse."""
    raw = path.read_bytes()
    complete = raw[: raw.rfind(b"\n") + 1]  # up to the last full line
    tail = raw[len(complete):]
    if tail.strip():  # a last line without a newline: whole if it parses, torn if not
        try:
            json.loads(tail)
            complete = raw + b"\n"
        except (ValueError, RecursionError):
            pass
    if not complete.strip():
        return pd.DataFrame()
    try:
        return pa_json.read_json(io.BytesIO(complete)).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    rows = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):  # not JSON, or nested deeper than Python parses
            continue
        if isinstance(row, dict):
            rows.append(row)
    return pd.DataFrame.from_records(rows)


def _is_number_column(column: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)


# What pandas infers for a column of only numbers and strings: pd.to_numeric handles it at C speed.
_PLAIN = {"string", "integer", "floating", "mixed-integer", "mixed-integer-float", "decimal", "empty"}


def _as_number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return math.nan
    try:
        return float(value)
    except (ValueError, OverflowError):
        return math.nan


def _numbers(column: pd.Series) -> pd.Series:
    """Floats from a column of JSON values: numbers, and strings that spell one; anything else
    (text, objects, lists, true/false, infinities) is absent, never 0."""
    if _is_number_column(column):
        numbers = column.astype(float)
    elif pd.api.types.infer_dtype(column, skipna=True) in _PLAIN:
        numbers = pd.to_numeric(column, errors="coerce").astype(float)
    else:  # objects, lists or true/false among them: one value at a time
        numbers = column.map(_as_number).astype(float)
    return numbers.where(_plottable(numbers))


# Larger than any measurement: such a value (1e308 in a hand-edited log) only overflows the axis ticks.
LARGEST = 1e100


def _plottable(numbers: pd.Series) -> pd.Series:
    return np.isfinite(numbers) & (numbers.abs() <= LARGEST)


def _seconds(column: pd.Series) -> pd.Series:
    """Unix seconds from numbers or from ISO timestamps (a value that is neither is absent)."""
    if pd.api.types.is_datetime64_any_dtype(column):  # Arrow's reader parses ISO timestamps itself
        stamps = pd.to_datetime(column, utc=True)
        return (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    numbers = _numbers(column)
    if _is_number_column(column) or numbers.notna().sum() * 2 > column.notna().sum():
        return numbers
    text = column.where(column.map(lambda v: isinstance(v, str)))
    stamps = pd.to_datetime(text, errors="coerce", utc=True)
    return (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def _tidy(df: pd.DataFrame) -> None:
    """Make a table from copied or hand-edited logs safe to compute on. A field that should be a
    number but holds text, an object or a list in some rows (the fallback reader keeps such rows)
    has those values absent; a label field (phase) that is not text is absent too. Older logs
    wrote "N/A" or numbers as strings, so any other column that is mostly numbers becomes numeric."""
    for col in df.columns:
        column = df[col]
        if col in TEXT_FIELDS:
            if pd.api.types.infer_dtype(column, skipna=True) not in ("string", "empty"):
                df[col] = column.where(column.map(lambda v: isinstance(v, str)))
        elif col in NUMBER_FIELDS:
            if not _is_number_column(column) or column.dtype.kind == "f":
                df[col] = _numbers(column)
        elif col not in BOOKKEEPING and not _is_number_column(column):
            numbers = _numbers(column)
            if numbers.notna().sum() * 2 > column.notna().sum():
                df[col] = numbers
        elif column.dtype.kind == "f" and col not in BOOKKEEPING:
            df[col] = column.where(_plottable(column))  # Infinity (Python's json writes it) is no value


def telemetry(srcs: list[Source]) -> pd.DataFrame:
    """Every telemetry row of every run, with `run`, `phase`, `t` and `elapsed_s` (seconds since
    the run's first row) filled in; rows without a time are dropped."""
    frames = []
    for src in srcs:
        for path in src.telemetry:
            df = read_jsonl_frame(path)
            if df.empty:
                continue
            time_key = next((k for k in TIME_KEYS if k in df.columns), None)
            if time_key is None:
                raise UsageError(f"{path}: rows have no time field ({' or '.join(TIME_KEYS)})")
            df["t"] = _seconds(df.pop(time_key))
            _tidy(df)
            hint = PHASE_FILES.get(path.stem, path.stem)
            df["phase"] = df["phase"].fillna(hint) if "phase" in df.columns else hint
            df["run"] = src.label
            if "device" not in df.columns:
                df["device"] = ""
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["t", "run", "phase", "device", "elapsed_s"])
    df = pd.concat(frames, ignore_index=True).dropna(subset=["t"])
    df = df.sort_values(["run", "t"], kind="stable", ignore_index=True)
    df["elapsed_s"] = df["t"] - df.groupby("run")["t"].transform("min")
    df["device"] = df["device"].fillna("").astype(str)
    return df


def has_ranks(df: pd.DataFrame) -> bool:
    """Whether a telemetry table holds rows from several processes of one run (rank-tagged rows)."""
    return "rank" in df.columns and bool(df.groupby("run")["rank"].nunique().gt(1).any())


def metrics(srcs: list[Source]) -> pd.DataFrame:
    """Every metrics.jsonl row (per epoch and phase) of every run, with `run` filled in."""
    frames = []
    for src in srcs:
        if src.metrics is None:
            continue
        df = read_jsonl_frame(src.metrics)
        if not df.empty:
            _tidy(df)
            df["run"] = src.label
            frames.append(df)
    if not frames:
        return pd.DataFrame(columns=["run", "epoch", "phase"])
    df = pd.concat(frames, ignore_index=True)
    for col in ("epoch", "phase"):  # every reader of the table groups or sorts by them
        if col not in df.columns:
            df[col] = np.nan if col == "epoch" else None
    return df


def metric_columns(df: pd.DataFrame, order: tuple[str, ...] = ()) -> list[str]:
    """Numeric measurement columns: the known ones in their usual order, then any others."""
    numeric = [c for c in df.columns if c not in BOOKKEEPING and pd.api.types.is_numeric_dtype(df[c])
               and df[c].notna().any()]
    known = [c for c in order if c in numeric]
    return known + sorted(c for c in numeric if c not in known)
