"""One process against N Gloo processes on this machine's CPU, the same global batch: step time.

Each configuration is a real `nnperf train` in its own process (`--nproc N` starts torchrun's launcher;
each of N processes gets cores/N threads, one process gets all the cores), on synthetic CIFAR-shaped
data, bf16 and channels_last fixed for all (the measured policy's choice here); the step time is the
global batch over the images/s of the training epochs after the first. Interleaved rounds, medians.
On a 2-core CPU this is no speed-up claim: the two processes share the cores one process already
used, and add an all-reduce of every gradient per step.

    python benchmarks/ddp_cpu.py [--models small_cifar,fast] [--nprocs 1,2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PLAN = {"small_cifar": (128, 16), "fast": (512, 4), "resnet18": (128, 4), "convnet3": (128, 16)}
EPOCHS = 3


def step_seconds(name: str, nproc: int, sync_bn: bool, out: Path, tag: str) -> float:
    batch, steps = PLAN.get(name, (128, 8))
    run = f"{name}-{nproc}-{tag}"
    argv = [sys.executable, "-m", "nnperf", "train", "--model", name, "--dataset", "synthetic",
            "--synthetic-size", str(batch * steps), "--batch-size", str(batch), "--epochs", str(EPOCHS),
            "--precision", "bf16", "--channels-last", "--eval-every", str(EPOCHS), "--no-report",
            "--no-telemetry", "--out-dir", str(out), "--name", run, "--nproc", str(nproc)]
    if sync_bn and nproc > 1:
        argv.append("--sync-bn")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {done.returncode}\n{done.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if r.get("phase") == "train" and r["epoch"] > 1]
    return batch / statistics.median(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="small_cifar,fast")
    ap.add_argument("--nprocs", default="1,2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sync-bn", action="store_true", help="also time N processes with --sync-bn")
    args = ap.parse_args()
    nprocs = [int(n) for n in args.nprocs.split(",")]
    configs = [(n, False) for n in nprocs] + ([(n, True) for n in nprocs if n > 1] if args.sync_bn else [])
    print(f"{os.cpu_count()} CPUs; step time in ms (global batch), medians of {args.rounds} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            got: dict[tuple, list[float]] = {c: [] for c in configs}
            for r in range(args.rounds):
                for c in configs:
                    got[c].append(step_seconds(name, c[0], c[1], Path(tmp), f"{r}{'s' if c[1] else ''}"))
                print(f"  {name} round {r + 1}: " + ", ".join(
                    f"{n} proc{' sync-bn' if s else ''} {v[-1] * 1000:.1f}" for (n, s), v in got.items()), flush=True)
            one = statistics.median(got[configs[0]])
            cells = [f"{n} process{'es' if n > 1 else ''}{' + sync-bn' if s else ''}: "
                     f"{statistics.median(v) * 1000:.1f} ms ({statistics.median(v) / one:.2f}x)"
                     for (n, s), v in got.items()]
            print(f"| {name} (batch {PLAN.get(name, (128,))[0]}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
