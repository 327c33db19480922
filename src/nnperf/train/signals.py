"""SIGINT/SIGTERM during training: finish the step, save the position, exit non-zero."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a flag the loop checks after each step.

    People press Ctrl-C twice when nothing seems to happen, so the second signal only says that
    the position is being saved; a third aborts at once, except while a checkpoint is being
    written (that write is atomic either way, but finishing it keeps the position)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)
    ABORT_AT = 3

    def __init__(self):
        self.signum: int | None = None
        self.count = 0
        self._saving = 0
        self._previous = {}

    def _handle(self, signum, frame):
        self.count += 1
        if self.signum is None:
            self.signum = signum
            return
        if self.count >= self.ABORT_AT and not self._saving:
            raise KeyboardInterrupt
        if self.count == 2:
            print("nnperf: stopping after this step to save the position (press again to abort without saving)",
                  file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def saving(self):
        """While a checkpoint is written, further signals never abort."""
        self._saving += 1
        try:
            yield
        finally:
            self._saving -= 1

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
