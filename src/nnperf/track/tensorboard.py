"""TensorBoard events in RUN/tb/ through torch.utils.tensorboard."""

from __future__ import annotations

from pathlib import Path

import yaml

from . import Tracker, epoch_scalars, missing_package, telemetry_scalars


class TensorBoardSink(Tracker):
    name = "TensorBoard"

    def __init__(self, folder: Path, config: dict, optimizer_text: str):
        super().__init__()
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("--tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(folder))
        # Markdown code block: TensorBoard's text plugin renders the YAML as written.
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)
        self.optimizer_text = optimizer_text

    def epoch(self, row: dict) -> None:
        epoch = row["epoch"]
        for tag, x, value in self.batches.points(row):
            self.writer.add_scalar(tag, value, x)
        for tag, value in epoch_scalars(row).items():
            if value is not None:
                self.writer.add_scalar(tag, value, epoch)
        if self.optimizer_text:
            self.writer.add_text("optimizer", self.optimizer_text, epoch)
            self.optimizer_text = ""
        self.writer.flush()

    def telemetry(self, rows: list[dict]) -> None:
        """Every numeric field of each row as telemetry/<device>/<metric>, at the training step the
        sample was taken and its own wall time."""
        for row in rows:
            for tag, value in telemetry_scalars(row).items():
                self.writer.add_scalar(tag, value, row.get("step", 0), walltime=row.get("t"))

    def close(self) -> None:
        self.writer.close()
