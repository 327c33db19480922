"""The measured precision/memory-format policy against the best fixed choice found by hand.

For each model: what `nnperf train` chooses by default (--policy measured, with an empty cache: the
probe runs, and its time is shown), what the rules choose (--policy static), and the images/s of
nnperf's real training step (TrainStep, nnperf's optimizer, the model's usual batch) in every
candidate: fp32/bf16 (fp16 where the device has it) x NCHW/channels_last, timed in interleaved
rounds (medians). The goal: the default is never more than 5% behind the best fixed choice.

    python benchmarks/policy_check.py [--models small_cifar,resnet18,fast] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

from nnperf import config, models
from nnperf import device as devices
from nnperf.perf import policy
from nnperf.train.build import choose_hardware
from nnperf.train.optim import make_optimizer
from nnperf.train.step import TrainStep

# The batch each model trains at in nnperf's presets and README runs, and timed steps per round.
PLAN = {"small_cifar": (128, 8), "resnet18": (128, 2), "fast": (1024, 1), "convnet3": (128, 8)}
SHAPE, CLASSES = (3, 32, 32), 10


def build(name: str, cand: policy.Candidate, dev: torch.device) -> tuple[torch.nn.Module, TrainStep]:
    torch.manual_seed(0)
    model = models.build(name, 3, CLASSES, 32).to(dev)
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.rand(2000, *SHAPE, device=dev))
    fmt = torch.channels_last if cand.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    cfg = config.build({}, {"model": name})
    precision = devices.Precision(cand.precision, "")
    scaler = torch.amp.GradScaler(dev.type) if precision.needs_scaler else None
    return model, TrainStep(model, make_optimizer(cfg, model), scaler, dev, precision)


def images_per_s(step: TrainStep, batch: int, steps: int, cand: policy.Candidate, dev: torch.device) -> float:
    fmt = torch.channels_last if cand.channels_last else torch.contiguous_format
    x = torch.randn(batch, *SHAPE, device=dev).contiguous(memory_format=fmt)
    y = torch.randint(0, CLASSES, (batch,), device=dev)
    step(x, y)  # warm-up
    devices.sync(dev)
    start = time.perf_counter()
    for _ in range(steps):
        step(x, y).loss.item()
    return batch * steps / (time.perf_counter() - start)


def default_choice(name: str, batch: int, dev: torch.device) -> tuple[policy.Choice, policy.Candidate]:
    """(what --policy measured chooses with an empty cache, what --policy static chooses)."""
    hw = choose_hardware(config.build({}, {"model": name}))
    static = policy.Candidate(hw.precision.name, hw.channels_last)
    torch.manual_seed(0)
    model = models.build(name, 3, CLASSES, 32).to(dev)
    if hasattr(model, "init_from_data"):
        model.init_from_data(torch.rand(2000, *SHAPE, device=dev))
    cands = policy.candidates(dev, hw.precision, None, None)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["NNPERF_CACHE"] = tmp
        choice = policy.choose(model, {"name": name}, SHAPE, CLASSES, batch, dev, cands, static)
    return choice, static


def check(name: str, rounds: int, dev: torch.device) -> None:
    batch, steps = PLAN.get(name, (128, 4))
    choice, static = default_choice(name, batch, dev)
    cands = [t.candidate for t in choice.timings]
    built = {c: build(name, c, dev)[1] for c in cands}
    results: dict[policy.Candidate, list[float]] = {c: [] for c in cands}
    for _ in range(rounds):
        for c in cands:
            results[c].append(images_per_s(built[c], batch, steps, c, dev))
    median = {c: statistics.median(v) for c, v in results.items()}
    best = max(median, key=median.get)
    print(f"\n{name}, batch {batch}, {rounds} interleaved rounds of {steps} steps "
          f"(policy probe: {choice.probe_s:.1f} s at batch {policy.probe_batch(dev, batch)})")
    print(f"  {'candidate':22s} {'img/s':>8s} {'vs best':>8s}")
    for c in cands:
        marks = [m for m, on in (("default", c == choice.candidate), ("rules", c == static), ("best", c == best)) if on]
        print(f"  {c.label:22s} {median[c]:8.1f} {median[c] / median[best]:8.3f}  {', '.join(marks)}")
    print(f"  default ({choice.candidate.label}) / best ({best.label}): {median[choice.candidate] / median[best]:.3f}; "
          f"rules ({static.label}) / best: {median[static] / median[best]:.3f}" if static in median else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small_cifar,resnet18,fast")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds: must be 1 or more")
    dev = devices.resolve(args.device)
    print(f"device: {devices.device_name(dev)} ({dev}), torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.models.split(","):
        check(name.strip(), args.rounds, dev)


if __name__ == "__main__":
    main()
