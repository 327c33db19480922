"""`nnperf roofline RUN_DIR` (or `--model M --batch-size B`): the training step on this device's roof.

FLOPs of one step come from FlopCounterMode (forward and backward, matrix products and
convolutions); bytes from perf/flops.bytes_per_step (weights read in forward and backward, gradients
written and read, optimizer state read and written, activations and their gradients: an estimate of
the traffic, not a counter reading); the step's time from the run's measured images/s (the median
over its training epochs) or, without a run, from timing nnperf's eager training step here. The roof
is `nnperf peak`'s measured FLOP/s for the run's precision and its measured bandwidth (cached per
device; measured now if absent), unless --peak-compute/--peak-bw give it. Kernels of an Nsight
Compute export (--ncu) can be drawn on the same chart.

With RUN_DIR, a run that `nnperf profile --resume` profiled also gets one point per direct child of
the model: its forward and backward time in RUN/profile/modules.csv (device time where the profile
traced the device, else CPU time; under torch.profiler, so slower than unprofiled), its FLOPs from
FlopCounterMode and its bytes from perf/flops.module_bytes_per_step, as for the step.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .. import device as devices
from .. import models
from ..analysis import outputs, roofline, runinfo
from ..analysis.logs import Source
from ..errors import UsageError
from . import flops, peak


@dataclass
class Step:
    """What a training step is: the model and its input, and how fast it ran."""

    model: str
    width: int | None
    conv_impl: str
    shape: tuple[int, int, int]
    classes: int
    batch: int
    optimizer: str
    precision: str
    images_per_s: float
    where: str  # where images/s came from

    @property
    def activation_bytes(self) -> int:
        """Bytes per activation element: autocast keeps the convolutions' outputs in 16 bits."""
        return 2 if self.precision in ("bf16", "fp16") else 4

    def build(self):
        return models.build(self.model, self.shape[0], self.classes, min(self.shape[1:]), self.width, self.conv_impl)

    def kernel(self) -> roofline.Kernel:
        model = self.build()
        count = flops.step_flops(model, (self.batch, *self.shape), self.classes)
        traffic = flops.bytes_per_step(model, self.optimizer, self.batch, image_shape=self.shape,
                                       activation_element_bytes=self.activation_bytes)
        name = f"{self.model} training step, batch {self.batch}, {self.precision}"
        return roofline.Kernel("step", name, count.forward + count.backward, traffic.total_bytes,
                               self.batch / self.images_per_s)


def from_run(run_dir: Path) -> Step:
    """The step a run trained, from its config.yaml, env.json and metrics.jsonl."""
    src = Source(label=run_dir.name, run_dir=run_dir, metrics=run_dir / "metrics.jsonl", telemetry=[])
    cfg, env = runinfo.config(src), runinfo.env(src)
    data = env.get("data") if isinstance(env.get("data"), dict) else {}
    if not cfg.get("model") or not data.get("shape") or not data.get("classes"):
        raise UsageError(f"RUN_DIR {run_dir}: not an nnperf run directory with config.yaml and env.json")
    rates = _train_rates(run_dir / "metrics.jsonl")
    if not rates:
        raise UsageError(f"RUN_DIR {run_dir}: metrics.jsonl has no training epoch with images/s; train it first "
                         "(or give --model and --batch-size to time a step here)")
    return Step(str(cfg["model"]), cfg.get("width"), str(cfg.get("conv_impl") or "torch"),
                tuple(int(v) for v in data["shape"]), len(data["classes"]), int(cfg.get("batch_size") or 128),
                str(cfg.get("optimizer") or "sgd"), str(env.get("precision") or "fp32"), statistics.median(rates),
                f"median of {len(rates)} training epochs in {run_dir / 'metrics.jsonl'}")


def _train_rates(path: Path) -> list[float]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    rates = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a torn last line
        value = row.get("images_per_s") if isinstance(row, dict) and row.get("phase") == "train" else None
        if isinstance(value, (int, float)) and value > 0:
            rates.append(float(value))
    return rates


PROFILE_TIMES = ("forward_device_us", "backward_device_us", "forward_cpu_us", "backward_cpu_us")


def module_kernels(run_dir: Path, step: Step) -> tuple[list[roofline.Kernel], str | None]:
    """(one point per module of the model's first level with at least MIN_POINTS modules, else its
    second (small_cifar is `features` and `head`: its convolutions are one level down), timed by
    `nnperf profile` in RUN/profile/modules.csv; the line to print about them, or why there are none)."""
    path, last = run_dir / "profile" / "modules.csv", run_dir / "checkpoints" / "last.pt"
    if not path.is_file():
        return [], f"run `nnperf profile --resume {last}` for per-module points" if last.is_file() else None
    try:
        times = _one_level(profiled_seconds(path))
    except (OSError, ValueError, csv.Error) as e:
        return [], f"{path}: skipped ({' '.join(str(e).split())}); only the whole step is placed"
    batch = _profiled_batch(run_dir / "profile" / "profile.json", step.batch)
    model = step.build()
    # FLOPs from FlopCounterMode, as for the step's point: torch.profiler's counts leave out the
    # convolutions' backward and count a convolution twice under autocast.
    counted = flops.step_flops(model, (batch, *step.shape), step.classes).by_module
    traffic = flops.module_bytes_per_step(model, step.optimizer, batch, step.shape, step.activation_bytes,
                                          names=list(times))
    kernels = []
    for name, (kind, seconds) in times.items():
        count = sum(counted.get(name, {}).values())
        if name in traffic and count > 0 and 0 < seconds < math.inf:  # a module of another model: not placed
            kernels.append(roofline.Kernel(f"module:{name}", f"{name} ({kind})", count, traffic[name], seconds))
    return kernels, (f"{len(kernels)} module points from {path} (times of the profiled step, batch {batch}, "
                     "under torch.profiler: slower than an unprofiled step)")


MIN_POINTS = 3


def _one_level(times: dict[str, tuple[str, float, int]]) -> dict[str, tuple[str, float]]:
    """The modules of the first depth that has MIN_POINTS of them (else the deepest there is)."""
    depths = sorted({d for _, _, d in times.values()})
    level = next((d for d in depths if sum(1 for *_, e in times.values() if e == d) >= MIN_POINTS),
                 depths[-1] if depths else 0)
    return {name: (kind, seconds) for name, (kind, seconds, d) in times.items() if d == level}


def profiled_seconds(path: Path) -> dict[str, tuple[str, float, int]]:
    """{module: (type, seconds of its forward and backward, depth)} for the modules in `nnperf
    profile`'s modules.csv: device time where the profile traced the device, else CPU time."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("no per-module rows (a --compile profile has none)")
    missing = [c for c in ("module", "type", "depth", "forward_cpu_us", "backward_cpu_us") if c not in rows[0]]
    if missing:
        raise ValueError(f"no column {', '.join(missing)}")
    out = {}
    for n, r in enumerate(rows, start=1):
        if None in r.values():
            raise ValueError(f"row {n} has fewer columns than the header")
        if not r["module"]:
            continue  # the whole model
        us = [float(r[c]) if r.get(c) not in (None, "") else 0.0 for c in PROFILE_TIMES]
        device, cpu = us[0] + us[1], us[2] + us[3]
        out[r["module"]] = (r["type"], (device if device > 0 else cpu) / 1e6, int(r["depth"]))
    return out


def _profiled_batch(path: Path, default: int) -> int:
    """The batch the profile captured (profile.json), which --resume may have changed."""
    try:
        batch = json.loads(path.read_text(encoding="utf-8")).get("batch_size")
    except (OSError, ValueError, AttributeError):
        return default
    return batch if isinstance(batch, int) and batch > 0 else default


def timed_here(model: str, dataset: str, batch: int, precision: str | None, device: str) -> Step:
    """The step of `model` at `batch`, timed here with nnperf bench's eager training step."""
    from . import bench

    ns = SimpleNamespace(model=model, modes="eager", what="step", conv_impl="torch", dataset=dataset,
                         batch_size=batch, min_time=1.0, precision=precision, channels_last=None, device=device,
                         width=None, image_size=None, policy=False)
    plan = bench.plan_of(ns)
    case = bench.make_case(plan, model, "torch")
    row = bench.bench_mode(case, "step", "eager", bench.outcome(case, "step", bench.call_of(case, "step", case.model)),
                           print)
    if not row.images_per_s:
        raise UsageError(f"--model {model}: its training step could not be timed here ({row.status})")
    return Step(model, None, "torch", plan.shape, plan.classes, batch, case.cfg.optimizer, plan.precision.name,
                row.images_per_s, f"timed here: nnperf bench's eager step, median of {row.runs} runs")


def roof(dev: torch.device, precision: str, peak_compute: float | None, peak_bw: float | None) -> tuple[float, float, str]:
    """(peak FLOP/s, peak bytes/s, where they came from): the flags, else `nnperf peak`'s figures."""
    if peak_compute and peak_bw:
        return peak_compute * 1e12, peak_bw * 1e9, "--peak-compute and --peak-bw"
    figures = peak.cached_or_measure(dev, [precision])
    rate = peak.peak_flops(dev, precision)
    bw = figures["bandwidth"]
    bandwidth = max(v for v in (bw.get("copy_bytes_per_s"), bw.get("triad_bytes_per_s")) if v)
    if not rate:
        raise UsageError(f"{precision}: this device has no measured peak for it (nnperf peak says why); give "
                         "--peak-compute and --peak-bw")
    return (peak_compute * 1e12 if peak_compute else rate, peak_bw * 1e9 if peak_bw else bandwidth,
            f"nnperf peak on {figures['device']} ({figures['cache_file']})")


def run(ns) -> int:
    """`nnperf roofline RUN_DIR | --model M`: the step's point, its table, and the chart."""
    run_dir = Path(ns.source) if ns.source else None
    out = Path(ns.out or (run_dir / "plots" / "roofline.png" if run_dir else "roofline.png"))
    inputs = [run_dir / "metrics.jsonl"] if run_dir else []
    outputs.file_target("--out", out, inputs, example="roofline.png")
    summary_path = Path(ns.summary or out.with_suffix(".csv"))
    outputs.file_target("--summary", summary_path, inputs, example="roofline.csv")
    step = from_run(run_dir) if run_dir else timed_here(ns.model, ns.dataset, ns.batch_size, ns.precision, ns.device)
    dev = devices.resolve(ns.device if not run_dir else "auto")
    peak_flops, peak_bw, basis = roof(dev, step.precision, ns.peak_compute, ns.peak_bw)
    modules, about_modules = module_kernels(run_dir, step) if run_dir else ([], None)
    kernels = [step.kernel()] + modules + (roofline.kernels(ns.ncu, ns.tensor_flops_per_inst) if ns.ncu else [])
    table = roofline.summary(kernels, peak_flops, peak_bw)
    outputs.write_with(summary_path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.6g"))
    roofline.plot(kernels, peak_flops, peak_bw, out, ns.label or f"{step.model} on {devices.device_name(dev)}")
    k = kernels[0]
    print(f"{k.name}: {k.flops / 1e9:.2f} GFLOP and about {k.dram_bytes / 1e6:.0f} MB moved per step, "
          f"{k.seconds * 1000:.1f} ms ({step.where})")
    print(f"intensity {k.intensity:.1f} FLOP/byte, {k.flops_per_s / 1e9:.1f} GFLOP/s achieved: "
          f"{table.iloc[0]['share_of_ceiling']:.0%} of the roof here ({table.iloc[0]['bound']}-bound; roof "
          f"{peak_flops / 1e9:.0f} GFLOP/s and {peak_bw / 1e9:.1f} GB/s from {basis})")
    if about_modules:
        print(about_modules)
    print(f"wrote {out} and {summary_path}")
    return 0
