"""What a run ran on: versions, device, host and source revision (env.json)."""

from __future__ import annotations

import contextlib
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

from . import __version__
from . import device as devices


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the nnperf checkout this runs from (None when not a git checkout)."""
    folder = folder or Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            return out.stdout.strip()
    return None


def collect(dev: torch.device, precision: devices.Precision, channels_last: bool) -> dict:
    return {
        "time": time.time(),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "nnperf": __version__,
        "nnperf_git_commit": git_commit(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "device": str(dev),
        "device_name": devices.device_name(dev),
        "cpu": devices.cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "precision": precision.name,
        "precision_reason": precision.reason,
        "channels_last": channels_last,
    }
