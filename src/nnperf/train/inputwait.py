"""How long an epoch's training waited for its input: `data_wait_s` in metrics.jsonl.

On the CPU the host is the device, so the wait is the host time spent in the batch iterator
(gathering, augmenting and normalising the batch). On an accelerator the host only queues work,
and the time the host spends in the iterator says nothing about the device: there the wait is
measured on the device's own clock, with timing events on the compute stream:

    step i queued ──> event D_i ... host fetches batch i+1 ... its pixels on the device ──> event S_i+1

The device runs D_i when it finishes step i and S_i+1 when it reaches the next batch's first use.
If the host queued batch i+1 (and its copy finished) before the device finished step i, the two
events run back to back and the gap is ~0; otherwise the gap is the time the device sat idle
waiting for that batch. Augmentation and normalisation run on the device after S and count as
training time, like any other kernel of the step.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Callable, Iterator

import torch


def timing_event_factory(dev: torch.device) -> Callable[[], object] | None:
    """A constructor of timing events on `dev`'s current stream, or None where the device has none
    (the CPU, or a torch whose MPS/XPU events cannot time)."""
    make = {"cuda": lambda: torch.cuda.Event(enable_timing=True),
            "xpu": lambda: torch.xpu.Event(enable_timing=True),
            "mps": lambda: torch.mps.event.Event(enable_timing=True)}.get(dev.type)
    if make is None:
        return None
    try:
        make()
    except Exception:  # noqa: BLE001 - an older torch or driver without timing events: the host clock
        return None
    return make


def measured_by(dev: torch.device) -> str:
    """What data_wait_s measures on `dev`, for env.json."""
    if timing_event_factory(dev) is None:
        return "host seconds in the batch iterator (gather, augmentation, normalisation)"
    return "device seconds idle between a step's end and the next batch's pixels on the device (timing events)"


class InputWait:
    """Wraps one epoch's batch iterator and adds up its input wait in seconds (see the module)."""

    def __init__(self, dev: torch.device, event: Callable[[], object] | None = None):
        self.event = event if event is not None else timing_event_factory(dev)
        self.seconds = 0.0
        self._last_done = None  # the event after the last queued step (or the epoch's start)
        self._pairs: deque = deque()  # (D_i, S_i+1) not yet read

    def batches(self, loader, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`loader.epoch(epoch, start)`, timed. Call after the device was synchronised."""
        if self.event is None:
            yield from self._host_timed(loader.epoch(epoch, start))
            return
        self._last_done = self._record()
        for batch in loader.epoch(epoch, start, fetched=self._fetched):
            yield batch
            self._last_done = self._record()  # the loop queued the step: the device's next gap starts there
            self._read(block=False)

    def total(self) -> float:
        """All of this epoch's wait. Call after the device was synchronised."""
        self._read(block=True)
        return self.seconds

    def _host_timed(self, batches):
        ask = time.perf_counter()
        for batch in batches:
            self.seconds += time.perf_counter() - ask
            yield batch
            ask = time.perf_counter()

    def _record(self):
        e = self.event()
        e.record()
        return e

    def _fetched(self) -> None:
        """Called by the loader once the batch's pixels are (queued to be) on the device."""
        self._pairs.append((self._last_done, self._record()))

    def _read(self, block: bool) -> None:
        # Only pairs the device has passed are read: elapsed_time on a pending event would wait.
        while self._pairs and (block or self._pairs[0][1].query()):
            done, fetched = self._pairs.popleft()
            if block:
                fetched.synchronize()
            self.seconds += max(0.0, done.elapsed_time(fetched)) / 1000  # ms -> s
