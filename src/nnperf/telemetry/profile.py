"""`profile`: telemetry around any code, as a decorator or a context manager."""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch

from . import backends as registry
from .sampler import Sampler


class profile:  # noqa: N801 - used like a function: @profile(...) / with profile(...)
    """Sample the hardware while the wrapped code runs, into `out` (JSONL), tagged with `phase`;
    when it ends, add a row with its duration.

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
        self.started = time.time()
        return self.sampler

    def __exit__(self, exc_type, *exc) -> None:
        self.sampler.stop()
        row = {"t": time.time(), "phase": self.phase, "duration_s": time.time() - self.started,
               "ok": exc_type is None}
        # Through the sampler's writer, after its last samples: a file it could not write (one warning
        # already) is not written again, and a failure never replaces the wrapped code's own outcome.
        self.sampler.writer.write(self.phase, row)
        self.sampler.writer.close()

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with profile(self.phase, self.out, self.interval_s, self.device, self.backends):
                return fn(*args, **kwargs)
        return wrapped
