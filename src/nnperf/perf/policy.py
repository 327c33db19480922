"""The precision and memory-format policy, measured: time a few forward+backward steps of each candidate
this device runs (fp32, bf16, fp16; NCHW and channels_last) on the run's own model and input shape,
keep the fastest that is numerically safe, and cache the choice per device, model, shape and batch.

Rules from CPU flags and library versions guess; on an AMD EPYC with AVX2 only, the rule "fp32 ->
NCHW" trained the fast model at half the speed channels_last gives. The probe costs a few seconds
once; later runs of the same (device, model, input shape, batch) read the cache.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import device as devices
from . import cache

PROBE_S = 0.3  # timed steps per candidate: until this long has passed...
PROBE_MIN, PROBE_MAX = 2, 10  # ...with at least and at most this many
CPU_PROBE_BATCH = 128  # a CPU step at a batch of 1024 takes seconds; rankings at 64 were wrong (resnet18)
SLOWER_GIVE_UP = 2.0  # a candidate whose warm-up step is this many times the best one's is not timed further
LOSS_TOLERANCE = 0.05  # a mixed-precision loss this far (relative) from fp32's counts as unsafe
# The rules' choice stands unless another candidate beats it by more than this: a few steps at a small
# batch measure a 10% difference no better than the rules guess it, and a 2x one (fp32 NCHW against
# channels_last on an AVX2 CPU) far better.
RULES_MARGIN = 0.10


@dataclass(frozen=True)
class Candidate:
    precision: str  # fp32, bf16 or fp16
    channels_last: bool

    @property
    def label(self) -> str:
        return f"{self.precision} {'channels_last' if self.channels_last else 'NCHW'}"


@dataclass
class Timing:
    candidate: Candidate
    images_per_s: float | None  # None: not timed (unsafe, unsupported, or far slower at its warm-up)
    note: str = ""


def precisions(dev: torch.device, static: devices.Precision) -> list[str]:
    """The precisions worth timing on `dev`: fp32, the device's mixed precision, and on GPUs both."""
    names = ["fp32"]
    if dev.type in ("cuda", "xpu"):
        names += ["bf16", "fp16"]
    elif dev.type == "cpu":
        names.append("bf16")  # autocast runs bf16 on every CPU; only timing says whether it pays
        if devices.cpu_flags() & {"avx512_fp16", "amx_fp16"}:
            names.append("fp16")
    if static.name not in names:
        names.append(static.name)
    return names


def candidates(dev: torch.device, static: devices.Precision, precision: str | None,
               channels_last: bool | None) -> list[Candidate]:
    """Every (precision, layout) pair to time; a setting the user gave is kept fixed."""
    names = [precision] if precision else precisions(dev, static)
    layouts = [channels_last] if channels_last is not None else [False, True]
    return [Candidate(p, cl) for p in names for cl in layouts]


def probe_batch(dev: torch.device, batch_size: int) -> int:
    return min(batch_size, CPU_PROBE_BATCH) if dev.type == "cpu" else batch_size


def measure(model: nn.Module, image_shape: tuple, num_classes: int, batch: int, dev: torch.device,
            cands: list[Candidate], first: Candidate | None = None) -> list[Timing]:
    """Time each candidate's forward+backward on a copy of `model` (the model, its statistics and the
    random generators are left as they were). Each loss is checked against an fp32 forward pass.
    `first` (the rules' choice, likely the fastest) is timed first, so that a candidate whose warm-up
    step is far slower than the fastest one so far is not timed further: the probe stays short."""
    order = sorted(cands, key=lambda c: c != first)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(0)
        x = torch.randn(batch, *image_shape, device=dev)
        y = torch.randint(0, num_classes, (batch,), device=dev)
        reference = _reference_loss(model, x, y)
        best_warmup, out = math.inf, []
        for cand in order:
            timing, _, warmup = _time_candidate(model, x, y, dev, cand, reference, best_warmup)
            if timing.images_per_s is not None:
                best_warmup = min(best_warmup, warmup)
            out.append(timing)
    return sorted(out, key=lambda t: cands.index(t.candidate))


def _reference_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float | None:
    """The fp32 loss of one forward pass in train mode (on a copy: BatchNorm's statistics move)."""
    with torch.no_grad():
        loss = float(F.cross_entropy(copy.deepcopy(model).train()(x).float(), y))
    return loss if math.isfinite(loss) else None


def _time_candidate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device, cand: Candidate,
                    reference: float | None, best_warmup: float) -> tuple[Timing, float | None, float]:
    """(its timing, its first loss, its warm-up step's seconds)."""
    fmt = torch.channels_last if cand.channels_last else torch.contiguous_format
    m = copy.deepcopy(model).train().to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    precision = devices.Precision(cand.precision, "")
    try:
        start = time.perf_counter()
        loss = _step(m, x, y, dev, precision)
        warmup = time.perf_counter() - start
    except (RuntimeError, NotImplementedError) as e:  # a dtype or layout this device's kernels lack
        return Timing(cand, None, f"does not run here ({str(e).splitlines()[0][:80]})"), None, math.inf
    unsafe = _unsafe(m, loss, reference)
    if unsafe:
        return Timing(cand, None, unsafe), None, warmup
    if warmup > SLOWER_GIVE_UP * best_warmup:
        return Timing(cand, None, f"warm-up step {warmup / best_warmup:.1f}x the fastest's: not timed further"), \
            loss, warmup
    return Timing(cand, len(y) / _seconds_per_step(m, x, y, dev, precision)), loss, warmup


def _step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device, precision: devices.Precision) -> float:
    """One forward and backward (gradients left in place for the safety check); the loss."""
    m.zero_grad(set_to_none=True)
    with devices.autocast(dev, precision):
        loss = F.cross_entropy(m(x).float(), y)
    # fp16 trains with a gradient scaler; a constant scale costs what the scaler's does.
    (loss * 1024.0 if precision.needs_scaler else loss).backward()
    devices.sync(dev)
    return float(loss.detach())


def _unsafe(m: nn.Module, loss: float, reference: float | None) -> str:
    """Why this candidate's numbers cannot be trusted, or '' (finite loss and gradients, loss near fp32's)."""
    if not math.isfinite(loss):
        return "unsafe: non-finite loss"
    if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in m.parameters()):
        return "unsafe: non-finite gradients"
    if reference is not None and abs(loss - reference) > LOSS_TOLERANCE * max(abs(reference), 1.0):
        return f"unsafe: loss {loss:.4f} against fp32's {reference:.4f}"
    return ""


def _seconds_per_step(m: nn.Module, x: torch.Tensor, y: torch.Tensor, dev: torch.device,
                      precision: devices.Precision) -> float:
    steps, start = 0, time.perf_counter()
    while steps < PROBE_MIN or (steps < PROBE_MAX and time.perf_counter() - start < PROBE_S):
        _step(m, x, y, dev, precision)
        steps += 1
    return (time.perf_counter() - start) / steps


def fastest(timings: list[Timing]) -> Timing | None:
    timed = [t for t in timings if t.images_per_s is not None]
    return max(timed, key=lambda t: t.images_per_s) if timed else None


def pick(timings: list[Timing], rules: Candidate) -> Candidate | None:
    """The fastest safe candidate, or the rules' choice where it is within RULES_MARGIN of it."""
    best = fastest(timings)
    ruled = next((t for t in timings if t.candidate == rules and t.images_per_s), None)
    if best is None:
        return None
    if ruled is not None and best.images_per_s <= ruled.images_per_s * (1 + RULES_MARGIN):
        return rules
    return best.candidate


def model_id(name: str, width: int | None, conv_impl: str, classes: int) -> dict:
    """What identifies a model for the cache (training and `nnperf bench --policy` share entries)."""
    return {"name": name, "width": width, "conv_impl": conv_impl, "classes": classes}


def cache_key(dev: torch.device, model_id: dict, image_shape: tuple, batch: int, cands: list[Candidate]) -> dict:
    return {**cache.device_key(dev), "model": model_id, "shape": list(image_shape), "batch": batch,
            "candidates": [c.label for c in cands]}


def table(timings: list[Timing], chosen: Candidate | None = None) -> str:
    """The candidates as a table, the chosen one marked."""
    base = next((t.images_per_s for t in timings if t.candidate == Candidate("fp32", False) and t.images_per_s), None)
    lines = [f"{'candidate':22s} {'images/s':>9s} {'vs fp32 NCHW':>12s}  note"]
    for t in timings:
        ips = f"{t.images_per_s:9.1f}" if t.images_per_s else f"{'-':>9s}"
        ratio = f"{t.images_per_s / base:11.2f}x" if t.images_per_s and base else f"{'-':>12s}"
        mark = " <- chosen" if t.candidate == chosen else ""
        lines.append(f"{t.candidate.label:22s} {ips} {ratio}  {t.note}{mark}".rstrip())
    return "\n".join(lines)


def to_plain(timings: list[Timing]) -> list[dict]:
    return [{**asdict(t.candidate), "images_per_s": t.images_per_s, "note": t.note} for t in timings]


def from_plain(rows: list[dict]) -> list[Timing]:
    return [Timing(Candidate(r["precision"], bool(r["channels_last"])), r.get("images_per_s"), r.get("note", ""))
            for r in rows]


@dataclass
class Choice:
    candidate: Candidate
    timings: list[Timing]
    cached: bool  # read from the cache rather than measured now
    probe_s: float  # what measuring took now (0 when cached)

    def reason(self) -> str:
        best = fastest(self.timings)
        base = next((t.images_per_s for t in self.timings
                     if t.candidate == Candidate("fp32", False) and t.images_per_s), None)
        how = "cached measurement" if self.cached else f"measured in {self.probe_s:.1f}s"
        if best is None:
            return f"{how}: no candidate could be timed"
        if best.candidate != self.candidate:
            return f"{how}: the rules' choice, within {RULES_MARGIN:.0%} of the fastest of {len(self.timings)}"
        versus = f", fp32 NCHW {base:.0f}" if base and best.candidate != Candidate("fp32", False) else ""
        return f"{how}: fastest of {len(self.timings)} at {best.images_per_s:.0f} img/s{versus}"

    def to_dict(self) -> dict:
        return {"chosen": self.candidate.label, "cached": self.cached, "probe_s": round(self.probe_s, 3),
                "candidates": to_plain(self.timings)}


def choose(model: nn.Module, model_id: dict, image_shape: tuple, num_classes: int, batch_size: int,
           dev: torch.device, cands: list[Candidate], fallback: Candidate) -> Choice:
    """The fastest safe candidate for this (device, model, input shape, batch), from the cache when it
    holds one, else measured now and cached; `fallback` when none could be timed."""
    batch = probe_batch(dev, batch_size)
    key = cache_key(dev, model_id, image_shape, batch, cands)
    saved = cache.get("policy", key)
    if isinstance(saved, list):
        try:
            timings = from_plain(saved)
            return Choice(pick(timings, fallback) or fallback, timings, True, 0.0)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass  # a damaged entry is measured again
    return measure_and_remember(model, model_id, image_shape, num_classes, batch_size, dev, cands, fallback)


def measure_and_remember(model: nn.Module, model_id: dict, image_shape: tuple, num_classes: int, batch_size: int,
                         dev: torch.device, cands: list[Candidate], fallback: Candidate) -> Choice:
    """Measure the candidates now (whatever the cache holds) and cache the result."""
    batch = probe_batch(dev, batch_size)
    start = time.perf_counter()
    timings = measure(model, image_shape, num_classes, batch, dev, cands, first=fallback)
    probe_s = time.perf_counter() - start
    chosen = pick(timings, fallback)
    if chosen is not None:
        cache.put("policy", cache_key(dev, model_id, image_shape, batch, cands), to_plain(timings))
    return Choice(chosen or fallback, timings, False, probe_s)
