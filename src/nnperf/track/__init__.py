"""Metric sinks beside metrics.jsonl: TensorBoard and Weights & Biases.

The training loop hands each sink per-batch losses, per-epoch scalars and the telemetry rows
written since the last call; a sink that fails is switched off with one warning, and training
goes on (like a failing telemetry backend).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Protocol

from ..errors import UsageError


class Sink(Protocol):
    name: str

    def batch(self, tag: str, values: list[float], first_step: int) -> None: ...

    def epoch(self, epoch: int, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None: ...

    def telemetry(self, rows: list[dict]) -> None: ...

    def close(self) -> None: ...


def telemetry_scalars(row: dict) -> dict[str, float]:
    """A telemetry row's measurements as {"telemetry/<device>/<metric>": value}."""
    device = str(row.get("device", "")).replace(":", "")
    return {f"telemetry/{device}/{key}": value for key, value in row.items()
            if key not in ("t", "epoch", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class TelemetryTail:
    """The telemetry rows appended to RUN/telemetry/*.jsonl since the last call (whole lines only)."""

    def __init__(self, folder: Path):
        self.folder, self.offsets = folder, {}

    def new_rows(self) -> list[dict]:
        rows = []
        for path in sorted(self.folder.glob("*.jsonl")):
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
    """Fan-out to the enabled sinks; the first error of a sink disables it with one warning."""

    def __init__(self, sinks: list[Sink], run_dir: Path, warn: Callable[[str], None]):
        self.sinks, self.warn = list(sinks), warn
        self.tail = TelemetryTail(run_dir / "telemetry")

    def _each(self, call: Callable[[Sink], None]) -> None:
        for sink in list(self.sinks):
            try:
                call(sink)
            except Exception as e:  # noqa: BLE001 - a tracking service must never stop training
                self.sinks.remove(sink)
                self.warn(f"{sink.name}: logging failed ({type(e).__name__}: {str(e)[:200]}); {sink.name} is off "
                          "for the rest of this run")

    def batch(self, tag: str, values: list[float], first_step: int) -> None:
        self._each(lambda s: s.batch(tag, values, first_step))

    def _new_telemetry(self) -> list[dict]:
        try:
            return self.tail.new_rows()
        except Exception as e:  # noqa: BLE001 - unreadable telemetry is skipped, training goes on
            self.warn(f"telemetry for the trackers: could not read new rows ({type(e).__name__}: {e})")
            return []

    def epoch(self, epoch: int, step: int, scalars: dict[str, float], texts: dict[str, str] | None = None) -> None:
        rows = self._new_telemetry()
        self._each(lambda s: s.epoch(epoch, step, scalars, texts or {}))
        if rows:
            self._each(lambda s: s.telemetry(rows))

    def close(self) -> None:
        rows = self._new_telemetry()
        if rows:
            self._each(lambda s: s.telemetry(rows))
        self._each(lambda s: s.close())


def open_sinks(cfg, run_dir: Path, config_dict: dict, warn: Callable[[str], None]) -> Sinks | None:
    """The sinks `cfg` asks for (--tensorboard, --wandb), or None. A missing package is the user's to
    install (one line, before training); a sink that cannot start (its folder unusable, its service
    failing) is left off with one warning, and training goes on."""
    sinks: list[Sink] = []
    if cfg.tensorboard:
        from .tensorboard import TensorBoardSink

        _open("--tensorboard", lambda: TensorBoardSink(run_dir / "tb", config_dict), sinks, warn)
    if cfg.wandb:
        from .wandb import WandbSink

        _open("--wandb", lambda: WandbSink(cfg, run_dir, config_dict, warn), sinks, warn)
    return Sinks(sinks, run_dir, warn) if sinks else None


def _open(flag: str, make: Callable[[], Sink], sinks: list, warn: Callable[[str], None]) -> None:
    try:
        sinks.append(make())
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
