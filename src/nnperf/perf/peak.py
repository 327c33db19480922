"""This device's measured peak FLOP/s and memory bandwidth (`nnperf peak`), cached per device.

Three measurements, each the median of repeated timings (torch.utils.benchmark, with the device
synchronised before every clock read), after a warm-up call:

- matmul: square products over a sweep of sizes per dtype (2 n^3 FLOPs each); the best size is kept.
- 3x3 convolution at CIFAR shapes (2 N Cout H W Cin 9 FLOPs), NCHW and NHWC, the faster kept.
- memory bandwidth: copy (b = a, 2 x size bytes) and triad (a = b + s c, 3 x size bytes) over
  buffers far larger than the last-level cache.

A dtype the device cannot run, or runs only in software (fp16 arithmetic on most CPUs, which is
emulated at a few GFLOP/s), is reported as not supported here, with the reason, never given a figure.
Figures go to the cache (cache.py, kind "peak") and are read back by later runs and by
peak_flops(), which the training loop uses for MFU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import device as devices
from ..errors import UsageError
from . import cache

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KIND = "peak"
# A 16-bit dtype running at under this fraction of fp32's speed has no hardware behind it.
EMULATED_BELOW = 0.25


@dataclass(frozen=True)
class Plan:
    """What to time. Sizes are sweeps: a size whose one call would take longer than call_cap_s is
    skipped (on a slow dtype the larger sizes only cost time)."""

    matmul_sizes: tuple[int, ...]
    conv_shapes: tuple[tuple[int, int, int, int], ...]  # (batch, in channels, out channels, height = width)
    buffer_bytes: int       # each bandwidth buffer
    llc_bytes: int | None   # the last-level cache the buffers must dwarf (None: unknown)
    repeats: int            # timed blocks; their median is the figure
    block_s: float          # seconds per timed block, about
    call_cap_s: float


# CIFAR's two heaviest convolution shapes at batch 128: a ResNet's first stage and its second.
CIFAR_CONVS = ((128, 64, 64, 32), (128, 128, 128, 16))


def default_plan(dev: torch.device) -> Plan:
    """The full measurement: about 40 s on a busy 2-core CPU (less on a quiet one), seconds on a GPU."""
    if dev.type == "cpu":
        llc = llc_bytes()
        return Plan(matmul_sizes=(256, 512, 1024, 2048), conv_shapes=CIFAR_CONVS,
                    buffer_bytes=_cpu_buffer_bytes(llc), llc_bytes=llc, repeats=5, block_s=0.06, call_cap_s=0.5)
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", None) if dev.type == "cuda" else None
    return Plan(matmul_sizes=(1024, 2048, 4096, 8192, 16384), conv_shapes=CIFAR_CONVS,
                buffer_bytes=_gpu_buffer_bytes(dev, l2), llc_bytes=l2, repeats=7, block_s=0.05, call_cap_s=0.5)


def llc_bytes() -> int | None:
    """Total last-level CPU cache: the highest cache level's size times its instances (sysfs), else
    glibc's figure for L3; None where neither says."""
    sizes: dict[str, int] = {}
    for index in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cache/index[0-9]*"):
        with contextlib.suppress(OSError, ValueError):
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _parse_size((index / "size").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
            sizes[f"{level}:{shared}"] = size
    if sizes:
        top = max(int(k.split(":")[0]) for k in sizes)
        return sum(v for k, v in sizes.items() if int(k.split(":")[0]) == top)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        value = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        return value if value > 0 else None
    return None


def _parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([KMG]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    return int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2).upper()]


def _cpu_buffer_bytes(llc: int | None) -> int:
    # 8x the cache (256 MiB at least) keeps the cache's share of the traffic negligible; three
    # buffers (triad) may take at most a quarter of the free memory.
    want = max(8 * (llc or 0), 256 * 2**20)
    with contextlib.suppress(ValueError, OSError, AttributeError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        want = min(want, max(free // 12, 16 * 2**20))
    return int(want)


def _gpu_buffer_bytes(dev: torch.device, l2: int | None) -> int:
    # 512 MiB: twice MI300X's 256 MB Infinity Cache, ten times an H100's L2; at most 1/8 of the memory.
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 8 * 2**30
    return int(min(max(512 * 2**20, 8 * (l2 or 0)), total // 8))


def parse_dtypes(text: str) -> list[str]:
    """--dtypes "fp32,bf16" -> ["fp32", "bf16"]; one UsageError line for anything else."""
    given = [t.strip().lower() for t in (text or "").split(",")]
    if not any(given):
        raise UsageError(f"--dtypes {text!r}: empty; give a comma-separated list of {', '.join(DTYPES)}")
    unknown = [t for t in given if t not in DTYPES]
    if unknown:
        raise UsageError(f"--dtypes {text}: unknown dtype '{unknown[0]}'; use a comma-separated list of "
                         f"{', '.join(DTYPES)}")
    return list(dict.fromkeys(given))


# ----------------------------------------------------------------------------- timing


@contextlib.contextmanager
def _quiet_import():
    # Importing torch.utils.benchmark imports cpp_extension, which logs a warning when a CUDA build of
    # torch finds no GPU: noise for a measurement that does not compile anything.
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def seconds_per_call(dev: torch.device, stmt: str, env: dict, repeats: int, block_s: float,
                     budget_s: float = 3.0) -> float:
    """Median seconds of one `stmt` over `repeats` timed blocks of about `block_s` each, after a
    warm-up call; the device is synchronised before every clock read (torch.utils.benchmark). A
    statement so slow that the repeats would take over `budget_s` gets fewer of them (one at least)."""
    with _quiet_import():
        from torch.utils import benchmark

    def clock() -> float:
        devices.sync(dev)
        return time.perf_counter()

    timer = benchmark.Timer(stmt, globals=env, timer=clock, num_threads=torch.get_num_threads())
    timer.timeit(1)  # warm-up: library handles, kernel choice, allocation, page faults
    first = timer.timeit(1).median
    number = max(1, int(block_s / max(first, 1e-9)))
    repeats = max(1, min(repeats, int(budget_s / max(first * number, 1e-9))))
    return statistics.median(timer.timeit(number).median for _ in range(repeats))


def _matmul_inputs(dev: torch.device, dtype: torch.dtype, n: int) -> dict:
    return {"a": torch.randn(n, n, device=dev).to(dtype), "b": torch.randn(n, n, device=dev).to(dtype)}


def _matmul_rate(dev: torch.device, dtype: torch.dtype, n: int, plan: Plan) -> float:
    seconds = seconds_per_call(dev, "torch.mm(a, b)", _matmul_inputs(dev, dtype, n), plan.repeats, plan.block_s)
    return 2 * n**3 / seconds


# ----------------------------------------------------------------------------- support


def support(dev: torch.device, name: str, plan: Plan) -> str | None:
    """None if `dev` runs dtype `name` in hardware; else why not: the op fails, or it runs at under
    EMULATED_BELOW of fp32's speed (emulated in software)."""
    dtype = DTYPES[name]
    try:
        tiny = torch.ones(16, 16, device=dev, dtype=dtype)
        (tiny @ tiny).sum().item()
        F.conv2d(torch.ones(1, 4, 6, 6, device=dev, dtype=dtype), torch.ones(4, 4, 3, 3, device=dev, dtype=dtype))
    except (RuntimeError, TypeError, NotImplementedError) as e:
        return f"{name} matmul/convolution fails on {dev.type}: {_first_line(e)[:160]}"
    if name == "fp32":
        return None
    n = plan.matmul_sizes[0]
    rate, base = _probe_rates(dev, dtype, n, plan.call_cap_s)
    if rate < EMULATED_BELOW * base:
        return (f"{name} matmul runs at {_rate(rate)}, 1/{base / rate:.0f} of fp32's {_rate(base)} (n={n}): "
                f"emulated in software, no native {name} arithmetic on this {dev.type}")
    return None


def _probe_rates(dev: torch.device, dtype: torch.dtype, n: int, cap_s: float, tries: int = 5) -> tuple[float, float]:
    """FLOP/s of an n x n matmul in `dtype` and in fp32, each the best of `tries` calls taken in turn:
    on a busy machine other processes only ever add time, so the fastest call is the fair comparison.
    A `dtype` call slower than cap_s ends the probe early (it is then plainly emulated)."""
    inputs = {d: _matmul_inputs(dev, d, n) for d in (dtype, torch.float32)}
    best = {dtype: math.inf, torch.float32: math.inf}
    with _one_cpu_thread(dev):
        for _ in range(tries):
            _time_each(dev, inputs, best)
            if best[dtype] > cap_s:
                break
    return 2 * n**3 / best[dtype], 2 * n**3 / best[torch.float32]


@contextlib.contextmanager
def _one_cpu_thread(dev: torch.device):
    # The speed ratio of two dtypes is a property of one core; with several threads a busy machine
    # (a thread descheduled at a barrier) can slow a 1 ms matmul a hundredfold.
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _time_each(dev: torch.device, inputs: dict, best: dict) -> None:
    for d, env in inputs.items():
        devices.sync(dev)
        start = time.perf_counter()
        torch.mm(env["a"], env["b"])
        devices.sync(dev)
        best[d] = min(best[d], time.perf_counter() - start)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------- measurements


def measure_matmul(dev: torch.device, name: str, plan: Plan) -> dict:
    """Matmul FLOP/s per size of the sweep; the best size kept. Sizes whose one call would exceed
    plan.call_cap_s (judged from the last rate) are skipped."""
    by_size: dict[str, float] = {}
    skipped = []
    rate = None
    for n in plan.matmul_sizes:
        if rate is not None and 2 * n**3 / rate > plan.call_cap_s:
            skipped.append(n)
            continue
        rate = _matmul_rate(dev, DTYPES[name], n, plan)
        by_size[str(n)] = rate
    best = max(by_size, key=by_size.get)
    return {"flop_per_s": by_size[best], "size": int(best), "by_size": by_size, "skipped_sizes": skipped}


def measure_conv(dev: torch.device, name: str, plan: Plan) -> list[dict]:
    """3x3 convolution (stride 1, padding 1) FLOP/s per CIFAR shape, the faster memory layout kept."""
    rows = []
    for batch, cin, cout, hw in plan.conv_shapes:
        flop = 2 * batch * cout * hw * hw * cin * 9
        row = {"shape": [batch, cin, cout, hw], "flop": flop}
        for layout in ("nchw", "nhwc"):
            fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
            env = {"x": torch.randn(batch, cin, hw, hw, device=dev).to(DTYPES[name]).to(memory_format=fmt),
                   "w": torch.randn(cout, cin, 3, 3, device=dev).to(DTYPES[name]).to(memory_format=fmt),
                   "F": F}
            with _cudnn_benchmark(dev):
                rate = flop / seconds_per_call(dev, "F.conv2d(x, w, padding=1)", env, plan.repeats, plan.block_s)
            row[f"{layout}_flop_per_s"] = rate
            if rate > row.get("flop_per_s", 0.0):
                row.update(flop_per_s=rate, layout=layout)
            if flop / rate > plan.call_cap_s:
                break  # the other layout would take as long again, for a slow shape
        rows.append(row)
    return rows


@contextlib.contextmanager
def _cudnn_benchmark(dev: torch.device):
    """Let cuDNN/MIOpen try its algorithms (as a tuned training run would), then restore the setting."""
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = dev.type == "cuda" or old
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def measure_bandwidth(dev: torch.device, plan: Plan) -> dict:
    """Copy and triad bytes/s over fp32 buffers of plan.buffer_bytes."""
    n = plan.buffer_bytes // 4
    env = {"a": torch.zeros(n, device=dev), "b": torch.rand(n, device=dev), "c": torch.rand(n, device=dev)}
    copy_s = seconds_per_call(dev, "a.copy_(b)", env, plan.repeats, plan.block_s)
    triad_s = seconds_per_call(dev, "torch.add(b, c, alpha=3.0, out=a)", env, plan.repeats, plan.block_s)
    return {"copy_bytes_per_s": 2 * n * 4 / copy_s, "triad_bytes_per_s": 3 * n * 4 / triad_s,
            "buffer_bytes": n * 4, "llc_bytes": plan.llc_bytes, "measured_at": time.time()}


def measure_dtype(dev: torch.device, name: str, plan: Plan) -> dict:
    """One dtype's figures: matmul and convolutions, or why it is not supported here."""
    why = support(dev, name, plan)
    if why is not None:
        return {"unsupported": why, "measured_at": time.time()}
    out = {"matmul": measure_matmul(dev, name, plan), "measured_at": time.time()}
    if plan.conv_shapes:
        out["conv3x3"] = measure_conv(dev, name, plan)
    if dev.type == "cuda" and name == "fp32":  # fp32 matmuls run on tensor cores (TF32) when this says so
        chosen = str(getattr(torch.backends.cuda.matmul, "fp32_precision", "none"))  # torch >= 2.9
        out["fp32_precision"] = chosen if chosen != "none" else (
            "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee")
        out["conv_tf32"] = bool(torch.backends.cudnn.allow_tf32)  # on by default: fp32 convolutions as TF32
    return out


def measure(dev: torch.device, dtypes: list[str], sizes: list[int] | None = None, repeats: int | None = None,
            plan: Plan | None = None, bandwidth: bool = True) -> dict:
    """Measure `dev` now (no cache): {"dtypes": {name: figures}, "bandwidth": {...}, "seconds": ...}.
    `sizes` replaces the plan's matmul sweep and `repeats` its timed blocks per figure."""
    plan = plan or default_plan(dev)
    plan = replace(plan, matmul_sizes=tuple(sizes) if sizes else plan.matmul_sizes, repeats=repeats or plan.repeats)
    start = time.perf_counter()
    result: dict[str, Any] = {"dtypes": {name: measure_dtype(dev, name, plan) for name in dtypes}}
    if bandwidth:
        result["bandwidth"] = measure_bandwidth(dev, plan)
    result["seconds"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------- vendor figures


@dataclass(frozen=True)
class Spec:
    """A GPU's datasheet figures, dense (no 2:4 sparsity), per device as torch sees it. `units` (SMs
    or CUs) tells variants and partitions (MIG slices, CPX modes) apart: they get no figure."""

    name: str
    match: str                    # regular expression on torch's device name
    units: int
    tflops: dict[str, float]      # fp32 (not TF32), tf32, bf16, fp16 (fp32 accumulation)
    bandwidth_gbps: float
    note: str = ""


_NV = "NVIDIA datasheet, sparse figures halved"
_HOPPER = {"fp32": 67.0, "tf32": 494.5, "bf16": 989.5, "fp16": 989.5}
_A100 = {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "fp16": 312.0}
SPECS = (
    Spec("H100 SXM", r"H100 80GB HBM3|H100 SXM", 132, _HOPPER, 3350.0, _NV),
    Spec("H100 PCIe", r"H100 PCIe", 114, {"fp32": 51.0, "tf32": 378.0, "bf16": 756.5, "fp16": 756.5}, 2000.0, _NV),
    Spec("H200 SXM", r"H200(?! NVL)", 132, _HOPPER, 4800.0, _NV),
    Spec("A100 SXM4 80GB", r"A100-SXM4-80GB", 108, _A100, 2039.0, _NV),
    Spec("A100 SXM4 40GB", r"A100-SXM4-40GB", 108, _A100, 1555.0, _NV),
    Spec("A100 PCIe 80GB", r"A100 80GB PCIe", 108, _A100, 1935.0, _NV),
    Spec("A100 PCIe 40GB", r"A100-PCIE-40GB", 108, _A100, 1555.0, _NV),
    Spec("L4", r"\bL4\b", 58, {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0, "fp16": 121.0}, 300.0, _NV),
    Spec("GeForce RTX 4090", r"RTX 4090", 128, {"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp16": 165.2}, 1008.0,
         "NVIDIA Ada whitepaper: tensor figures with fp32 accumulation (what PyTorch uses)"),
    Spec("Instinct MI300X", r"MI300X", 304, {"fp32": 163.4, "tf32": 653.7, "bf16": 1307.4, "fp16": 1307.4}, 5300.0,
         "AMD datasheet, dense; fp32 as matrix-core fp32"),
    Spec("Instinct MI250X (one GCD)", r"MI250", 110, {"fp32": 47.85, "bf16": 191.5, "fp16": 191.5}, 1638.4,
         "AMD datasheet halved: ROCm shows each of the module's two dies (GCDs) as a device; fp32 as matrix"),
    Spec("Instinct MI250 (one GCD)", r"MI250", 104, {"fp32": 45.25, "bf16": 181.05, "fp16": 181.05}, 1638.4,
         "AMD datasheet halved: ROCm shows each of the module's two dies (GCDs) as a device; fp32 as matrix"),
)


def vendor_spec(name: str, units: int | None, dev_type: str = "cuda") -> dict:
    """The datasheet figures for a device called `name` with `units` SMs/CUs: {"spec": {...}} or
    {"spec": None, "why": ...} where nnperf does not know them (CPUs, unlisted GPUs, partitions)."""
    if dev_type != "cuda":
        return {"spec": None, "why": f"no datasheet figures for {dev_type} devices: a {dev_type}'s peak depends "
                                     "on its model, clocks and cores; the measured figures are the reference"}
    named = [s for s in SPECS if re.search(s.match, name)]
    for s in named:
        if units is None or s.units == units:
            return {"spec": {"name": s.name, "tflops": dict(s.tflops), "bandwidth_gbps": s.bandwidth_gbps,
                             "note": s.note}}
    if named:
        return {"spec": None, "why": f"{name} with {units} units matches no datasheet entry ("
                                     f"{', '.join(f'{s.name}: {s.units}' for s in named)}): a partition or "
                                     "variant nnperf has no figures for"}
    return {"spec": None, "why": f"nnperf has no datasheet figures for {name}"}


def _units(dev: torch.device) -> int | None:
    if dev.type != "cuda":
        return None
    return getattr(torch.cuda.get_device_properties(dev), "multi_processor_count", None)


# ----------------------------------------------------------------------------- cache


def cached_or_measure(dev: torch.device, dtypes: list[str], refresh: bool = False,
                      plan: Plan | None = None) -> dict:
    """The figures for `dtypes` and the bandwidth: from the cache where it has them (from a full
    measurement), measured now where not (or all of them with refresh); the merged entry is stored.
    Each dtype's and the bandwidth's entry says "source": "cache" or "measured"."""
    key = cache.device_key(dev)
    stored = cache.get(KIND, key)
    stored = stored if isinstance(stored, dict) else {}
    # Kept: other dtypes' figures (refresh measures only those asked for); dropped: quick ones.
    have = {k: v for k, v in (stored.get("dtypes") or {}).items()
            if isinstance(v, dict) and not v.get("quick") and not (refresh and k in dtypes)}
    missing = [d for d in dtypes if d not in have]
    need_bw = refresh or not isinstance(stored.get("bandwidth"), dict)
    fresh = measure(dev, missing, plan=plan, bandwidth=need_bw) if missing or need_bw else {"dtypes": {}}
    merged = {"dtypes": {**have, **fresh["dtypes"]},
              "bandwidth": fresh.get("bandwidth", stored.get("bandwidth"))}
    if missing or need_bw:
        cache.put(KIND, key, merged)
    shown = {name: {**merged["dtypes"][name], "source": "measured" if name in missing else "cache"}
             for name in dtypes}
    bandwidth = {**merged["bandwidth"], "source": "measured" if need_bw else "cache"}
    return {"device": devices.device_name(dev), "device_type": dev.type, "key": key, "dtypes": shown,
            "bandwidth": bandwidth, "measure_seconds": fresh.get("seconds", 0.0),
            "cache_file": str(cache.path_for(KIND, key)), **vendor_spec(key["name"], _units(dev), dev.type)}


def is_cached(dev: torch.device, precision_name: str) -> bool:
    """Whether peak_flops(dev, precision_name) would read the cache rather than measure."""
    stored = cache.get(KIND, cache.device_key(dev))
    figures = (stored.get("dtypes") or {}).get(precision_name) if isinstance(stored, dict) else None
    return isinstance(figures, dict) and not figures.get("quick")


def peak_flops(dev: torch.device, precision_name: str) -> float | None:
    """The peak FLOP/s of `precision_name` (fp32, bf16, fp16) on `dev`, for MFU: the higher of the
    best matmul and the best 3x3 convolution (on CPUs oneDNN's convolutions can outrun its matmul,
    and MFU above 1 would mislead). Cached, else this dtype measured as `nnperf peak` measures it
    (seconds on a CPU) and cached. None where the precision is not supported here (or unknown)."""
    if precision_name not in DTYPES:
        return None
    key = cache.device_key(dev)
    stored = cache.get(KIND, key)
    stored = stored if isinstance(stored, dict) else {}
    figures = (stored.get("dtypes") or {}).get(precision_name)
    if not isinstance(figures, dict) or figures.get("quick"):
        # The full sweep of this one dtype (seconds on a CPU): a quick one read a bf16 peak under half
        # the full figure here, and MFU above 100%.
        figures = measure(dev, [precision_name], bandwidth=False)["dtypes"][precision_name]
        stored = {**stored, "dtypes": {**(stored.get("dtypes") or {}), precision_name: figures}}
        cache.put(KIND, key, stored)
    rates = [(figures.get("matmul") or {}).get("flop_per_s")]
    rates += [row.get("flop_per_s") for row in figures.get("conv3x3") or [] if isinstance(row, dict)]
    rates = [float(r) for r in rates if isinstance(r, (int, float)) and math.isfinite(r) and r > 0]
    return max(rates) if rates else None


# ----------------------------------------------------------------------------- report


def _rate(flop_per_s: float) -> str:
    if flop_per_s >= 1e12:
        return f"{flop_per_s / 1e12:.1f} TFLOP/s"
    return f"{flop_per_s / 1e9:.1f} GFLOP/s"


def _mib(n: int | None) -> str:
    return "unknown" if not n else f"{n / 2**20:.0f} MiB"


def _when(figures: dict) -> str:
    at = figures.get("measured_at")
    stamp = time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(at)) if isinstance(at, (int, float)) else "?"
    return f"measured now ({stamp})" if figures.get("source") == "measured" else f"cache, measured {stamp}"


def _matmul_cell(figures: dict, spec: dict | None, name: str) -> str:
    if "unsupported" in figures:
        return "not supported here"
    m = figures["matmul"]
    cell = f"{_rate(m['flop_per_s'])} (n={m['size']})"
    peak = (spec or {}).get("tflops", {}).get(name)
    return f"{cell}, {m['flop_per_s'] / (peak * 1e12):.0%} of datasheet" if peak else cell


def _conv_cell(figures: dict, i: int) -> str:
    rows = figures.get("conv3x3") or []
    if "unsupported" in figures or i >= len(rows):
        return "-"
    return f"{_rate(rows[i]['flop_per_s'])} ({rows[i]['layout']})"


def _rows(result: dict) -> list[list[str]]:
    names, spec = list(result["dtypes"]), result.get("spec")
    figs = [result["dtypes"][n] for n in names]
    rows = [[""] + names, ["matmul, best size"] + [_matmul_cell(f, spec, n) for f, n in zip(figs, names)]]
    shapes = next((f["conv3x3"] for f in figs if f.get("conv3x3")), [])
    for i, conv in enumerate(shapes):
        batch, cin, cout, hw = conv["shape"]
        rows.append([f"conv3x3 {batch}x{cin}->{cout} {hw}x{hw}"] + [_conv_cell(f, i) for f in figs])
    if spec:
        rows.append([f"datasheet ({spec['name']})"] + [
            f"{spec['tflops'][n]:g} TFLOP/s" if n in spec["tflops"] else "-" for n in names])
    rows.append(["figures"] + [_when(f) for f in figs])
    return rows


def format_table(result: dict) -> str:
    """The figures as text: a column per dtype, then bandwidth, what is not supported and why, and
    where the figures came from."""
    rows = _rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"{result['device']} ({result['device_type']}; torch {result['key'].get('torch')}"
             + (f", {result['key']['threads']} threads)" if "threads" in result["key"] else ")"), ""]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    bw, spec = result["bandwidth"], result.get("spec")
    lines.append(f"\nmemory bandwidth: copy {bw['copy_bytes_per_s'] / 1e9:.1f} GB/s, triad "
                 f"{bw['triad_bytes_per_s'] / 1e9:.1f} GB/s (fp32 buffers of {_mib(bw['buffer_bytes'])}, "
                 f"last-level cache {_mib(bw.get('llc_bytes'))}; {_when(bw)})")
    if spec:
        lines.append(f"datasheet bandwidth: {spec['bandwidth_gbps']:g} GB/s (triad reaches "
                     f"{bw['triad_bytes_per_s'] / 1e9 / spec['bandwidth_gbps']:.0%}); {spec['note']}")
    else:
        lines.append(f"datasheet: {result.get('why')}")
    for name, figures in result["dtypes"].items():
        if "unsupported" in figures:
            lines.append(f"{name}: not supported here: {figures['unsupported']}")
    cached = any(f.get("source") == "cache" for f in [bw, *result["dtypes"].values()])
    lines.append(f"cache: {result['cache_file']}" + (" (--refresh measures again)" if cached else "")
                 + f"; {result.get('seconds', 0.0):.1f} s")
    return "\n".join(lines)


def _json_target(path: str) -> Path:
    from ..analysis import outputs  # pandas & co: imported only when --json asks for a file

    return outputs.file_target("--json", path, example="peak.json")


def _write_json(path: Path, result: dict) -> None:
    from ..analysis import outputs

    text = json.dumps(result, indent=2, sort_keys=True, default=str) + "\n"
    outputs.write_with(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def run(ns: argparse.Namespace) -> int:
    """`nnperf peak`: print (and with --json write) this device's peak figures; 0 on success."""
    dtypes = parse_dtypes(ns.dtypes)
    dev = devices.resolve(ns.device)
    target = _json_target(ns.json) if getattr(ns, "json", None) else None  # checked before the work
    start = time.perf_counter()
    result = cached_or_measure(dev, dtypes, refresh=bool(getattr(ns, "refresh", False)))
    result["seconds"] = time.perf_counter() - start
    print(format_table(result))
    if target is not None:
        _write_json(target, result)
        print(f"wrote {target}")
    return 0
