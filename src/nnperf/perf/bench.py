"""`nnperf bench`: the forward pass and the whole training step of each model timed in each graph
mode (eager, compile, trace, script, export), with each mode's one-time setup cost, its speed-up
against eager and how far its outputs are from eager's (so a wrong compile shows).

The batches have the dataset's shape (channels, size, classes) and hold random uint8 values
normalised as training normalises images; no dataset is read. The step is nnperf's own TrainStep
with the optimizer and config `nnperf train` builds, so the eager step is what the training loop runs.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import config as configs
from .. import device as devices
from .. import envinfo, models, names
from ..analysis import outputs
from . import policy
from ..errors import UsageError
from ..train.optim import make_optimizer
from ..train.step import OUT_OF_MEMORY, TrainStep
from ..train import jit

WHATS = ("forward", "step")
# (channels, height, width, classes) of the built-in datasets; synthetic is nnperf's default
# synthetic set (--synthetic-* settings of train change it, bench uses the defaults).
DATASET_SHAPES = {"cifar10": (3, 32, 32, 10), "cifar100": (3, 32, 32, 100), "mnist": (1, 28, 28, 10),
                  "fashion-mnist": (1, 28, 28, 10), "synthetic": (3, 32, 32, 10)}
MAX_MIN_TIME_S = 600.0  # per measurement; beyond it a bench of all modes runs for hours
MAX_BATCH = 1 << 20
MIN_RUNS = 5  # timed calls at least, whatever --min-time, so that the IQR means something
WARMUP_SHARE = 0.25  # of --min-time, spent on untimed calls before each measurement at least
WARMUP_CAP = 2.0  # x --min-time: warm-up stops here even if the calls have not settled
SETTLED = 1.15  # the last three warm-up calls within 15% of each other: the kernels are built
IQR_TARGET = 0.05  # timing stops once IQR/median is under it...
MAX_TIME_FACTOR = 5.0  # ...or after this many times --min-time
# uint8 values uniform on 0..255, scaled to [0, 1]: mean 0.5, standard deviation about 0.289.
UNIFORM_MEAN, UNIFORM_STD = 0.5, 0.2887
CSV_NAME, JSON_NAME = "bench.csv", "bench.json"
TOOL = "nnperf bench"
COLUMNS = ("model", "conv_impl", "what", "mode", "label", "status", "why", "batch_size", "median_s", "iqr_s",
           "iqr_pct", "images_per_s", "setup_s", "speedup", "max_abs_diff", "diff_output", "diff_update",
           "check", "runs")


@dataclass(frozen=True)
class Plan:
    """What `nnperf bench` was asked to measure, checked."""

    models: list[str]
    dataset: str
    shape: tuple[int, int, int]  # channels, height, width
    classes: int
    batch_size: int
    modes: list[str]
    whats: list[str]
    conv_impls: list[str]
    min_time_s: float
    dev: torch.device
    precision: devices.Precision
    channels_last: bool
    layout_reason: str
    width: int | None = None


@dataclass
class Row:
    """One (model, conv_impl, what, mode) measurement; absent figures stay None."""

    model: str
    conv_impl: str
    what: str
    mode: str
    label: str
    batch_size: int
    status: str = "ok"  # or "unavailable"
    why: str = ""
    median_s: float | None = None
    iqr_s: float | None = None
    iqr_pct: float | None = None
    images_per_s: float | None = None
    setup_s: float | None = None
    speedup: float | None = None
    max_abs_diff: float | None = None
    diff_output: float | None = None  # logits (forward) or loss (step) against eager's
    diff_update: float | None = None  # the step's parameter update against eager's
    check: str = ""  # "ok", "MISMATCH", or "" where not compared
    runs: int | None = None


# ---- input --------------------------------------------------------------------------------------

def split_list(text: str, flag: str, allowed: tuple[str, ...] | list[str]) -> list[str]:
    """Comma-separated choices, in order, without repeats; one UsageError line for an unknown one."""
    items = [t.strip().lower() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise UsageError(f"{flag}: give at least one of {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            raise UsageError(f"{flag}: unknown value '{item}' (choose from {', '.join(allowed)})")
    return list(dict.fromkeys(items))


def model_list(text: str) -> list[str]:
    """--model M[,M2...]: nnperf's models, tv:NAME and timm:NAME (checked, with close names, when built)."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()]
    choices = f"{', '.join(models.names())}, or tv:NAME / timm:NAME"
    if not names:
        raise UsageError(f"--model: give at least one of {choices}")
    for name in names:
        if not models.known(name):
            raise UsageError(f"--model: unknown value '{name}' (choose from {choices})")
        if models.library.is_library(name):
            models.library.check(name, pretrained=False)  # before anything is printed
    return list(dict.fromkeys(names))


def batch_shape(dataset: str, image_size: int | None = None) -> tuple[int, int, int, int]:
    """(channels, height, width, classes) of the dataset's batches, without reading the dataset."""
    if dataset not in DATASET_SHAPES:
        raise UsageError(f"--dataset: bench knows the shapes of {', '.join(DATASET_SHAPES)}, not '{dataset}'")
    c, h, w, k = DATASET_SHAPES[dataset]
    return (c, image_size, image_size, k) if image_size else (c, h, w, k)


def _check_numbers(ns) -> None:
    if ns.batch_size < 1 or ns.batch_size > MAX_BATCH:
        raise UsageError(f"--batch-size {ns.batch_size}: must be between 1 and {MAX_BATCH}")
    if not (0 < ns.min_time <= MAX_MIN_TIME_S):  # also refuses NaN
        raise UsageError(f"--min-time {ns.min_time}: must be above 0 and at most {MAX_MIN_TIME_S:g} seconds")


def plan_of(ns) -> Plan:
    """The checked plan of the parsed flags; every bad value is one UsageError line."""
    wanted = model_list(ns.model)
    modes = list(dict.fromkeys(jit.canonical(m, "--modes") for m in split_list(ns.modes, "--modes",
                                                                                 (*jit.JIT_MODES, *jit.ALIASES))))
    whats = split_list(ns.what, "--what", WHATS)
    impls = split_list(ns.conv_impl, "--conv-impl", configs.CONV_IMPLS)
    _check_numbers(ns)
    c, h, w, k = batch_shape(ns.dataset, getattr(ns, "image_size", None))
    dev = devices.resolve(ns.device)
    precision = devices.choose_precision(dev, ns.precision, None)
    channels_last, reason = devices.choose_channels_last(dev, precision, ns.channels_last)
    return Plan(wanted, ns.dataset, (c, h, w), k, ns.batch_size, modes, whats, impls, ns.min_time, dev, precision,
                channels_last, reason, getattr(ns, "width", None))


def impls_for(model: str, impls: list[str]) -> list[str]:
    """The convolutions to compare for `model`: only convnet3 takes conv_impl."""
    return impls if model == "convnet3" else ["torch"]


# ---- one model ----------------------------------------------------------------------------------

@dataclass
class Case:
    """One model (and convolution) with nnperf's optimizer, its batch, and the state every mode
    starts from, so that each mode's step is compared with eager's from the same weights."""

    name: str
    conv_impl: str
    plan: Plan
    model: nn.Module
    optimizer: torch.optim.Optimizer
    cfg: configs.TrainConfig
    x: torch.Tensor
    y: torch.Tensor
    weights: dict = field(default_factory=dict)
    optimizer_state: dict = field(default_factory=dict)

    def restore(self) -> None:
        """Back to the starting weights, BatchNorm statistics and optimizer state, in place (the
        graphs share these tensors)."""
        self.model.load_state_dict(self.weights)
        self.optimizer.load_state_dict(copy.deepcopy(self.optimizer_state))

    def train_step(self, forward: nn.Module) -> TrainStep:
        p = self.plan
        scaler = torch.amp.GradScaler(p.dev.type) if p.precision.needs_scaler else None
        return TrainStep(self.model, self.optimizer, scaler, p.dev, p.precision, self.cfg.label_smoothing, forward)


def make_batch(plan: Plan, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random uint8-like images normalised like training's, and random labels, on the device."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = plan.shape
    images = torch.randint(0, 256, (plan.batch_size, c, h, w), generator=gen).float().div_(255)
    x = ((images - UNIFORM_MEAN) / UNIFORM_STD).to(plan.dev)
    if plan.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, plan.classes, (plan.batch_size,), generator=gen).to(plan.dev)
    return x, y


def train_config(plan: Plan, name: str, conv_impl: str) -> configs.TrainConfig:
    """The config `nnperf train` would build for this model and batch (its optimizer settings)."""
    given = {"model": name, "conv_impl": conv_impl, "batch_size": plan.batch_size, "width": plan.width,
             "precision": plan.precision.name, "channels_last": plan.channels_last, "device": str(plan.dev)}
    return configs.build(None, {k: v for k, v in given.items() if v is not None})


def make_case(plan: Plan, name: str, conv_impl: str) -> Case:
    cfg = train_config(plan, name, conv_impl)
    c, h, _ = plan.shape
    torch.manual_seed(cfg.seed)
    model = models.build(name, c, plan.classes, h, plan.width, conv_impl).to(plan.dev)
    if plan.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x, y = make_batch(plan)
    if hasattr(model, "init_from_data"):  # the fast model's whitening, as training sets it up
        model.init_from_data(x)
    case = Case(name, conv_impl, plan, model, make_optimizer(cfg, model), cfg, x, y)
    case.weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    case.optimizer_state = copy.deepcopy(case.optimizer.state_dict())
    return case


# ---- one mode -----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one call gave, on the host, to compare with eager's."""

    output: torch.Tensor  # the logits (forward) or the loss (step), as float32
    weights: torch.Tensor | None = None  # every parameter after the step, flattened


def call_of(case: Case, what: str, forward: nn.Module) -> Callable[[], object]:
    """One forward pass (inference: no autograd) or one training step through `forward`."""
    p = case.plan
    if what == "forward":
        def infer():
            with torch.no_grad(), devices.autocast(p.dev, p.precision):
                return forward(case.x)
        return infer
    step = case.train_step(forward)
    return lambda: step(case.x, case.y)


def outcome(case: Case, what: str, call: Callable[[], object]) -> Outcome:
    """One call from the starting state, with a fixed seed so that dropout draws the same masks."""
    case.restore()
    torch.manual_seed(0)
    result = call()
    devices.sync(case.plan.dev)
    if what == "forward":
        return Outcome(result.detach().float().cpu())
    weights = torch.cat([q.detach().float().flatten() for q in case.model.parameters()]).cpu()
    return Outcome(result.loss.detach().float().cpu().reshape(1), weights)


@contextlib.contextmanager
def _random_as_eager(mode: str):
    """Inductor draws dropout masks with its own generator, so a compiled step could never equal
    eager's; fallback_random makes it draw them as eager does (it changes only random ops)."""
    if mode != "compile":
        yield
        return
    import torch._inductor.config as inductor_config

    try:
        with inductor_config.patch(fallback_random=True):
            yield
    finally:
        torch._dynamo.reset()  # each model's graphs go with it, so recompile limits are never reached


def warm_up(call: Callable[[], object], dev: torch.device, min_time_s: float, calls: int = 3) -> None:
    """Calls before timing, until the last three take about the same time: the first ones after a
    new graph or shape build kernels (oneDNN, cuDNN autotuning, TorchScript's profiling runs), fill
    the optimizer's state and, first in a process, wake the thread pool; they are slower, and the
    first measurement of a process once read 5x the second with a 58% spread."""
    start = time.perf_counter()
    times: list[float] = []
    while time.perf_counter() - start < WARMUP_CAP * min_time_s or len(times) < calls:
        t = time.perf_counter()
        call()
        devices.sync(dev)
        times.append(time.perf_counter() - t)
        spent = time.perf_counter() - start
        last = times[-3:]
        if len(times) >= calls and spent >= WARMUP_SHARE * min_time_s and max(last) <= SETTLED * min(last):
            return


def measure(call: Callable[[], object], dev: torch.device, min_time_s: float):
    """torch.utils.benchmark's adaptive_autorange on all the threads training uses: blocks of calls
    until the IQR is under 5% of the median (or 5x --min-time has passed), each call followed by a
    device sync so that the time is the work's, not its queueing."""
    def timed():
        call()
        devices.sync(dev)
    # Imported here: torch.utils.benchmark pulls in cpp_extension, which logs a warning on machines
    # without a CUDA toolkit at import time.
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="timed()", globals={"timed": timed}, num_threads=torch.get_num_threads())
    runs = [timer.adaptive_autorange(threshold=IQR_TARGET, min_run_time=min_time_s,
                                     max_run_time=MAX_TIME_FACTOR * min_time_s)]
    # A call slower than the time allowed gives too few times for a spread: a few more, one call each.
    while sum(len(m.times) for m in runs) < MIN_RUNS:
        runs.append(timer.timeit(number=1))
    return benchmark.Measurement.merge(runs)[0] if len(runs) > 1 else runs[0]


def _prepare(case: Case, what: str, mode: str, log: Callable[[str], None]) -> tuple[Callable[[], object], float]:
    """The mode's forward and its first call (where compile compiles); the seconds both took."""
    case.restore()
    case.model.train(what == "step")  # the mode trace and export record (see jit's docstring)
    said: list[str] = []
    devices.sync(case.plan.dev)
    start = time.perf_counter()
    forward = jit.make_forward(case.model, mode, case.x, lambda m: (said.append(m), log(m)))
    call = call_of(case, what, forward)
    call()
    devices.sync(case.plan.dev)
    seconds = time.perf_counter() - start
    if getattr(forward, "failed", False):  # compile fell back to eager: its figures would be eager's
        raise jit.ModeUnavailable(mode, said[-1] if said else "torch.compile failed; it ran eager")
    return call, seconds


def tolerance(precision: devices.Precision, reference: torch.Tensor) -> float:
    """The largest difference from eager that is rounding: reduced precision rounds each layer to
    8 (bf16) or 11 (fp16) bits; a wrong graph is off by the values' own size."""
    scale = max(1.0, float(reference.abs().max())) if reference.numel() else 1.0
    return (1e-3 if precision.name == "fp32" else 0.1) * scale


def compare(row: Row, got: Outcome, ref: Outcome, precision: devices.Precision) -> None:
    """Fill the row's differences from eager and whether they are within rounding."""
    row.diff_output = float((got.output - ref.output).abs().max())
    ok = row.diff_output <= tolerance(precision, ref.output)
    if got.weights is not None and ref.weights is not None:
        row.diff_update = float((got.weights - ref.weights).abs().max())
        ok = ok and row.diff_update <= tolerance(precision, ref.weights)
    row.max_abs_diff = max(d for d in (row.diff_output, row.diff_update) if d is not None)
    row.check = "ok" if ok else "MISMATCH"


def _fill_timing(row: Row, m) -> None:
    row.median_s, row.iqr_s, row.runs = m.median, m.iqr, len(m.times)
    row.iqr_pct = 100 * m.iqr / m.median if m.median > 0 else None
    row.images_per_s = row.batch_size / m.median if m.median > 0 else None


def bench_mode(case: Case, what: str, mode: str, ref: Outcome, log: Callable[[str], None]) -> Row:
    """Set up, check against eager, and time one mode; a mode that cannot run gives a row saying
    why (eager failing is no mode's fault: it is raised)."""
    p = case.plan
    row = Row(case.name, case.conv_impl, what, mode, jit.label(mode), p.batch_size)
    try:
        with _random_as_eager(mode):
            call, row.setup_s = _prepare(case, what, mode, log)
            compare(row, outcome(case, what, call), ref, p.precision)
            case.restore()
            warm_up(call, p.dev, p.min_time_s)
            _fill_timing(row, measure(call, p.dev, p.min_time_s))
    except OUT_OF_MEMORY:
        raise
    except Exception as e:  # noqa: BLE001 - one mode failing leaves the others to run
        if mode == "eager":
            raise
        why = e.why if isinstance(e, jit.ModeUnavailable) else jit.first_line(e)
        row = Row(case.name, case.conv_impl, what, mode, jit.label(mode), p.batch_size, "unavailable", why)
    finally:
        case.restore()
    return row


def bench_case(case: Case, log: Callable[[str], None]) -> list[Row]:
    """Every asked (what, mode) of one model; speed-ups against eager where eager was timed."""
    rows = []
    for what in case.plan.whats:
        case.model.train(what == "step")
        ref = outcome(case, what, call_of(case, what, case.model))
        done = []
        for mode in case.plan.modes:
            log(f"{case.name} ({case.conv_impl} conv): {what}, {jit.label(mode)}")
            done.append(bench_mode(case, what, mode, ref, log))
        eager = next((r for r in done if r.mode == "eager" and r.median_s), None)
        for r in done:
            if eager is not None and r.median_s:
                r.speedup = eager.median_s / r.median_s
        rows += done
    return rows


def bench_all(plan: Plan, log: Callable[[str], None]) -> list[Row]:
    rows = []
    for name in plan.models:
        for impl in impls_for(name, plan.conv_impls):
            rows += bench_case(make_case(plan, name, impl), log)
    return rows


# ---- output -------------------------------------------------------------------------------------

def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[Row]) -> str:
    """The terminal table: times in milliseconds; a mode that could not run says why."""
    head = (f"{'model':12s} {'conv':8s} {'what':7s} {'mode':18s} {'median ms':>10s} {'IQR %':>6s} "
            f"{'images/s':>10s} {'setup s':>8s} {'speed-up':>8s} {'max|diff|':>9s}  check")
    lines = [head, "-" * len(head)]
    for r in rows:
        start = f"{r.model:12s} {r.conv_impl:8s} {r.what:7s} {r.label:18s} "
        if r.status != "ok":
            lines.append(f"{start}unavailable: {r.why}")
            continue
        ms = None if r.median_s is None else 1000 * r.median_s
        lines.append(f"{start}{_cell(ms, '10.3f')} {_cell(r.iqr_pct, '6.1f')} {_cell(r.images_per_s, '10.0f')} "
                     f"{_cell(r.setup_s, '8.2f')} {_cell(r.speedup, '7.2f')}x {_cell(r.max_abs_diff, '9.1e')}  "
                     f"{r.check}")
    return "\n".join(lines)


def env_facts(plan: Plan) -> dict:
    """Where the figures were measured: device and CPU names, versions, threads, precision, layout."""
    facts = envinfo.collect(plan.dev, plan.precision, plan.channels_last)
    facts["layout_reason"] = plan.layout_reason
    return facts


def _plan_facts(plan: Plan) -> dict:
    return {"models": plan.models, "dataset": plan.dataset, "shape": list(plan.shape), "classes": plan.classes,
            "batch_size": plan.batch_size, "modes": plan.modes, "what": plan.whats, "conv_impls": plan.conv_impls,
            "min_time_s": plan.min_time_s, "width": plan.width,
            "compile_random": "inductor fallback_random (dropout masks drawn as eager draws them)"}


def _written_by_bench(path: Path) -> bool:
    """Whether an existing output file is one nnperf bench wrote (which it may replace)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    if path.suffix == ".csv":
        return text.splitlines()[:1] == [",".join(COLUMNS)]
    try:
        return json.loads(text).get("tool") == TOOL
    except (ValueError, AttributeError):
        return False


def _refuse_foreign(flag: str, shown: Path, path: Path) -> None:
    if (path.exists() or path.is_symlink()) and not path.is_dir() and not _written_by_bench(path):
        raise UsageError(f"{flag} {shown}: {path} exists and was not written by nnperf bench; move it away or "
                         f"choose another {flag}")


def output_paths(ns, plan: Plan) -> tuple[Path, Path | None]:
    """The --out folder and --json file, checked before anything runs: files nnperf bench did not
    write are never replaced."""
    default = Path("bench") / "_".join(names.safe_component(m) for m in plan.models)
    out = outputs.folder_target("--out", ns.out or default)
    planned = [out / CSV_NAME, out / JSON_NAME]
    outputs.refuse_writing_over("--out", out, planned, [])
    for path in planned:
        _refuse_foreign("--out", out, path)
    json_path = outputs.file_target("--json", ns.json, example=JSON_NAME) if ns.json else None
    if json_path is not None:
        _refuse_foreign("--json", json_path, json_path)
    return out, json_path


def write_outputs(rows: list[Row], report: dict, out: Path, json_path: Path | None) -> list[Path]:
    """bench.csv and bench.json in `out`, and the JSON again at --json; each written atomically."""
    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)

    outputs.write_with(out / CSV_NAME, write_csv)
    written = [out / CSV_NAME]
    for path in [out / JSON_NAME] + ([json_path] if json_path is not None else []):
        outputs.write_with(path, lambda tmp: tmp.write_text(json.dumps(report, indent=2, default=str) + "\n",
                                                            encoding="utf-8"))
        written.append(path)
    return written


def _describe(plan: Plan) -> str:
    c, h, w = plan.shape
    layout = "channels_last" if plan.channels_last else "NCHW"
    return (f"{devices.device_name(plan.dev)} ({plan.dev}), {torch.get_num_threads()} threads; "
            f"{plan.precision.name} ({plan.precision.reason}); {layout} ({plan.layout_reason}); "
            f"batches of {plan.batch_size} x {c}x{h}x{w}, {plan.classes} classes ({plan.dataset} shape)")


def run(ns) -> int:
    """`nnperf bench`: the table on the terminal, CSV + JSON in --out (and --json)."""
    import sys

    if getattr(ns, "policy", False):
        return run_policy(ns)
    plan = plan_of(ns)
    out, json_path = output_paths(ns, plan)
    notes: list[str] = []

    def log(message: str) -> None:
        notes.append(message)
        print(message, file=sys.stderr, flush=True)

    for name in plan.models:
        if name != "convnet3" and "handmade" in plan.conv_impls:
            log(f"--conv-impl handmade: {name} has no handmade convolution (only convnet3); nn.Conv2d only")
    print(_describe(plan), flush=True)
    start = time.perf_counter()
    rows = bench_all(plan, log)
    wall_s = time.perf_counter() - start
    print(format_table(rows))
    for r in rows:
        if r.check == "MISMATCH":
            print(f"{r.model} {r.what} {r.label}: outputs differ from eager by {r.max_abs_diff:.3g}, beyond "
                  "rounding; its timing is of a wrong computation")
    report = {"tool": TOOL, "env": env_facts(plan), "plan": _plan_facts(plan), "rows": [asdict(r) for r in rows],
              "notes": notes, "wall_s": wall_s}
    written = write_outputs(rows, report, out, json_path)
    print(f"\n{len(rows)} measurements in {wall_s:.0f} s; wrote {', '.join(str(p) for p in written)}")
    return 0


def run_policy(ns) -> int:
    """`nnperf bench --policy`: the table `nnperf train`'s measured policy chooses from, per model,
    measured now (the cache that training reads is updated)."""
    wanted = model_list(ns.model)
    _check_numbers(ns)
    c, h, w, k = batch_shape(ns.dataset, getattr(ns, "image_size", None))
    dev = devices.resolve(ns.device)
    rules = devices.choose_precision(dev, None, None)
    cands = policy.candidates(dev, rules, ns.precision, ns.channels_last)
    width, impl = getattr(ns, "width", None), split_list(ns.conv_impl, "--conv-impl", configs.CONV_IMPLS)[0]
    for name in wanted:
        torch.manual_seed(0)
        model = models.build(name, c, k, h, width, impl).to(dev)
        if hasattr(model, "init_from_data"):
            model.init_from_data(torch.randn(min(ns.batch_size, 512), c, h, w, device=dev))
        ident = policy.model_id(name, width, impl, k)
        choice = policy.measure_and_remember(model, ident, (c, h, w), k, ns.batch_size, dev, cands,
                                             policy.Candidate(rules.name, False))
        print(f"\n{name} on {devices.device_name(dev)}, batch {policy.probe_batch(dev, ns.batch_size)} "
              f"(measured in {choice.probe_s:.1f} s; what nnperf train --batch-size {ns.batch_size} chooses):")
        print(policy.table(choice.timings, choice.candidate))
    return 0
