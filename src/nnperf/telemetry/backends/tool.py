"""Vendor command-line tools (rocm-smi, amd-smi) run in a session of their own, so that a tool that hangs
can be killed together with every process it started, and none is left behind: not when the sampler
abandons it, not when the sampler stops, not when the interpreter exits."""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import threading

_running: set[subprocess.Popen] = set()  # every tool call in flight, for the exit handler
_lock = threading.Lock()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group `proc` leads: the tool and any child it spawned (which would otherwise
    keep running, and keep our pipes open, after the tool itself is gone)."""
    if proc.returncode is not None:
        return  # already reaped: if its children are gone too, the group id is free for reuse
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass  # the whole group has ended already


class ToolRunner:
    """Runs one command at a time, as `subprocess.run` would with captured text output and a timeout,
    but in a new session; `kill()` ends the call in flight from any thread."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None

    def __call__(self, command: list[str], timeout: float) -> subprocess.CompletedProcess:
        with subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) as proc:
            self._track(proc)
            try:
                out, err = proc.communicate(timeout=timeout)
            except BaseException:  # TimeoutExpired, or an interrupt: the tool must not outlive the call
                kill_group(proc)
                raise
            finally:
                self._untrack(proc)
        return subprocess.CompletedProcess(command, proc.returncode, out, err)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None:
            kill_group(proc)

    def _track(self, proc: subprocess.Popen) -> None:
        with _lock:
            _running.add(proc)
        self.proc = proc

    def _untrack(self, proc: subprocess.Popen) -> None:
        self.proc = None
        with _lock:
            _running.discard(proc)


@atexit.register
def kill_all() -> None:
    """At exit, the tools still running (in daemon threads that will never return) go with the process."""
    with _lock:
        procs = list(_running)
    for proc in procs:
        kill_group(proc)
