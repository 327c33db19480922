"""The training loop against `nnperf bench`'s eager step, and the cost of the MFU bookkeeping.

For each model, in interleaved rounds (medians):
- loop: `nnperf train` on synthetic CIFAR-shaped data (device-resident batches, crop and flip, the
  schedule, the running sums, telemetry: everything a run does), images/s of its training epochs
  after the first (the first builds kernels), read from metrics.jsonl;
- loop without MFU: the same run with the MFU basis removed (no FlopCounterMode count at setup, no
  per-epoch division): what the bookkeeping costs a run;
- bench: `nnperf bench`'s eager training step (TrainStep, the same optimizer) on one fixed batch.
Precision and memory format are set the same for all three (those the measured policy chose here),
so that the only difference is the loop. Target: loop images/s within 10% of bench's.

    python benchmarks/loop_vs_bench.py [--models small_cifar,resnet18,fast,convnet3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from nnperf import cli
from nnperf.perf import bench, flops
from nnperf.train import build

# Batch and steps per epoch: each model's usual batch, epochs of a few seconds here.
PLAN = {"small_cifar": (128, 24), "resnet18": (128, 5), "fast": (1024, 3), "convnet3": (128, 24)}
EPOCHS = 3


def loop_rate(name: str, batch: int, steps: int, precision: str, layout: str, out: Path,
              mfu: bool) -> tuple[float, float | None]:
    """Median images/s and MFU of the run's training epochs after the first."""
    run = f"{name}-{'mfu' if mfu else 'nomfu'}-{time.monotonic_ns()}"
    argv = ["train", "--model", name, "--dataset", "synthetic", "--synthetic-size", str(batch * steps),
            "--batch-size", str(batch), "--epochs", str(EPOCHS), "--precision", precision, layout,
            "--out-dir", str(out), "--name", run, "--eval-every", str(EPOCHS), "--no-report"]
    patch = contextlib.nullcontext() if mfu else _without_mfu()
    with patch, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = cli.main(argv)
    if code != 0:
        raise SystemExit(f"nnperf {' '.join(argv)} exited {code}")
    rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r.get("phase") == "train" and r.get("epoch", 0) > 1]
    mfus = [r["mfu"] for r in epochs if r.get("mfu") is not None]
    return statistics.median(r["images_per_s"] for r in epochs), statistics.median(mfus) if mfus else None


@contextlib.contextmanager
def _without_mfu():
    real = build.mfu_basis
    build.mfu_basis = lambda *a, **k: (None, None)
    try:
        yield
    finally:
        build.mfu_basis = real


def bench_rate(case: bench.Case) -> float:
    """Images/s of bench's eager training step (median of an adaptive autorange)."""
    ref = bench.outcome(case, "step", bench.call_of(case, "step", case.model))
    row = bench.bench_mode(case, "step", "eager", ref, lambda _m: None)
    return row.images_per_s


def bench_case(name: str, batch: int, precision: str, channels_last: bool) -> bench.Case:
    ns = SimpleNamespace(model=name, modes="eager", what="step", conv_impl="torch", dataset="synthetic",
                         batch_size=batch, min_time=2.0, precision=precision, channels_last=channels_last,
                         device="cpu" if not torch.cuda.is_available() else "auto", width=None,
                         image_size=None, policy=False)
    return bench.make_case(bench.plan_of(ns), name, "torch")


def mfu_setup_seconds(case: bench.Case) -> float:
    """What counting the FLOPs of one step costs at setup (FlopCounterMode on the meta device)."""
    start = time.perf_counter()
    flops.model_flops_per_image(case.model, case.plan.shape, case.plan.classes)
    return time.perf_counter() - start


def check(name: str, rounds: int, out: Path, precision: str, channels_last: bool) -> dict:
    batch, steps = PLAN.get(name, (128, 8))
    layout = "--channels-last" if channels_last else "--no-channels-last"
    case = bench_case(name, batch, precision, channels_last)
    got: dict[str, list[float]] = {"loop": [], "loop, no MFU": [], "bench": []}
    mfus = []
    for r in range(rounds):
        for with_mfu in (True, False) if r % 2 == 0 else (False, True):  # neither always runs first
            rate, mfu = loop_rate(name, batch, steps, precision, layout, out, mfu=with_mfu)
            got["loop" if with_mfu else "loop, no MFU"].append(rate)
            mfus += [mfu] if mfu is not None and with_mfu else []
        got["bench"].append(bench_rate(case))
        print(f"  {name} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in got.items()), flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    return {"model": name, "batch": batch, **med, "loop / bench": med["loop"] / med["bench"],
            "MFU cost": 1 - med["loop"] / med["loop, no MFU"], "setup_s": mfu_setup_seconds(case),
            "mfu": statistics.median(mfus) if mfus else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small_cifar,resnet18,fast,convnet3")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precision", default="bf16", help="the same for loop and bench (default bf16)")
    ap.add_argument("--no-channels-last", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, "
          f"{'NCHW' if args.no_channels_last else 'channels_last'}; images/s, medians of {args.rounds} rounds")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            results.append(check(name, args.rounds, Path(tmp), args.precision, not args.no_channels_last))
    print("\n| model (batch) | loop | loop, no MFU | bench eager step | loop / bench | MFU cost | FLOP count at setup | loop MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['model']} ({r['batch']}) | {r['loop']:,.1f} | {r['loop, no MFU']:,.1f} | {r['bench']:,.1f} | "
              f"{r['loop / bench']:.3f} | {r['MFU cost']:+.1%} | {r['setup_s']:.2f} s | "
              f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} |")


if __name__ == "__main__":
    main()
