"""The sampler: a background thread that asks each backend for a sample every interval and writes one
JSON line per (backend, sample), tagged with the phase, epoch and step the training loop is in.

One direction only: the loop tells the sampler where it is (`set_phase`, a plain assignment that never
blocks); the sampler never calls back. Each backend runs in its own worker thread, so a backend that
hangs is abandoned after a bounded wait instead of stopping the others (or the process's exit).
"""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from .backends.base import Backend, clean
from .energy import EnergyMeter

MIN_INTERVAL_S = 0.05
ERRORS_BEFORE_DISABLE = 3


def phase_file(folder: Path, phase: str) -> Path:
    """train -> train_epoch.jsonl, val -> val_epoch.jsonl (the older logs' names), else PHASE.jsonl."""
    return folder / (f"{phase}_epoch.jsonl" if phase in ("train", "val") else f"{phase}.jsonl")


class JsonlWriter:
    """Appends rows to one file per phase; each row is one write of a whole line, flushed, so a crash
    leaves at most one torn last line (which the reader skips)."""

    def __init__(self, path_for: Callable[[str], Path]):
        self.path_for = path_for
        self.files = {}

    def write(self, phase: str, row: dict) -> None:
        f = self.files.get(phase)
        if f is None:
            path = self.path_for(phase)
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self.files[phase] = open(path, "a", encoding="utf-8")
        f.write(json.dumps(row, separators=(",", ":")) + "\n")
        f.flush()

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


class _Worker:
    """One backend and the daemon thread that calls it; tracks failures and its own CPU time.

    A daemon thread, not a thread pool: a backend stuck in a driver call must not keep the process
    from exiting when training ends."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.errors = 0
        self.disabled: str | None = None
        self.cpu_s = 0.0
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.may_hang = getattr(backend, "may_hang", True)
        if self.may_hang:
            threading.Thread(target=self._serve, name=f"nnperf-{backend.name}", daemon=True).start()

    def _serve(self) -> None:
        while self.requests.get():
            start = time.thread_time()
            try:
                self.results.put((True, self.backend.sample()))
            except BaseException as e:  # noqa: BLE001 - handed to the sampler thread to judge
                self.results.put((False, e))
            finally:
                self.cpu_s += time.thread_time() - start

    def ask(self, timeout_s: float) -> dict:
        """The backend's sample; raises its exception, or queue.Empty after `timeout_s`."""
        if not self.may_hang:  # in-process reads: called directly (the sampler thread's CPU time covers it)
            return self.backend.sample()
        self.requests.put(True)
        ok, value = self.results.get(timeout=timeout_s)
        if not ok:
            raise value
        return value

    def stop(self) -> None:
        self.requests.put(False)


class Sampler:
    """Samples `backends` every `interval_s` seconds into JSONL files while the caller trains.

    `out` is a folder (rows go to phase_file(out, phase)) or a function from phase to file path.
    """

    def __init__(self, backends: list[Backend], out: Path | str | Callable[[str], Path], interval_s: float = 0.5,
                 run: str | None = None, timeout_s: float | None = None, warn: Callable[[str], None] | None = None):
        if interval_s < MIN_INTERVAL_S:
            raise ValueError(f"interval must be at least {MIN_INTERVAL_S}s, got {interval_s}")
        path_for = out if callable(out) else (lambda phase, folder=Path(out): phase_file(folder, phase))
        self.writer = JsonlWriter(path_for)
        self.workers = [_Worker(b) for b in backends]
        self.interval_s = interval_s
        self.timeout_s = timeout_s if timeout_s is not None else max(2.0, 4 * interval_s)
        self.run = run
        self.warn = warn or (lambda msg: print(f"nnperf telemetry: {msg}", file=sys.stderr))
        self.energy = EnergyMeter()
        self._where: tuple[str, int | None, int | None] = ("idle", None, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.own_cpu_s = 0.0
        self.samples = 0

    # ---- called by the training loop (never blocks) ----

    def set_phase(self, phase: str, epoch: int | None = None, step: int | None = None) -> None:
        self._where = (phase, epoch, step)  # one reference assignment: atomic under the GIL

    def start(self) -> "Sampler":
        self._thread = threading.Thread(target=self._loop, name="nnperf-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, write what is pending and release the backends (safe to call twice)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)
            self._thread = None
        for w in self.workers:
            w.stop()
            try:
                w.backend.close()
            except Exception:  # noqa: BLE001 - closing must never fail the run
                pass
        self.writer.close()

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def cpu_s(self) -> float:
        """CPU time the sampler has spent, its own thread and the backend threads together."""
        return self.own_cpu_s + sum(w.cpu_s for w in self.workers)

    # ---- the sampler thread ----

    def _loop(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            start = time.thread_time()
            try:
                self.sample_once()
            except Exception as e:  # noqa: BLE001 - the sampler must never die silently mid-run
                self.warn(f"sampling failed: {e}")
            self.own_cpu_s += time.thread_time() - start
            next_at += self.interval_s
            now = time.monotonic()
            if next_at < now:  # fell behind (slow backend): skip ahead instead of bursting
                next_at = now + self.interval_s
            self._stop.wait(next_at - now)

    def sample_once(self) -> None:
        phase, epoch, step = self._where
        t = time.time()
        for w in self.workers:
            if w.disabled:
                continue
            values = self._ask(w)
            if not values:
                continue
            device = w.backend.device
            values = self.energy.add(device, w.backend.name, phase, epoch, t, values)
            row = {"t": t, "run": self.run, "phase": phase, "epoch": epoch, "step": step, "device": device,
                   "backend": w.backend.name, **values}
            self.writer.write(phase, {k: v for k, v in row.items() if v is not None})
        self.samples += 1

    def _ask(self, w: _Worker) -> dict | None:
        try:
            values = clean(w.ask(self.timeout_s))
        except queue.Empty:
            self._disable(w, f"did not answer within {self.timeout_s:.1f}s")
            return None
        except Exception as e:  # noqa: BLE001 - a backend's failure is its own, never the run's
            w.errors += 1
            if w.errors >= ERRORS_BEFORE_DISABLE:
                self._disable(w, f"failed {w.errors} times in a row ({type(e).__name__}: {e})")
            return None
        w.errors = 0
        return values

    def _disable(self, w: _Worker, why: str) -> None:
        w.disabled = why
        self.warn(f"backend {w.backend.name} on {w.backend.device} {why}; disabled, training goes on")
