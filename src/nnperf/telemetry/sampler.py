"""The sampler: a background thread that samples the in-process backends every interval and writes one
JSON line per (backend, sample), tagged with the phase, epoch and step the training loop was in.

One direction only: the loop tells the sampler where it is (`set_phase`); the sampler never calls back.
At a phase change, `set_phase` reads each device's energy counter once, through the backend's own
in-process read (never a vendor tool), so that a phase shorter than the sampling interval still gets
its energy; otherwise it is a plain assignment. Each backend that may block (a driver call, a vendor tool) samples
on its own schedule in its own worker thread, so a slow one never delays the others, and one that hangs
is abandoned after a bounded wait (its tool killed) instead of stopping the others or the process's
exit. Rows are written by the sampler thread alone, a second's worth at a time (and at every phase edge
and at stop); a file that cannot be written switches the files off with one warning, never the run.

What the sampler costs is mostly waking up: on a virtual machine a timer wakeup of a thread costs tens
of microseconds of CPU before any Python runs, and the first Python after it runs cold. So a tick does
as little as it can (read, clean, queue a row) and waits on a bare lock rather than a threading.Event;
rows are encoded and written once a second, hot, in one write per file.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from ..fileio import describe_os_error
from .backends.base import Backend, clean, number
from .energy import EnergyMeter

MIN_INTERVAL_S = 0.05
ERRORS_BEFORE_DISABLE = 3
STUCK_MARGIN_S = 1.0  # beyond a backend's own timeout before its call counts as stuck
EDGE_SLOW_S = 0.2  # a phase-edge energy read slower than this (or failing) is not tried again
EDGE_BUSY_S = 0.5  # a backend with a call in flight for longer is not read at a phase edge
FLUSH_EVERY_S = 1.0  # rows wait in memory at most this long before they are written
ENERGY_METHODS = {"counter": "energy counter differences",
                  "power": "sampled power integrated over time (trapezoid)"}
_encode = json.JSONEncoder(separators=(",", ":")).encode  # what json.dumps(row, separators=...) writes


class _Alarm:
    """A timed wait that another thread can cut short. A bare lock's timed acquire: a threading.Event
    wait builds a Condition and a fresh lock per call, which costs about half as much again per wakeup."""

    def __init__(self):
        self._lock = threading.Lock()
        self._lock.acquire()
        self.acquire = self._lock.acquire  # acquire(True, timeout >= 0): wait() without its call

    def ring(self) -> None:
        """Ends the wait in progress, or the next one; rings before a wait count once."""
        with contextlib.suppress(RuntimeError):  # already rung, not yet waited on
            self._lock.release()

    def wait(self, timeout: float) -> bool:
        """True when rung (the wait ended early), False when `timeout` seconds passed."""
        return self._lock.acquire(timeout=max(0.0, timeout))


def energy_reader(backend) -> Callable[[], float | None] | None:
    """The backend's in-process energy counter read (cumulative joules), or None where it has none.

    A backend's own `read_energy_j()` where it has one; else the "energy" reader group of the library
    backends (NVML, amdsmi), looked up at each call since one the GPU does not support is dropped; else
    the CPU backend's RAPL counters. Vendor tools (a process per read, which may block) have none."""
    own = getattr(backend, "read_energy_j", None)
    if callable(own):
        return own
    readers = getattr(backend, "readers", None)
    if isinstance(readers, dict) and callable(readers.get("energy")):
        def from_group():
            read = readers.get("energy")
            return read().get("energy_j") if read is not None else None
        return from_group
    rapl = getattr(backend, "rapl", None)
    if rapl is not None and getattr(rapl, "available", False) and callable(getattr(rapl, "joules", None)):
        return rapl.joules
    return None


def phase_file(folder: Path, phase: str) -> Path:
    """train -> train_epoch.jsonl, val -> val_epoch.jsonl (the older logs' names), else PHASE.jsonl."""
    return folder / (f"{phase}_epoch.jsonl" if phase in ("train", "val") else f"{phase}.jsonl")


def next_tick(due: float, interval_s: float) -> float:
    """The tick after `due`; one already missed (a stalled thread) is skipped rather than made up in a burst."""
    due += interval_s
    now = time.monotonic()
    return due if due >= now else now + interval_s


class JsonlWriter:
    """Appends rows to one file per phase: `write` one row, `write_many` rows in order, consecutive rows
    of one phase (one file) as one write of whole lines; every write is flushed, so a crash leaves at
    most one torn last line (which the reader skips).

    Telemetry is never worth a run: the first OSError (disk full, read-only or vanished folder) switches
    the writer off with one warning, and later rows are dropped."""

    def __init__(self, path_for: Callable[[str], Path], warn: Callable[[str], None]):
        self.path_for = path_for
        self.warn = warn
        self.files = {}
        self.failed: str | None = None

    def write(self, phase: str, row: dict) -> None:
        self.write_many([(phase, row)])

    def write_many(self, rows: list[tuple[str, dict]]) -> None:
        """Write (phase, row) pairs in their order."""
        if self.failed is not None or not rows:
            return
        chunks, phase, lines = [], rows[0][0], []
        for row_phase, row in rows:
            if row_phase != phase:
                chunks.append((phase, lines))
                phase, lines = row_phase, []
            lines.append(_encode(row))
        chunks.append((phase, lines))
        for phase, lines in chunks:
            lines.append("")  # the last line's end
            try:
                self._append(phase, "\n".join(lines))
            except OSError as e:
                self._switch_off(phase, e)
                return

    def _append(self, phase: str, text: str) -> None:
        f = self.files.get(phase)
        if f is None:
            path = self.path_for(phase)
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self.files[phase] = open(path, "a", encoding="utf-8")
        f.write(text)
        f.flush()

    def _switch_off(self, phase: str, e: OSError) -> None:
        if e.filename is None:  # a failed write or flush does not say which file
            e.filename = str(self.path_for(phase))
        self.failed = describe_os_error(e)
        self.warn(f"cannot write telemetry ({self.failed}); no more telemetry rows are written, training goes on")
        self.close()

    def close(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):  # flushing what a failed write left buffered fails again
                f.close()
        self.files.clear()


class _Worker:
    """One backend, its failures and its CPU time; for a backend that may block, also the daemon thread
    that samples it on its own schedule.

    Its own thread and schedule, so that a slow source (a tool taking 1.5 s per answer) never holds up
    the others; a daemon thread, not a pool, so that one stuck in a driver call cannot keep the process
    from exiting. The thread only queues what it sampled: the sampler thread collects, judges and writes,
    and calls the backend stuck when one call outlasts the timeout."""

    def __init__(self, backend: Backend, timeout_s: float):
        self.backend = backend
        self.timeout_s = timeout_s  # one call running longer than this is stuck
        self.errors = 0
        self.disabled: str | None = None
        self.abandoned = False
        self.cpu_s = 0.0
        self.may_hang = getattr(backend, "may_hang", True)
        self.results: queue.SimpleQueue = queue.SimpleQueue()  # (t, where, ok, sample or exception)
        self.busy_since: float | None = None
        self.thread: threading.Thread | None = None
        self.alarm = _Alarm()  # rung by the sampler's stop()
        self.energy = False  # whether a sample or an edge read had energy or power (then the meter sees all)
        self.read_energy = energy_reader(backend)
        # An in-process backend is called by the sampler thread and, at a phase edge, by the training
        # thread: the lock keeps the two from interleaving inside its (not thread-safe) state.
        self.lock = threading.Lock()

    def edge_energy(self) -> float | None:
        """One energy counter reading for a phase edge, or None. Never waits long: a backend stuck in a
        call, or in-process one busy on the sampler thread, is skipped, and one whose read failed or was
        slow is not read at edges again."""
        if self.read_energy is None or self.disabled or self.abandoned or self.stuck_s() > EDGE_BUSY_S:
            return None
        locked = self.thread is None
        if locked and not self.lock.acquire(timeout=0.05):
            return None
        start = time.monotonic()
        try:
            value = number(self.read_energy())
        except Exception:  # noqa: BLE001 - an edge read is a refinement: never worth the run
            self.read_energy = None
            return None
        finally:
            if locked:
                self.lock.release()
        if time.monotonic() - start > EDGE_SLOW_S:
            self.read_energy = None  # this one read still counts; the next edge goes without
        if value is None or value < 0:
            return None
        self.energy = True
        return value

    def start(self, where: Callable[[], tuple], interval_s: float, stop: threading.Event) -> None:
        """In-process reads (may_hang False) are called by the sampler thread itself: no thread."""
        if self.may_hang:
            self.thread = threading.Thread(target=self._serve, args=(where, interval_s, stop),
                                           name=f"nnperf-{self.backend.name}", daemon=True)
            self.thread.start()

    def _serve(self, where: Callable[[], tuple], interval_s: float, stop: threading.Event) -> None:
        began = time.thread_time()  # the thread's whole CPU time counts, its wakeups included
        due = time.monotonic()
        while not self.alarm.wait(due - time.monotonic()) and not stop.is_set() and self.disabled is None:
            self.results.put(self._call(where()))
            self.cpu_s = time.thread_time() - began
            due = next_tick(due, interval_s)
        self.cpu_s = time.thread_time() - began

    def _call(self, where: tuple) -> tuple:
        """(t, where, ok, sample or exception) of one sample(); t and where are those of its start."""
        t = time.time()
        self.busy_since = time.monotonic()
        try:
            return t, where, True, self.backend.sample()
        except BaseException as e:  # noqa: BLE001 - handed to the sampler thread to judge
            return t, where, False, e
        finally:
            self.busy_since = None

    def collect(self) -> list[tuple]:
        """What the thread sampled since the last call, oldest first; never waits."""
        out = []
        with contextlib.suppress(queue.Empty):
            while True:
                out.append(self.results.get_nowait())
        return out

    def stuck_s(self) -> float:
        busy = self.busy_since
        return time.monotonic() - busy if busy is not None else 0.0

    def abandon(self) -> None:
        """Give up on the call in flight (it is stuck)."""
        self.abandoned = True
        self._end_call()

    def _end_call(self) -> None:
        # A backend that runs a tool kills it, and every process it started, now; others cannot be ended.
        if self.endable:
            with contextlib.suppress(Exception):  # giving up must never fail the run
                self.backend.abandon()

    @property
    def endable(self) -> bool:
        return callable(getattr(self.backend, "abandon", None))

    def finish(self, deadline: float) -> None:
        """After the stop event: end a tool still running, then give the thread until `deadline` to
        return (no time at all to one stuck in a call that cannot be ended)."""
        if self.thread is None:
            return
        if self.busy_since is not None:
            self._end_call()  # a tool mid-call is not worth waiting for when sampling ends
        if self.endable or not self.abandoned:
            self.thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        if self.thread is not None and self.thread.is_alive():
            self._end_call()  # still inside sample(): closing under it could block stop() itself
            return
        with contextlib.suppress(Exception):  # closing must never fail the run
            self.backend.close()


class Sampler:
    """Samples `backends` every `interval_s` seconds into JSONL files while the caller trains.

    `out` is a folder (rows go to phase_file(out, phase)) or a function from phase to file path.
    """

    def __init__(self, backends: list[Backend], out: Path | str | Callable[[str], Path], interval_s: float = 0.5,
                 run: str | None = None, timeout_s: float | None = None, warn: Callable[[str], None] | None = None,
                 tags: dict | None = None):
        if interval_s < MIN_INTERVAL_S:
            raise ValueError(f"interval must be at least {MIN_INTERVAL_S}s, got {interval_s}")
        path_for = out if callable(out) else (lambda phase, folder=Path(out): phase_file(folder, phase))
        self.warn = warn or (lambda msg: print(f"nnperf telemetry: {msg}", file=sys.stderr))
        self.writer = JsonlWriter(path_for, self.warn)
        self.interval_s = interval_s
        self.timeout_s = timeout_s if timeout_s is not None else max(2.0, 4 * interval_s)
        self.workers = [_Worker(b, timeout_s if timeout_s is not None else self.backend_timeout(b))
                        for b in backends]
        self.run = run
        self.tags = dict(tags or {})  # on every row: the rank, local rank and host of a multi-process run
        self.energy = EnergyMeter()
        self._where: tuple[str, int | None, int | None] = ("idle", None, None)
        self._stop = threading.Event()
        self._alarm = _Alarm()  # cuts the sampler thread's wait short: at stop, and at a phase edge
        self._thread: threading.Thread | None = None
        self._started = False
        self._stopped = False
        self.own_cpu_s = 0.0
        self.samples = 0
        # Rows sampled but not yet handed to the writer (the sampler thread's alone; stop() takes over
        # after joining it), and by when they are to be written.
        self._queue: list[tuple] = []
        self._due = 0.0

    def backend_timeout(self, backend: Backend) -> float:
        """How long one call of `backend` may run before it counts as stuck, when the caller set no
        bound for all: a backend with its own `timeout_s` (a vendor tool that takes seconds on a
        multi-GPU node) gets that plus STUCK_MARGIN_S, so that its own timeout fires first and counts
        as a failure; any other gets the sampler's default."""
        own = number(getattr(backend, "timeout_s", None))
        return max(self.timeout_s, own + STUCK_MARGIN_S) if own is not None and own > 0 else self.timeout_s

    # ---- called by the training loop (never blocks for long) ----

    def set_phase(self, phase: str, epoch: int | None = None, step: int | None = None) -> None:
        before = self._where
        if self._started and not self._stopped and (phase, epoch) != before[:2]:
            self._phase_edge(before)
        self._where = (phase, epoch, step)  # one reference assignment: atomic under the GIL
        if self._started and not self._stopped and (phase, epoch) != before[:2]:
            self._alarm.ring()  # the sampler thread writes the closed phase's rows now, off this thread

    def _phase_edge(self, before: tuple) -> None:
        """Close the window `before` with one energy counter reading of each device that has one (the
        next samples, tagged with the new phase, count from it)."""
        phase, epoch, _ = before
        for w in self.workers:
            try:
                joules = w.edge_energy()
                if joules is not None:
                    self.energy.edge(w.backend.device, w.backend.name, phase, epoch, time.time(), joules)
            except Exception:  # noqa: BLE001 - telemetry must never fail the loop that calls it
                continue

    def start(self) -> "Sampler":
        self._started = True
        for w in self.workers:
            w.start(lambda: self._where, self.interval_s, self._stop)
        self._thread = threading.Thread(target=self._loop, name="nnperf-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, write what was sampled, kill the vendor tools still running and release the
        backends. Never raises: telemetry must not fail the run. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._alarm.ring()
        for w in self.workers:
            w.alarm.ring()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + 1)  # it never waits on a backend: this is quick
            self._thread = None
        deadline = time.monotonic() + self.timeout_s  # tools are killed first: the bound is for the rest
        for w in self.workers:
            w.finish(deadline)
        try:
            for w in self.workers:
                self._collect(w, final=True)
            self._flush()
        except Exception as e:  # noqa: BLE001 - the last rows are not worth an exception out of stop()
            self.warn(f"last samples lost: {type(e).__name__}: {e}")
        for w in self.workers:
            w.close()
        self.writer.close()

    def __enter__(self) -> "Sampler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def energy_window(self, phase: str, epoch: int | None) -> dict:
        """{"energy_j": joules, "energy_by_device_j": {device: joules}} of the window (phase, epoch), from
        the devices that could tell their energy; {} when none could (never a made-up value)."""
        return self.energy.window(phase, epoch) or {}

    def describe(self) -> dict:
        """What this sampler did, for env.json: its interval, each backend (and why it was disabled, if
        it was), how each device's energy was measured, its own CPU time and the ticks it took."""
        return {"enabled": True, "interval_s": self.interval_s,
                "backends": [{"name": w.backend.name, "device": w.backend.device, "disabled": w.disabled}
                             for w in self.workers],
                "energy_method": {device: ENERGY_METHODS[method] for device, method in self.energy.methods.items()},
                "sampler_cpu_s": self.cpu_s, "samples": self.samples}

    @property
    def cpu_s(self) -> float:
        """CPU time the sampler has spent, its own thread and the backend threads together: all of their
        CPU time, waking up included (while sampling, as of the last flush or backend call)."""
        return self.own_cpu_s + sum(w.cpu_s for w in self.workers)

    # ---- the sampler thread ----

    def _loop(self) -> None:
        # Runs every tick on a cold cache, where each call costs: next_tick and _Alarm.wait inlined, and
        # the thread's CPU time (all of it: its wakeups cost more than its work) read once per flush.
        thread_time, monotonic, wait, interval = time.thread_time, time.monotonic, self._alarm.acquire, self.interval_s
        began = thread_time()
        due = monotonic()
        while not self._stopped:
            try:
                self.sample_once()
                if self._queue and monotonic() >= self._due:
                    self._flush()
                    self.own_cpu_s = thread_time() - began
            except Exception as e:  # noqa: BLE001 - the sampler must never die silently mid-run
                self.warn(f"sampling failed: {e}")
            now = monotonic()
            due += interval
            if due < now:
                due = now + interval  # a missed tick (a stalled thread) is skipped, not made up in a burst
            while wait(True, max(0.0, due - monotonic())) and not self._stopped:
                try:  # a phase edge: the closed phase's rows go to disk now
                    self._flush_edge()
                except Exception as e:  # noqa: BLE001
                    self.warn(f"sampling failed: {e}")
        self.own_cpu_s = thread_time() - began

    def _flush_edge(self) -> None:
        """At a phase edge: what the worker threads sampled so far, then every queued row, to disk."""
        for w in self.workers:
            if w.thread is not None and not w.disabled:
                self._collect(w)
        self._flush()

    def sample_once(self) -> None:
        """Sample the in-process backends, write what the worker threads sampled since the last tick, and
        give up on a worker stuck in one call for longer than the timeout."""
        where, t = self._where, time.time()
        for w in self.workers:
            if w.disabled:
                continue
            if w.thread is None:
                try:
                    with w.lock:
                        raw = w.backend.sample()
                    if type(raw) is not dict:
                        clean(raw)  # raises the TypeError that counts as a failure
                except Exception as e:  # noqa: BLE001 - a backend's failure is its own, never the run's
                    self._failed(w, e)
                    continue
                if w.energy or "energy_j" in raw or "power_w" in raw:
                    w.energy = True  # from now on every sample goes through the energy meter, in order
                    self._record(w, t, where, clean(raw))
                else:
                    # Nothing for the energy meter (it would only note a reading without energy or
                    # power, which charges nothing): cleaned and made a row at the next flush.
                    w.errors = 0
                    if not self._queue:
                        self._due = time.monotonic() + FLUSH_EVERY_S
                    self._queue.append((w, t, where, raw))
                continue
            self._collect(w)
            if w.stuck_s() > w.timeout_s:
                self._disable(w, f"did not answer within {w.timeout_s:.1f}s")
                w.abandon()
        self.samples += 1

    def _collect(self, w: _Worker, final: bool = False) -> None:
        for t, where, ok, value in w.collect():
            if w.disabled:
                return
            if not ok:
                if not final:  # a call ended by stop() itself is no failure of the backend
                    self._failed(w, value)
                continue
            try:
                values = clean(value)
            except TypeError as e:  # garbage instead of a dict
                self._failed(w, e)
                continue
            self._record(w, t, where, values)

    def _record(self, w: _Worker, t: float, where: tuple, values: dict) -> None:
        w.errors = 0
        if not values:
            return
        phase, epoch, _ = where
        values = self.energy.add(w.backend.device, w.backend.name, phase, epoch, t, values)
        if not self._queue:
            self._due = time.monotonic() + FLUSH_EVERY_S
        self._queue.append((phase, self._row(w, t, where, values)))

    def _row(self, w: _Worker, t: float, where: tuple, values: dict) -> dict:
        """The row of one sample: its time and tags (those that are None left out), then its values."""
        phase, epoch, step = where
        row = {"t": t, "run": self.run, **self.tags, "phase": phase, "epoch": epoch, "step": step,
               "device": w.backend.device, "backend": w.backend.name}
        if None in row.values():
            row = {k: v for k, v in row.items() if v is not None}
        row.update(values)  # clean() and the energy meter never give None
        return row

    def _flush(self) -> None:
        """Hand the queued rows to the writer, in the order they were sampled, and write them: a row
        queued as (phase, row) is done; one queued as (worker, t, where, raw sample) is cleaned now."""
        queue_, self._queue = self._queue, []
        rows = []
        for item in queue_:
            if len(item) == 2:
                rows.append(item)
                continue
            w, t, where, raw = item
            values = clean(raw)
            if values:
                rows.append((where[0], self._row(w, t, where, values)))
        self.writer.write_many(rows)

    def _failed(self, w: _Worker, e: BaseException) -> None:
        w.errors += 1
        if w.errors >= ERRORS_BEFORE_DISABLE:
            self._disable(w, f"failed {w.errors} times in a row ({type(e).__name__}: {e})")

    def _disable(self, w: _Worker, why: str) -> None:
        w.disabled = why
        self.warn(f"backend {w.backend.name} on {w.backend.device} {why}; disabled, training goes on")
