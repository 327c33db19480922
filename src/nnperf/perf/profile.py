"""`nnperf profile`: set a run up exactly as `nnperf train` does, take N warm-up steps and K-1 more
on the real batches, then capture one training step: NVTX ranges `step` > `forward`, `backward`,
`optimizer` and cudaProfilerStart/Stop around it for Nsight (CUDA/ROCm only), and torch.profiler
around it for a Chrome/Perfetto trace, the key-averages table and a per-module table, all written
to RUN/profile/.

The run directory: a new one gets config.yaml and env.json (it reruns the profile) and an empty
checkpoints/; one left by an earlier `nnperf profile` (no checkpoint, no metrics) is replaced;
a training run is never replaced: `--resume RUN/checkpoints/last.pt` profiles it from its saved
state and writes only RUN/profile/.

Reading order: `run` -> `_open_run` -> `_warm_up` -> `capture` (StepMarks, ModuleRanges) ->
`write_outputs` -> `_report`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import gzip
import io
import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity

from .. import config as configs
from .. import device as devices
from .. import fileio
from ..errors import EnvError, UsageError
from ..train import build, checkpoint, dist, launch, loop, rundir
from ..train.build import Run
from . import flops

# Modules this deep in the model (`layer1` is 1, `layer1.0` is 2) get a range of their own in the
# per-module table; deeper ones count towards their ancestor.
MODULE_DEPTH = 2
MODULE_RANGE = "module: "
BACKWARD_NODE = "autograd::engine::evaluate_function: "
TOP_OPS = 10  # printed after the capture
STEP_RANGES = ("step", "forward", "backward", "optimizer")


# ---- the command ----------------------------------------------------------------------------------

def run(ns: argparse.Namespace) -> int:
    """`nnperf profile`: warm up, capture one training step, write RUN/profile/; 0 on success."""
    warmup, k = _check_counts(ns)
    cfg, state, given = _config(ns)
    if ns.nproc is not None and not launch.launched():
        launch.check(ns.nproc, cfg)
        if ns.nproc > 1:
            return launch.start(ns.nproc, ns.argv, cfg, check_dir=False)  # the same command in each process
    dev = devices.resolve(cfg.device)
    activities = profiler_activities(dev, os.environ)
    replacing = _check_target(cfg, state)
    main = dist.from_env().main  # several processes (torchrun): each profiles its step, rank 0 writes
    say = print if main else (lambda *a, **k: None)
    r = build.setup(dataclasses.replace(cfg, overwrite=True) if replacing else cfg, state, say)
    r.cfg = cfg  # config.yaml keeps what the user asked for, not the replacement implied above
    try:
        if r.fresh and main:
            _write_start_files(r)
        where = _check_steps(r, warmup + k, warmup, k)
        say(f"profile {r.dir} | {cfg.dataset} {cfg.model} on {r.dev} ({devices.device_name(r.dev)}) | "
            f"{r.hw.describe()}\nwarm-up {warmup} steps, then capturing {where.describe()}", flush=True)
        batches = _warm_up(r, warmup + k - 1)
        nvtx, cuda_profiler = nvidia_tools(r.dev)
        prof, modules = capture(r, next(batches), activities, nvtx, cuda_profiler)
        folder = write_outputs(r, prof, modules, activities, where, warmup, k, nvtx is not None) if main else None
    except BaseException:
        if r.fresh and main:
            rundir.remove_if_unsaved(r.dir)  # a half-made profile run holds nothing worth keeping
        raise
    if main:
        _report(r, prof, activities, folder, command_line(ns, given, cfg, nproc=r.world.size))
    dist.finish()
    return 0


def _check_counts(ns: argparse.Namespace) -> tuple[int, int]:
    if ns.warmup_iters < 0:
        raise UsageError(f"--warmup-iters {ns.warmup_iters}: must be 0 or more (training steps before the capture)")
    if ns.profile_iter < 1:
        raise UsageError(f"--profile-iter {ns.profile_iter}: must be 1 or more (1 captures the first step after "
                         "the warm-up)")
    return ns.warmup_iters, ns.profile_iter


def _config(ns: argparse.Namespace) -> tuple[configs.TrainConfig, dict | None, dict]:
    """The config `nnperf train` would run with these flags (and the checkpoint of --resume)."""
    given = {f.name: getattr(ns, f.name) for f in configs.fields() if hasattr(ns, f.name)}
    cfg, state = checkpoint.config_and_state(given, ns.config)
    if cfg.name is None:
        cfg.name = rundir.default_name(cfg)
    return cfg, state, given


def _check_target(cfg: configs.TrainConfig, state: dict | None) -> bool:
    """Whether the run directory is one an earlier `nnperf profile` left (replaced: it holds only a
    profile); refuses a training run, whose checkpoints and metrics a profile must not touch."""
    path = rundir.target(cfg)
    if state is not None or not rundir.is_run_dir(path):
        return False  # a resume reopens its own run; anything else is for setup to judge
    if any((path / "checkpoints").glob("*.pt")) or (path / "metrics.jsonl").exists() or not _profile_only(path):
        raise UsageError(f"--name {cfg.name}: {path} holds a training run; nnperf profile never replaces one: "
                         f"profile it with --resume {path}/checkpoints/last.pt (writes only {path}/profile/) "
                         "or choose another --name")
    return True


def _profile_only(path: Path) -> bool:
    """Whether env.json says an earlier `nnperf profile` made this run directory."""
    try:
        return json.loads((path / "env.json").read_text(encoding="utf-8")).get("profile_only") is True
    except (OSError, ValueError, AttributeError):
        return False


def _write_start_files(r: Run) -> None:
    """config.yaml and env.json of a new run directory: the profile's settings, so it reruns."""
    rundir.write_start_files(r.dir, r.cfg, {**loop.start_env(r), "profile_only": True})


# ---- the steps before the capture -----------------------------------------------------------------

@dataclass
class StepAt:
    """Where the captured step is in the run: epoch and batch (1-based, as printed), global step."""

    epoch: int
    batch: int
    batches: int
    global_step: int

    def describe(self) -> str:
        return f"epoch {self.epoch}, batch {self.batch} of {self.batches} (global step {self.global_step})"


def _check_steps(r: Run, total: int, warmup: int, k: int) -> StepAt:
    """The run's schedule has len(train) x --epochs steps; the warm-up and capture must fit in
    what is left of it (the batches cross epochs as training does)."""
    per_epoch, done = len(r.train), r.pos.global_step
    left = per_epoch * r.cfg.epochs - done
    if total > left:
        resumed = f", {done} of them done by the checkpoint" if done else ""
        raise UsageError(f"--warmup-iters {warmup} --profile-iter {k}: the capture would be step {total}, but an "
                         f"epoch has {per_epoch} batches and --epochs {r.cfg.epochs} makes {per_epoch * r.cfg.epochs} "
                         f"steps{resumed}; lower --warmup-iters or raise --epochs")
    g = done + total
    return StepAt((g - 1) // per_epoch + 1, (g - 1) % per_epoch + 1, per_epoch, g)


def batches_from(r: Run) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The run's training batches from its position on, epoch after epoch, as `fit` draws them."""
    epoch, start = r.pos.epoch, r.pos.step
    while True:
        r.model.train()
        if hasattr(r.model, "on_epoch_start"):  # models with an epoch-dependent part (fast: whitening bias)
            r.model.on_epoch_start(epoch)
        yield from r.train.epoch(epoch, start)
        epoch, start = epoch + 1, 0


def _warm_up(r: Run, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Take `steps` training steps; returns the batch iterator, positioned at the step to capture."""
    batches = batches_from(r)
    for _ in range(steps):
        x, y = next(batches)
        r.step(x, y)
        _after_step(r)
    return batches


def _after_step(r: Run) -> None:
    """What `fit` does after each step that changes the next one: the schedule and lookahead."""
    r.scheduler.step()
    r.pos.global_step += 1
    g = r.pos.global_step
    if r.lookahead is not None and g % r.lookahead.every == 0:
        r.lookahead.update(r.model, g / (len(r.train) * r.cfg.epochs))


# ---- the capture ----------------------------------------------------------------------------------

def profiler_activities(dev: torch.device, env: dict) -> list[ProfilerActivity]:
    """CPU, and the device's own activity where torch.profiler can trace it. Under Nsight (nsys and
    ncu inject themselves through CUDA_INJECTION64_PATH) the device is theirs: CUPTI takes one
    subscriber, so torch.profiler then traces the CPU only."""
    supported = torch.profiler.supported_activities()
    if ProfilerActivity.CPU not in supported:
        raise EnvError("torch.profiler is unavailable in this torch build (no Kineto); install an official "
                       "PyTorch wheel to profile")
    device_activity = {"cuda": ProfilerActivity.CUDA, "xpu": ProfilerActivity.XPU}.get(dev.type)
    if device_activity is None or (dev.type == "cuda" and env.get("CUDA_INJECTION64_PATH")):
        return [ProfilerActivity.CPU]
    if device_activity not in supported:
        raise EnvError(f"torch.profiler cannot trace {dev.type} kernels in this torch build (no "
                       f"{'CUPTI/roctracer' if dev.type == 'cuda' else 'XPU'} support); install a PyTorch build "
                       f"with it, or profile with --device cpu")
    return [ProfilerActivity.CPU, device_activity]


def uses_nvidia_tools(dev: torch.device) -> bool:
    """NVTX ranges and cudaProfilerStart/Stop are for Nsight (and rocprof on ROCm): CUDA devices only;
    elsewhere no CUDA API is called."""
    return dev.type == "cuda"


def nvidia_tools(dev: torch.device) -> tuple[object | None, object | None]:
    """(torch.cuda.nvtx, torch.cuda.profiler) on a CUDA device, NVTX None where this torch lacks it."""
    if not uses_nvidia_tools(dev):
        return None, None
    nvtx = torch.cuda.nvtx
    try:
        nvtx.range_push("nnperf")
        nvtx.range_pop()
    except Exception as e:  # noqa: BLE001 - a torch built without NVTX raises on the first call
        print(f"NVTX: unavailable in this torch build ({str(e).strip()[:120]}); the step's ranges are in the "
              "torch.profiler trace only")
        nvtx = None
    return nvtx, torch.cuda.profiler


def capture(r: Run, batch: tuple[torch.Tensor, torch.Tensor], activities: list, nvtx, cuda_profiler):
    """One training step under torch.profiler, NVTX ranges and cudaProfilerStart/Stop; returns the
    profiler and the modules whose forward got a range of their own."""
    modules = ModuleRanges(r.model) if not r.cfg.compile else None  # a compiled graph has no modules
    marks = StepMarks(r.step.forward, r.optimizer, nvtx)
    x, y = batch
    with torch.profiler.profile(activities=activities, record_shapes=True, profile_memory=True,
                                with_flops=True) as prof:
        devices.sync(r.dev)  # the warm-up's kernels stay out of the capture
        if cuda_profiler is not None:
            cuda_profiler.start()
        try:
            with marks, (modules or contextlib.nullcontext()):
                r.step(x, y)
            devices.sync(r.dev)
        finally:
            if cuda_profiler is not None:
                cuda_profiler.stop()
    _after_step(r)
    return prof, modules


class StepMarks:
    """Ranges `step` > `forward`, `backward`, `optimizer` around one TrainStep call, placed by hooks
    (train/step.py stays as it is): forward from the model's forward pre-hook to its forward hook,
    backward from there to the optimizer's step pre-hook, optimizer to its step hook. Each range is
    an NVTX range (when `nvtx` is given) and a torch.profiler record_function of the same name.
    Only the first forward and optimizer step count: SAM's second pass stays inside `optimizer`.
    A step the fp16 scaler or --nan-policy skip leaves without an optimizer step closes `backward`
    at the end."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, nvtx=None):
        self.model, self.optimizer, self.nvtx = model, optimizer, nvtx
        self.open: list = []  # the record_function of each range pushed and not popped, innermost last
        self.phase: str | None = None
        self.handles: list = []

    def _push(self, name: str) -> None:
        if self.nvtx is not None:
            self.nvtx.range_push(name)
        rf = record_function(name)
        rf.__enter__()
        self.open.append(rf)

    def _pop(self) -> None:
        if self.nvtx is not None:
            self.nvtx.range_pop()
        self.open.pop().__exit__(None, None, None)

    def _move(self, before: str | None, after: str | None) -> None:
        """From phase `before` to `after` (ranges popped and pushed); other transitions are ignored."""
        if self.phase != before:
            return
        if before is not None:
            self._pop()
        if after is not None:
            self._push(after)
        self.phase = after or "done"

    def __enter__(self) -> "StepMarks":
        self.handles = [
            self.model.register_forward_pre_hook(lambda *a: self._move(None, "forward")),
            self.model.register_forward_hook(lambda *a: self._move("forward", "backward")),
            self.optimizer.register_step_pre_hook(lambda *a: self._move("backward", "optimizer")),
            self.optimizer.register_step_post_hook(lambda *a: self._move("optimizer", None))]
        self._push("step")
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self.handles:
            handle.remove()
        while self.open:  # what a skipped update or an error left open, and `step`
            self._pop()
        return False


class ModuleRanges:
    """A record_function `module: NAME` around the forward of each module down to MODULE_DEPTH, so
    that the profile can be grouped by module (torch.profiler's with_modules covers TorchScript only)."""

    def __init__(self, model: nn.Module, depth: int = MODULE_DEPTH):
        self.types = {name: type(m).__name__ for name, m in model.named_modules()
                      if name and name.count(".") < depth}
        self.model = model
        self.handles: list = []

    def __enter__(self) -> "ModuleRanges":
        for name, module in self.model.named_modules():
            if name in self.types:
                stack: list = []
                self.handles.append(module.register_forward_pre_hook(_enter_range(MODULE_RANGE + name, stack)))
                self.handles.append(module.register_forward_hook(_exit_range(stack)))
        return self

    def __exit__(self, *exc) -> bool:
        for handle in self.handles:
            handle.remove()
        return False


def _enter_range(name: str, stack: list) -> Callable:
    def hook(*args):
        rf = record_function(name)
        rf.__enter__()
        stack.append(rf)
    return hook


def _exit_range(stack: list) -> Callable:
    def hook(*args):
        if stack:
            stack.pop().__exit__(None, None, None)
    return hook


# ---- what the capture measured --------------------------------------------------------------------

def traced_device(activities: list) -> bool:
    return len(activities) > 1


def sort_key(activities: list) -> str:
    """Top ops by self device time where the device was traced, else by self CPU time."""
    return "self_device_time_total" if traced_device(activities) else "self_cpu_time_total"


def op_rows(prof, activities: list) -> list[dict]:
    """The key averages, one row per op name, most expensive first (times in microseconds)."""
    key = sort_key(activities)
    rows = []
    for avg in sorted(prof.key_averages(), key=lambda a: getattr(a, key), reverse=True):
        row = {"name": avg.key, "calls": avg.count, "self_cpu_us": avg.self_cpu_time_total,
               "cpu_total_us": avg.cpu_time_total, "flops": avg.flops or None,
               "self_cpu_memory_bytes": avg.self_cpu_memory_usage}
        if traced_device(activities):
            row.update(self_device_us=avg.self_device_time_total, device_total_us=avg.device_time_total,
                       self_device_memory_bytes=avg.self_device_memory_usage)
        rows.append(row)
    return rows


def module_flops(r: Run) -> dict[str, dict[str, int]]:
    """FLOPs per module path of one step at the run's batch, forward and backward, from FlopCounterMode:
    torch.profiler counts no FLOPs for convolution_backward and, under autocast, counts a convolution
    twice (the autocast op and the one it calls); an empty dict where the model cannot be counted."""
    try:
        return flops.step_flops(r.model, (r.cfg.batch_size, *r.info.input_shape), r.info.num_classes).by_module
    except Exception:  # noqa: BLE001 - the table keeps its times without FLOPs
        return {}


def _innermost_module(event) -> str | None:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(MODULE_RANGE):
        parent = parent.cpu_parent
    return parent.name[len(MODULE_RANGE):] if parent is not None else None


def module_rows(prof, modules: ModuleRanges, activities: list, counted: dict[str, dict[str, int]]) -> list[dict]:
    """Per module (in model order, with its descendants): forward and backward CPU time, device
    time, and FLOPs (`counted`, by module path). Forward is the module's own range; backward is found through the autograd
    sequence number that each forward op shares with its backward node (the node's time goes to
    the innermost module whose forward made it, then up to its ancestors)."""
    forward = {name: {"calls": 0, "cpu": 0.0, "device": 0.0, "flops": counted.get(name, {}).get("forward", 0)}
               for name in modules.types}
    backward = {name: {"cpu": 0.0, "device": 0.0, "flops": counted.get(name, {}).get("backward", 0)}
                for name in modules.types}
    made_by: dict[int, str] = {}  # autograd sequence number -> innermost module of the op that made the node
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    for e in events:
        if e.name.startswith(MODULE_RANGE) and e.name[len(MODULE_RANGE):] in forward:
            _add(forward[e.name[len(MODULE_RANGE):]], e, calls=1)
        elif e.sequence_nr >= 0 and not e.name.startswith(BACKWARD_NODE):
            module = _innermost_module(e)
            if module is not None:
                made_by[e.sequence_nr] = module  # the last op of a number is the one that made its node
    for e in (e for e in events if e.name.startswith(BACKWARD_NODE) and e.sequence_nr in made_by):
        module = made_by[e.sequence_nr]
        for name in (n for n in backward if module == n or module.startswith(n + ".")):  # it and its ancestors
            _add(backward[name], e)
    return [_module_row(name, modules.types[name], forward[name], backward[name], traced_device(activities))
            for name in modules.types]


def _add(totals: dict, event, calls: int = 0) -> None:
    totals["cpu"] += event.cpu_time_total
    totals["device"] += event.device_time_total
    if calls:
        totals["calls"] += calls


def _module_row(name: str, kind: str, fwd: dict, bwd: dict, device: bool) -> dict:
    row = {"module": name, "type": kind, "depth": name.count("."), "calls": fwd["calls"],
           "forward_cpu_us": fwd["cpu"], "backward_cpu_us": bwd["cpu"],
           "forward_flops": fwd["flops"] or None, "backward_flops": bwd["flops"] or None}
    if device:
        row.update(forward_device_us=fwd["device"], backward_device_us=bwd["device"])
    return row


def modules_text(rows: list[dict], device: bool) -> str:
    """The per-module table as fixed-width text (milliseconds, GFLOP), children indented."""
    time_cols = ["forward_cpu_us", "backward_cpu_us"] + (["forward_device_us", "backward_device_us"] if device else [])
    heads = ["module", "type", "calls", *(c.replace("_us", "_ms") for c in time_cols), "fwd_GFLOP", "bwd_GFLOP"]
    lines = [[("  " * r["depth"]) + r["module"], r["type"], str(r["calls"]),
              *(f"{r[c] / 1e3:.3f}" for c in time_cols),
              *(f"{r[c] / 1e9:.4f}" if r[c] else "-" for c in ("forward_flops", "backward_flops"))] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(heads)]
    fmt = [lambda s, w=w: s.ljust(w) for w in widths[:2]] + [lambda s, w=w: s.rjust(w) for w in widths[2:]]
    return "\n".join("  ".join(f(s) for f, s in zip(fmt, line)) for line in [heads, *lines]) + "\n"


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    columns = list(dict.fromkeys(k for r in rows for k in r))
    writer = csv.DictWriter(out, columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# ---- RUN/profile/ ---------------------------------------------------------------------------------

def write_outputs(r: Run, prof, modules: ModuleRanges | None, activities: list, where: StepAt, warmup: int,
                  k: int, nvtx: bool) -> Path:
    """trace.json.gz, key_averages.txt/.csv, modules.txt/.csv and profile.json in RUN/profile/,
    each written atomically; returns the folder."""
    folder = r.dir / "profile"
    folder.mkdir(exist_ok=True)
    fileio.clean_stale_temps(folder, recursive=False)
    write_trace(prof, folder / "trace.json.gz")
    device = traced_device(activities)
    table = prof.key_averages().table(sort_by=sort_key(activities), row_limit=40, max_name_column_width=60)
    fileio.write_text(folder / "key_averages.txt", table + "\n")
    fileio.write_text(folder / "key_averages.csv", csv_text(op_rows(prof, activities)))
    if modules is None:
        note = "no per-module table with --compile: the compiled graph fuses the modules' operations\n"
        fileio.write_text(folder / "modules.txt", note)
        fileio.write_text(folder / "modules.csv", "module\n")
    else:
        rows = module_rows(prof, modules, activities, module_flops(r))
        fileio.write_text(folder / "modules.txt", modules_text(rows, device))
        fileio.write_text(folder / "modules.csv", csv_text(rows))
    fileio.write_json(folder / "profile.json", {
        "warmup_iters": warmup, "profile_iter": k, "captured": dataclasses.asdict(where),
        "device": str(r.dev), "device_name": devices.device_name(r.dev), "precision": r.hw.precision.name,
        "channels_last": r.hw.channels_last, "activities": [a.name for a in activities], "nvtx": nvtx,
        "torch": torch.__version__, "batch_size": r.cfg.batch_size, "model": r.cfg.model,
        "dataset": r.cfg.dataset, "compile": r.cfg.compile})
    return folder


def write_trace(prof, path: Path) -> None:
    """The Chrome/Perfetto trace, gzipped: exported to a temporary file beside it (named so that
    fileio.clean_stale_temps removes it if we are killed), compressed atomically into place."""
    fd, raw = tempfile.mkstemp(prefix=f".{path.stem}.{os.getpid()}.", suffix=fileio.TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        prof.export_chrome_trace(raw)

        def compress(tmp: Path) -> None:
            with open(raw, "rb") as src, gzip.open(tmp, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
        fileio.write_with(path, compress)
    finally:
        os.unlink(raw)


# ---- what is printed ------------------------------------------------------------------------------

def command_line(ns: argparse.Namespace, given: dict, cfg: configs.TrainConfig,
                 argv: list[str] | None = None, nproc: int = 1) -> str:
    """The user's command, shlex-quoted, to rerun under Nsight; with --name pinned, so that the rerun
    profiles the same run directory (its profile/ is where the reports go), and with --nproc when
    several processes ran it (each of them sees the command without it)."""
    if argv is None:  # the flags as given to cli.main (in-process too), else this process's own
        argv = [sys.argv[0], *ns.argv] if getattr(ns, "argv", None) is not None else sys.argv
    if "profile" in argv[1:]:
        # `python -m nnperf` runs __main__.py; the console script, tests and notebooks read as `nnperf`.
        ran_as_module = Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "nnperf"
        program = [sys.executable, "-m", "nnperf"] if ran_as_module else ["nnperf"]
        words = program + argv[1:]
    else:  # called in-process (tests, notebooks): rebuilt from the parsed flags
        words = ["nnperf", "profile", *(["--config", ns.config] if ns.config else []), *_flags(given),
                 "--warmup-iters", str(ns.warmup_iters), "--profile-iter", str(ns.profile_iter)]
    if "name" not in given and not given.get("resume"):
        words += ["--name", cfg.name]
    if nproc > 1 and not any(w == "--nproc" or w.startswith("--nproc=") for w in words):
        words += ["--nproc", str(nproc)]
    return shlex.join(words)


def _flags(given: dict) -> list[str]:
    by_name = {f.name: f for f in configs.fields()}
    words: list[str] = []
    for name, value in given.items():
        flag = configs.flag_name(name)
        if by_name[name].metadata["kind"] is bool:
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return words


def nsight_commands(folder: Path, command: str) -> tuple[str, str]:
    """Nsight Systems (the captured step's cudaProfilerStart/Stop range) and Nsight Compute (every
    kernel inside the NVTX range `step`) command lines around `command`."""
    out = shlex.quote(str(folder))
    nsys = f"nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -o {out}/nsys {command}"
    ncu = f"ncu --nvtx --nvtx-include \"step/\" --set full -o {out}/ncu {command}"
    return nsys, ncu


def _report(r: Run, prof, activities: list, folder: Path, command: str) -> None:
    if r.dev.type == "cuda" and not traced_device(activities):
        print("under Nsight (CUDA_INJECTION64_PATH is set): torch.profiler traced the CPU side only, the GPU is "
              "Nsight's")
    if not uses_nvidia_tools(r.dev):
        print(f"NVTX and cudaProfilerStart/Stop: not used on {r.dev.type} (Nsight profiles CUDA devices); the "
              "ranges step/forward/backward/optimizer are in the torch.profiler trace")
    print(f"wrote {folder}/: trace.json.gz (chrome://tracing or https://ui.perfetto.dev), key_averages.txt/.csv, "
          "modules.txt/.csv, profile.json")
    print(top_ops_text(op_rows(prof, activities), activities))
    nsys, ncu = nsight_commands(folder, command)
    print(f"Nsight Systems, this step only:\n  {nsys}\nNsight Compute, every kernel of this step:\n  {ncu}")


def top_ops_text(rows: list[dict], activities: list, n: int = TOP_OPS) -> str:
    """The first `n` op rows (sorted by op_rows) with their share of the step's self time; our own
    ranges (step, forward, ..., module: NAME) are no ops and left out."""
    key = "self_device_us" if traced_device(activities) else "self_cpu_us"
    total = sum(r[key] for r in rows) or 1.0
    lines = [f"top ops by self {'device' if traced_device(activities) else 'CPU'} time:"]
    ops = [r for r in rows if r["name"] not in STEP_RANGES and not r["name"].startswith(MODULE_RANGE)]
    for r in ops[:n]:
        lines.append(f"  {r['name'][:60]:<60} {r[key] / 1e3:9.3f} ms {100 * r[key] / total:5.1f}%  {r['calls']} calls")
    return "\n".join(lines)
