"""`nnperf train --nproc N ...`: torchrun's elastic launcher (torch.distributed.run) started in this
process, running N copies of the same command on this node; for several nodes, run torchrun itself
(`torchrun --nnodes ... -m nnperf train ...`).

The launcher checks what it can before any process starts (the device count, the batch), gives each
CPU process its share of the cores, and turns a failed rank into one line: the rank's own error line
is already on the terminal, so it only adds which rank stopped and how when the rank could not say.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import torch

from .. import device as devices
from ..config import TrainConfig
from ..errors import UsageError

LAUNCHED = "TORCHELASTIC_RUN_ID"  # set by torchrun in every process it starts


def launched() -> bool:
    return LAUNCHED in os.environ


LAUNCH_FLAGS = ("--nproc", "--max-restarts")


def after_restart(given: dict, cfg: TrainConfig) -> dict | None:
    """When torchrun restarted this job's processes (--max-restarts) after one failed: the settings that
    continue the job's own run (from its last.pt; over it, where it died before its first save), or
    None. A run directory counts as the job's own only if its env.json names this job's run id, so a
    restart never takes over another run of the same name."""
    from . import rundir

    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0 or given.get("resume"):
        return None
    path = rundir.target(cfg)
    try:
        env = json.loads((path / "env.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    job = env.get("distributed", {}).get("run_id") if isinstance(env, dict) else None
    if not job or job != os.environ.get(LAUNCHED):
        return None
    last = path / "checkpoints" / "last.pt"
    return {**given, "resume": str(last)} if last.is_file() else {**given, "overwrite": True}


def without_nproc(argv: list[str]) -> list[str]:
    """The command line without the launcher's own flags (--nproc N, --max-restarts K, or FLAG=V)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in LAUNCH_FLAGS)):
            out.append(arg)
    return out


def check(nproc: int, cfg: TrainConfig) -> None:
    """What a launch cannot survive, said before any process starts."""
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: must be 1 or more")
    dev = devices.resolve(cfg.device)
    count = _cores() if dev.type == "cpu" else torch.cuda.device_count() if dev.type == "cuda" else \
        torch.xpu.device_count() if dev.type == "xpu" else 1
    what = "CPU cores" if dev.type == "cpu" else f"{dev.type} devices"
    if nproc > count:
        raise UsageError(f"--nproc {nproc}: this machine has {count} {what}; use --nproc {count} or fewer")
    if dev.type not in ("cpu", "cuda", "xpu") and nproc > 1:
        raise UsageError(f"--nproc {nproc}: several processes need cuda, xpu or cpu devices, not {dev.type}")
    if cfg.batch_size % nproc:
        lower = cfg.batch_size // nproc * nproc
        sizes = " or ".join(str(b) for b in (lower, lower + nproc) if b > 0)
        raise UsageError(f"--batch-size {cfg.batch_size}: the global batch must divide among {nproc} processes; "
                         f"use {sizes}")


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def start(nproc: int, argv: list[str], cfg: TrainConfig, max_restarts: int = 0) -> int:
    """Run `nnperf train ARGV` in `nproc` processes under torchrun's agent; its exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    check(nproc, cfg)
    rest = without_nproc(argv)
    if cfg.name is None:  # one name for every rank and every restart
        rest += ["--name", f"{cfg.dataset}-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"]
    if "OMP_NUM_THREADS" not in os.environ:  # each CPU process its share of the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // nproc))
    args = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
         "--module", "nnperf", *rest])
    # The agent logs each worker it stops and each failure at length: nnperf's lines say it in one.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        return _failed(e)
    except SignalException as e:  # the agent passed the signal on; rank 0 said where the run stopped
        return 128 + int(e.sigval)
    return 0


def _failed(e) -> int:
    """The first failure's exit status; a line naming the rank where the rank could not say why itself
    (killed by a signal, or a crash without nnperf's own error line)."""
    rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
    code = failure.exitcode
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        print(f"nnperf train: error: rank {rank} (pid {failure.pid}) was killed by {name}", file=sys.stderr)
        return 128 - code
    if code not in (1, 2, 3) and code < 128:
        print(f"nnperf train: error: rank {rank} (pid {failure.pid}) exited with status {code}", file=sys.stderr)
    return code
