"""Telemetry cleans up after itself: a vendor tool that hangs is killed with its children (when
abandoned, when the sampler stops, at exit), a slow tool does not starve the other sources, and
telemetry files that cannot be written never stop the run or raise."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from nnperf.telemetry import backends as registry
from nnperf.telemetry import sampler as sampler_module
from nnperf.telemetry import Sampler
from nnperf.telemetry.backends.cpu import CpuBackend
from nnperf.telemetry.backends.rocm_smi import RocmSmiBackend

from conftest import TINY
from fake_vendor import fake_tool
from test_telemetry_sampler import FakeBackend

CARDS = (Path(__file__).parent / "fixtures" / "rocm-smi-5.x.json").read_text()
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the processes in /proc")


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for init to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _living(pids: list[int]) -> list[int]:
    """Of a hung tool's process ids (the tool, which leads its own process group, and its child), those
    still running, and any other member of the tool's group that still runs."""
    group = pids[0]
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == group and fields[0] != "Z":
                    members.append(int(entry.name))
    return sorted({p for p in pids if _running(p)} | set(members))


def _until(check, within_s: float):
    """check()'s first truthy value within `within_s` seconds (the last value otherwise)."""
    deadline = time.monotonic() + within_s
    while not (value := check()) and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


def _tool_pids(pids: Path) -> list[int]:
    """The process ids a hung fake tool wrote: its own and its child's."""
    text = _until(lambda: pids.read_text() if pids.exists() and len(pids.read_text().split()) >= 2 else "", 10)
    assert text, "the fake tool never ran"
    return [int(p) for p in text.split()[:2]]


@pytest.fixture
def tools(tmp_path, monkeypatch):
    """A folder first on PATH for fake tools; whatever they left running is killed after the test."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    yield folder
    for pids in folder.glob("*.pids"):
        for pid in map(int, pids.read_text().split()):
            with contextlib.suppress(OSError):
                if _running(pid) and b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)


@needs_proc
def test_a_hung_tool_and_its_child_are_killed_when_abandoned(tools, tmp_path):
    pids = fake_tool(tools, "rocm-smi", hang=True)
    warnings = []
    s = Sampler([RocmSmiBackend(torch.device("cuda", 0))], tmp_path / "tel", interval_s=0.05, timeout_s=0.3, warn=warnings.append).start()
    tool = _tool_pids(pids)
    assert _until(lambda: warnings, 5), "the hung tool was never abandoned"
    assert _until(lambda: not _living(tool), 3), "the abandoned tool's group still runs"
    s.stop()
    assert len(warnings) == 1 and "rocm-smi" in warnings[0] and "did not answer within 0.3s" in warnings[0]
    assert len(pids.read_text().split()) == 2  # abandoned for good: never started again
    assert not [t for t in threading.enumerate() if t.name in ("nnperf-sampler", "nnperf-rocm-smi")]


@needs_proc
def test_a_tool_still_running_when_the_sampler_stops_is_killed(tools, tmp_path):
    pids = fake_tool(tools, "rocm-smi", hang=True)
    warnings = []
    s = Sampler([RocmSmiBackend(torch.device("cuda", 0))], tmp_path / "tel", interval_s=0.05, timeout_s=60, warn=warnings.append).start()
    tool = _tool_pids(pids)
    assert _until(lambda: len(_living(tool)) >= 2, 3), "the tool and its child should both run"
    started = time.monotonic()
    s.stop()
    assert time.monotonic() - started < 2  # stop() does not wait for the tool
    assert _until(lambda: not _living(tool), 3), "the tool's group outlived the sampler"
    assert warnings == []  # the sampler ended the call, the backend did not fail


@needs_proc
def test_tools_still_running_at_exit_are_killed(tools, tmp_path):
    """A process that ends without stopping its sampler takes its tools with it."""
    pids = fake_tool(tools, "rocm-smi", hang=True)
    script = "\n".join([
        "import time",
        "from pathlib import Path",
        "from nnperf.telemetry import Sampler",
        "from nnperf.telemetry.backends.rocm_smi import RocmSmiBackend",
        f"Sampler([RocmSmiBackend(\"cuda:0\")], {str(tmp_path / 'tel')!r}, interval_s=0.05, timeout_s=60).start()",
        f"pids = Path({str(pids)!r})",
        "while len(pids.read_text().split() if pids.exists() else []) < 2:  # the tool and its child run",
        "    time.sleep(0.02)",
    ])
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, env=os.environ.copy())
    tool = _tool_pids(pids)
    assert _until(lambda: not _living(tool), 3), "the tool's group outlived the interpreter"


def test_a_slow_tool_does_not_starve_the_cpu_source(tools, tmp_path):
    """A tool taking 1.5 s per answer used to hold up every other source while it ran (35 CPU rows
    instead of 81 in 8 s); each source now keeps its own pace."""
    fake_tool(tools, "rocm-smi", output=CARDS, delay_s=1.5)
    interval = 0.1
    s = Sampler([CpuBackend(), RocmSmiBackend(torch.device("cuda", 0))], tmp_path, interval_s=interval, timeout_s=30).start()
    started = time.monotonic()
    time.sleep(3.0)
    s.stop()
    wall = time.monotonic() - started
    rows = _rows(tmp_path / "idle.jsonl")
    cpu = [r["t"] for r in rows if r["backend"] == "cpu"]
    assert any(r["backend"] == "rocm-smi" and "gpu_util_pct" in r for r in rows)  # the slow tool did answer
    assert len(cpu) >= 0.7 * wall / interval, (len(cpu), wall)
    assert max(b - a for a, b in zip(cpu, cpu[1:])) < 1.0  # never held up for the tool's 1.5 s


def test_an_unwritable_telemetry_file_is_switched_off_with_one_warning(tmp_path):
    (tmp_path / "idle.jsonl").mkdir()  # where the rows should go is a folder
    warnings = []
    s = Sampler([FakeBackend(), CpuBackend()], tmp_path, interval_s=0.05, warn=warnings.append).start()
    time.sleep(0.4)
    assert s._thread.is_alive()
    s.stop()
    s.stop()
    assert s.samples >= 4
    assert len(warnings) == 1 and "idle.jsonl" in warnings[0] and "training goes on" in warnings[0]
    assert s.energy.window("idle", None)["energy_j"] > 0  # sampling went on: energy is still accounted


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_disk_mid_run_stops_the_files_not_the_sampler(tmp_path):
    """Rows already written stay whole; after the first failed write nothing more is written or warned."""
    paths = {"train": tmp_path / "train.jsonl", "val": Path("/dev/full")}  # writes there fail with ENOSPC
    warnings = []
    s = Sampler([FakeBackend(), CpuBackend()], lambda phase: paths[phase], interval_s=0.05,
                warn=warnings.append)
    s.set_phase("train", 1)
    s.start()
    time.sleep(0.3)
    s.set_phase("val", 1)
    assert _until(lambda: warnings, 3)
    written = (tmp_path / "train.jsonl").read_text()
    s.set_phase("train", 2)
    time.sleep(0.3)
    s.stop()
    assert len(warnings) == 1 and "no space left" in warnings[0] and "/dev/full" in warnings[0]
    assert (tmp_path / "train.jsonl").read_text() == written and len(_rows(tmp_path / "train.jsonl")) >= 4
    assert s.samples >= 8


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_training_goes_on_when_telemetry_cannot_be_written(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "for_device", lambda dev, warn=None: [FakeBackend()])
    monkeypatch.setattr(sampler_module, "phase_file", lambda folder, phase: Path("/dev/full"))
    code, out, err = run_cli("train", *TINY, "--epochs", "1", "--telemetry-interval", "0.05", "--name", "w")
    assert code == 0, err
    assert out.splitlines()[-1].startswith("FINAL")
    assert err.count("cannot write telemetry") == 1
    env = json.loads((tmp_path / "runs/w/env.json").read_text())
    assert env["telemetry"]["samples"] >= 1 and env["telemetry"]["backends"][0]["disabled"] is None
