"""Where a run's figures go: every consumer is a sink with the same two methods, `log(row)` and
`close()`. The training loop builds each row once and hands it to all of them: metrics.jsonl,
the console line, TensorBoard, W&B and a sweep's pruner.

The rows the loop logs (plain dicts):

    {"kind": "step", **metrics row}            every --log-every steps (phase "train_step")
    {"kind": "epoch", "epoch", "step", "batch_size",
     "train": metrics row, "val": metrics row or None,
     "batch_losses": {"train": [...], "val": [...]}, "first_step",   (only when a sink wants batches)
     "grad_norm", "scaler_skipped_steps"}                              (the same)
    {"kind": "telemetry", "rows": [telemetry rows written since the last epoch]}   (to sinks that want them)

The files and the console are essential: their errors stop the run, as a full disk must. Trackers
(TensorBoard, W&B) are best effort: the first error switches one off with a warning, and training
goes on (like a failing telemetry backend). A sink may end the run after the current epoch by
raising `StopRun` from `log`: the epoch's checkpoint is saved first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

from ..errors import UsageError
from ..fileio import write_jsonl
from ..lines import epoch_line


class Sink(Protocol):
    name: str

    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


class StopRun(Exception):
    """Raised by a sink's `log` to end training once the current epoch is saved."""


def telemetry_scalars(row: dict) -> dict[str, float]:
    """A telemetry row's measurements as {"telemetry/<device>/<metric>": value}."""
    device = str(row.get("device", "")).replace(":", "")
    return {f"telemetry/{device}/{key}": value for key, value in row.items()
            if key not in ("t", "epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def epoch_scalars(row: dict) -> dict[str, float]:
    """An epoch row as the per-epoch scalars the trackers plot (None where not measured)."""
    train, val = row["train"], row.get("val")
    scalars = {"train/loss": train["loss"], "train/top1": train["top1"], "train/top5": train["top5"],
               "train/lr": train["lr"], "train/grad_norm": row.get("grad_norm"), "train/batch_size": row["batch_size"],
               "train/scaler_skipped_steps": row.get("scaler_skipped_steps"),
               "train/images_per_s": train.get("images_per_s"), "train/data_wait_s": train.get("data_wait_s"),
               "train/energy_j": train.get("energy_j")}
    if val:
        scalars.update({"val/loss": val["loss"], "val/top1": val["top1"], "val/top5": val["top5"],
                        "val/energy_j": val.get("energy_j")})
    return scalars


class BatchAxis:
    """Per-batch losses with their x values: training batches at their global step, validation
    batches numbered across the run."""

    def __init__(self):
        self.val_batches = 0

    def points(self, row: dict):
        """(tag, x, loss) of an epoch row's batches."""
        for i, value in enumerate(row["batch_losses"]["train"]):
            yield "batch/train_loss", row["first_step"] + i, value
        for value in row["batch_losses"]["val"]:
            yield "batch/val_loss", self.val_batches, value
            self.val_batches += 1


class Tracker:
    """The shape TensorBoard and W&B share: per-epoch scalars with the epoch's batch losses, and
    telemetry rows; everything else is not theirs."""

    wants = frozenset({"batches", "telemetry"})

    def __init__(self):
        self.batches = BatchAxis()

    def log(self, row: dict) -> None:
        if row["kind"] == "epoch":
            self.epoch(row)
        elif row["kind"] == "telemetry":
            self.telemetry(row["rows"])

    def epoch(self, row: dict) -> None:
        raise NotImplementedError

    def telemetry(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class MetricsFile:
    """metrics.jsonl: every step and epoch row. The whole file is rewritten atomically after each
    epoch (and, through `write`, when the run stops mid-epoch), so that it never holds a torn line
    and never runs ahead of the checkpoint saved right after it. `rows` are those kept from before
    a resume."""

    name = "metrics.jsonl"

    def __init__(self, path: Path, rows: list[dict] | None = None):
        self.path, self.rows = path, list(rows or [])

    def log(self, row: dict) -> None:
        if row["kind"] == "step":
            self.rows.append({k: v for k, v in row.items() if k != "kind"})
        elif row["kind"] == "epoch":
            self.rows += [r for r in (row["train"], row["val"]) if r is not None]
            self.write()

    def write(self) -> None:
        write_jsonl(self.path, self.rows)

    def close(self) -> None:
        pass  # written with each epoch; the rows of an epoch that did not end go with its checkpoint only


class Console:
    """One line per epoch."""

    name = "console"

    def __init__(self, print_line: Callable[[str], None]):
        self.print_line = print_line

    def log(self, row: dict) -> None:
        if row["kind"] == "epoch":
            self.print_line(epoch_line(row["train"], row["val"]))

    def close(self) -> None:
        pass


class BestEffort:
    """A tracker whose failures never stop training: its first error switches it off with one warning."""

    def __init__(self, sink: Sink, warn: Callable[[str], None]):
        self.sink, self.warn, self.on = sink, warn, True
        self.name = sink.name
        self.wants = getattr(sink, "wants", frozenset())

    def log(self, row: dict) -> None:
        self._call(lambda: self.sink.log(row))

    def close(self) -> None:
        self._call(self.sink.close)

    def _call(self, do: Callable[[], None]) -> None:
        if not self.on:
            return
        try:
            do()
        except Exception as e:  # noqa: BLE001 - a tracking service must never stop training
            self.on = False
            self.warn(f"{self.name}: logging failed ({type(e).__name__}: {str(e)[:200]}); {self.name} is off "
                      "for the rest of this run")


class TelemetryTail:
    """The telemetry rows appended to RUN/telemetry/*.jsonl (and each rank's RUN/telemetry/rank*/*.jsonl)
    since the last call (whole lines only)."""

    def __init__(self, folder: Path):
        self.folder, self.offsets = folder, {}

    def new_rows(self) -> list[dict]:
        rows = []
        for path in sorted([*self.folder.glob("*.jsonl"), *self.folder.glob("rank*/*.jsonl")]):
            start = self.offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offsets[path] = start + len(complete)
            for line in complete.splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("t"), (int, float)):
                    rows.append(row)
        return sorted(rows, key=lambda r: r["t"])


class Sinks:
    """All of a run's sinks, called in order. Sinks that want telemetry (`wants` holds "telemetry")
    get the rows the sampler wrote since the previous epoch after each epoch row and at close;
    `wants_batches` says whether any sink wants per-batch losses and gradient norms (collecting
    them costs a little on every step, so they are only collected then)."""

    def __init__(self, sinks: list, run_dir: Path, warn: Callable[[str], None]):
        self.sinks, self.warn = list(sinks), warn
        self.tail = TelemetryTail(run_dir / "telemetry")
        self.closed = False

    def _wanting(self, what: str) -> list:
        return [s for s in self.sinks if what in getattr(s, "wants", ())]

    @property
    def wants_batches(self) -> bool:
        return bool(self._wanting("batches"))

    def log(self, row: dict) -> None:
        for sink in self.sinks:
            sink.log(row)
        if row["kind"] == "epoch":
            self._telemetry()

    def _telemetry(self) -> None:
        wanting = self._wanting("telemetry")
        if not wanting:
            return
        try:
            rows = self.tail.new_rows()
        except Exception as e:  # noqa: BLE001 - unreadable telemetry is skipped, training goes on
            self.warn(f"telemetry for the trackers: could not read new rows ({type(e).__name__}: {e})")
            return
        for sink in wanting if rows else []:
            sink.log({"kind": "telemetry", "rows": rows})

    def close(self) -> None:
        """Close every sink once (the telemetry written since the last epoch first); the first
        error is raised after all were closed."""
        if self.closed:
            return
        self.closed = True
        self._telemetry()
        failed = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:  # noqa: BLE001 - the others are still closed
                failed = failed or e
        if failed is not None:
            raise failed


def open_trackers(cfg, run_dir: Path, config_dict: dict, optimizer_text: str,
                  warn: Callable[[str], None]) -> list[BestEffort]:
    """The trackers `cfg` asks for (--tensorboard, --wandb). A missing package is the user's to
    install (one line, before training); a tracker that cannot start (its folder unusable, its
    service failing) is left off with one warning, and training goes on."""
    trackers: list[BestEffort] = []
    if cfg.tensorboard:
        from .tensorboard import TensorBoardSink

        _open("--tensorboard", lambda: TensorBoardSink(run_dir / "tb", config_dict, optimizer_text), trackers, warn)
    if cfg.wandb:
        from .wandb import WandbSink

        _open("--wandb", lambda: WandbSink(cfg, run_dir, config_dict, optimizer_text, warn), trackers, warn)
    return trackers


def _open(flag: str, make: Callable[[], Sink], trackers: list, warn: Callable[[str], None]) -> None:
    try:
        trackers.append(BestEffort(make(), warn))
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - a tracking service must never stop training
        warn(f"warning: {flag}: could not start ({type(e).__name__}: {str(e)[:200]}); it is off for this run")


def check_installed(cfg) -> None:
    """Refuse, before anything is written, a sink whose package is missing."""
    import importlib.util

    for wanted, flag, package, extra in ((cfg.tensorboard, "--tensorboard", "tensorboard", None),
                                         (cfg.wandb, "--wandb", "wandb", "wandb")):
        if wanted and importlib.util.find_spec(package) is None:
            raise missing_package(flag, package, extra)


def missing_package(flag: str, package: str, extra: str | None = None) -> UsageError:
    how = f"pip install 'nnperf[{extra}]' (or pip install {package})" if extra else f"pip install {package}"
    return UsageError(f"{flag}: the '{package}' package is not installed; {how}")
