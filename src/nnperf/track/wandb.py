"""Weights & Biases: config, per-epoch metrics, per-batch losses and telemetry.

Runs offline (files under RUN/wandb/, `wandb sync` uploads them later) when WANDB_MODE says so or
when no API key is configured, and says where the files went.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Callable

from . import Tracker, epoch_scalars, missing_package, telemetry_scalars


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbSink(Tracker):
    name = "W&B"

    def __init__(self, cfg, run_dir: Path, config: dict, optimizer_text: str, warn: Callable[[str], None]):
        super().__init__()
        try:
            import wandb
        except ImportError:
            raise missing_package("--wandb", "wandb", "wandb") from None
        mode = os.environ.get("WANDB_MODE") or ("online" if has_api_key() else "offline")
        self.run = wandb.init(project=cfg.wandb_project, name=cfg.name, dir=str(run_dir), config=config,
                              mode=mode, reinit="finish_previous")
        for prefix, axis in (("train/*", "epoch"), ("val/*", "epoch"), ("batch/*", "global_step"),
                             ("telemetry/*", "telemetry/elapsed_s")):
            self.run.define_metric(axis, hidden=True)
            self.run.define_metric(prefix, step_metric=axis)
        self.run.summary.update({"optimizer": optimizer_text})
        self.t0: float | None = None
        where = Path(self.run.dir).parent if mode == "offline" else self.run.url
        warn(f"W&B {mode}: {where}" + (" (upload later with: wandb sync " + str(where) + ")"
                                      if mode == "offline" else ""))

    def epoch(self, row: dict) -> None:
        for tag, x, value in self.batches.points(row):
            self.run.log({tag: value, "global_step": x})
        scalars = {tag: value for tag, value in epoch_scalars(row).items() if value is not None}
        self.run.log({**scalars, "epoch": row["epoch"]})

    def telemetry(self, rows: list[dict]) -> None:
        for row in rows:
            t = row.get("t")
            if not isinstance(t, (int, float)):
                continue
            self.t0 = t if self.t0 is None else self.t0
            values = telemetry_scalars(row)
            if values:
                self.run.log({**values, "telemetry/elapsed_s": t - self.t0})

    def close(self) -> None:
        self.run.finish()
