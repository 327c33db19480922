"""TensorBoard events in RUN/tb/ through torch.utils.tensorboard."""

from __future__ import annotations

from pathlib import Path

import yaml

from . import missing_package, telemetry_scalars


class TensorBoardSink:
    name = "TensorBoard"

    def __init__(self, folder: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("--tensorboard", "tensorboard") from None
        self.writer = SummaryWriter(log_dir=str(folder))
        # Markdown code block: TensorBoard's text plugin renders the YAML as written.
        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def batch(self, tag: str, values: list[float], first_step: int) -> None:
        for i, value in enumerate(values):
            self.writer.add_scalar(f"batch/{tag}", value, first_step + i)

    def epoch(self, epoch: int, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        for tag, value in scalars.items():
            if value is not None:
                self.writer.add_scalar(tag, value, epoch)
        for tag, text in texts.items():
            self.writer.add_text(tag, text, epoch)
        self.writer.flush()

    def telemetry(self, rows: list[dict]) -> None:
        """Every numeric field of each row as telemetry/<device>/<metric>, at the training step the
        sample was taken and its own wall time."""
        for row in rows:
            for tag, value in telemetry_scalars(row).items():
                self.writer.add_scalar(tag, value, row.get("step", 0), walltime=row.get("t"))

    def close(self) -> None:
        self.writer.close()
