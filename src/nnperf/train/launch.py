"""`nnperf train --nproc N ...`: torchrun's elastic launcher (torch.distributed.run) started in this
process, running N copies of the same command on this node; for several nodes, run torchrun itself
(`torchrun --nnodes ... -m nnperf train ...`).

The launcher checks what it can before any process starts (the device count, the batch), gives each
CPU process its share of the cores, and turns a failed rank into one line: the rank's own error line
is already on the terminal, so it only adds which rank stopped and how when the rank could not say.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import torch

from .. import device as devices
from ..config import TrainConfig
from ..errors import UsageError
from . import dist, rundir

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
        elif _launch_flag(arg) and "=" not in arg:
            skip = True
        elif not _launch_flag(arg):
            out.append(arg)
    return out


def _launch_flag(arg: str) -> bool:
    """--nproc or --max-restarts, or a short form argparse took for one (--max-rest; nnperf's parser
    refuses a short form that fits two flags, so one that got this far is the flag)."""
    flag = arg.split("=", 1)[0]
    return len(flag) > 3 and flag.startswith("--") and any(f.startswith(flag) for f in LAUNCH_FLAGS)


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
    dist.check_batch(cfg.batch_size, nproc)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def start(nproc: int, argv: list[str], cfg: TrainConfig, max_restarts: int = 0, check_dir: bool = True) -> int:
    """Run `nnperf ARGV` (train, or profile: `check_dir` False, it judges its own run directory) in
    `nproc` processes under torchrun's agent; its exit status."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    check(nproc, cfg)
    rest = without_nproc(argv)
    if cfg.name is None:  # one name for every rank and every restart
        cfg = dataclasses.replace(cfg, name=rundir.default_name(cfg))
        rest += ["--name", cfg.name]
    if check_dir:
        _check_run_dir(cfg)
    if "OMP_NUM_THREADS" not in os.environ:  # each CPU process its share of the cores
        os.environ["OMP_NUM_THREADS"] = str(max(1, _cores() // nproc))
    # nnperf's flags go to the processes as they are: through torchrun's parser, a short form such as
    # --log (nnperf's --log-every) read as ambiguous among torchrun's own flags.
    args = torchrun.get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts), "--module", "nnperf"])
    args.training_script_args = rest
    _quiet_agent()
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        return _failed(e, cfg, nproc)
    except SignalException as e:  # the agent passed the signal on; rank 0 said where the run stopped
        return 128 + int(e.sigval)
    return 0


def _check_run_dir(cfg: TrainConfig) -> None:
    """The run directory checks of rank 0, before any process starts (read-only)."""
    from . import rundir

    if cfg.resume:
        rundir.for_resume(cfg)
    else:
        rundir.check_new(cfg)


def _quiet_agent() -> None:
    """The agent logs each worker it stops and each failure at length (and a few of its loggers set
    their own level): nnperf's lines say it in one."""
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("torch.distributed.elastic")]:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)


def _failed(e, cfg: TrainConfig, nproc: int) -> int:
    """The first failure's exit status; a line naming the rank where the rank could not say why itself
    (killed by a signal, or a crash without nnperf's own error line), and where to resume from."""
    rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
    code = failure.exitcode
    if code < 0:
        import signal

        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        print(f"nnperf train: error: rank {rank} (pid {failure.pid}) was killed by {name}", file=sys.stderr)
        code = 128 - code
    elif code not in (1, 2, 3) and code < 128:
        print(f"nnperf train: error: rank {rank} (pid {failure.pid}) exited with status {code}", file=sys.stderr)
    last = Path(cfg.out_dir) / cfg.name / "checkpoints" / "last.pt"
    if code != 2 and last.is_file():
        print(f"  the run's last saved position: nnperf train --nproc {nproc} --resume {last}", file=sys.stderr)
    return code
