"""The run directory: where it is, and refusing to clobber one by accident."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..config import TrainConfig
from ..errors import UsageError


def default_name(cfg: TrainConfig) -> str:
    return f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"


def for_resume(cfg: TrainConfig) -> Path:
    """A checkpoint in RUN/checkpoints/ continues RUN; one from elsewhere continues out_dir/name."""
    ckpt = Path(cfg.resume).resolve()
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent
    return Path(cfg.out_dir) / cfg.name


def create(cfg: TrainConfig) -> Path:
    """A fresh run directory; an existing one is replaced only with --overwrite."""
    path = Path(cfg.out_dir) / cfg.name
    if path.exists():
        if not cfg.overwrite:
            raise UsageError(f"--name: run directory {path} already exists; pass --overwrite to replace it, "
                             f"--resume {path}/checkpoints/last.pt to continue it, or another --name")
        shutil.rmtree(path)
    (path / "checkpoints").mkdir(parents=True)
    return path


def clear_telemetry(path: Path) -> None:
    shutil.rmtree(path / "telemetry", ignore_errors=True)
