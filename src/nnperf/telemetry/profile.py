"""`profile`: telemetry around any code, as a decorator or a context manager."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from .. import device as devices
from . import backends as registry
from .sampler import Sampler


class profile:  # noqa: N801 - used like a function: @profile(...) / with profile(...)
    """Sample the hardware while the wrapped code runs, into `out` (JSONL), tagged with `phase`;
    when it ends, add a row with its duration. The device is synchronized at the start and at the end,
    so `duration_s` covers the device work the code queued, not only the time taken to queue it.

        @profile("train_epoch", out="perf/train_epoch.jsonl")
        def train_epoch(...): ...

        with profile("eval", out="perf/eval.jsonl") as sampler:
            sampler.set_phase("eval", epoch=3)
    """

    def __init__(self, phase: str, out: str | Path, interval_s: float = 0.5, device: str | torch.device = "cpu",
                 backends: list | None = None):
        self.phase, self.out, self.interval_s = phase, Path(out), interval_s
        self.device = torch.device(device)
        self.backends = backends
        self.sampler: Sampler | None = None

    def __enter__(self) -> Sampler:
        backends = self.backends if self.backends is not None else registry.for_device(self.device)
        self.sampler = Sampler(backends, lambda phase: self.out, self.interval_s).start()
        self.sampler.set_phase(self.phase)
        try:
            devices.sync(self.device)  # work queued before the block is not the block's
        except BaseException:
            self.sampler.stop()
            raise
        self.started = time.perf_counter()
        return self.sampler

    def __exit__(self, exc_type, *exc) -> None:
        sync_error = None
        try:
            devices.sync(self.device)  # the block's queued device work is part of its duration
        except Exception as e:  # noqa: BLE001 - reported below, after the sampler is stopped
            sync_error = e
        duration = time.perf_counter() - self.started
        self.sampler.stop()
        row = {"t": time.time(), "phase": self.phase, "duration_s": duration,
               "ok": exc_type is None and sync_error is None}
        # Through the sampler's writer, after its last samples: a file it could not write (one warning
        # already) is not written again, and a failure never replaces the wrapped code's own outcome.
        self.sampler.writer.write(self.phase, row)
        self.sampler.writer.close()
        if sync_error is not None and exc_type is None:
            raise sync_error  # the wrapped code's device work failed; its own exception comes first

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with profile(self.phase, self.out, self.interval_s, self.device, self.backends):
                return fn(*args, **kwargs)
        return wrapped
