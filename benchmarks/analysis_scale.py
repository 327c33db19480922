"""`nnperf plot` + summary at scale: 1,000,000 telemetry rows across 4 runs.

Generates 4 run directories (telemetry at 10 metrics per row, train and val phases, metrics.jsonl)
in a temporary folder, then times the whole `nnperf plot RUN... --out DIR` command (process start,
reading, one PNG + CSV per metric, curves, summary) over a few repeats. Target: under 15 s here.

    python benchmarks/analysis_scale.py [--rows 1000000] [--runs 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROWS_PER_EPOCH = (10_000, 2_000)  # train, val


def write_run(folder: Path, name: str, rows: int, seed: int) -> None:
    rng = random.Random(seed)
    (folder / name / "telemetry").mkdir(parents=True)
    files = {p: open(folder / name / "telemetry" / f"{p}_epoch.jsonl", "w") for p in ("train", "val")}
    t, energy, metrics, epoch, written = 1.8e9, 0.0, [], 0, 0
    while written < rows:
        epoch += 1
        for phase, count in zip(("train", "val"), ROWS_PER_EPOCH):
            count = min(count, rows - written)
            util = 95.0 if phase == "train" else 60.0
            lines = []
            for i in range(count):
                t += 0.1
                power = 250 + rng.gauss(0, 15)
                energy += power * 0.1
                lines.append(json.dumps({
                    "t": t, "run": name, "phase": phase, "epoch": epoch, "step": i, "device": "cuda:0",
                    "backend": "nvml", "gpu_util_pct": min(100.0, util + rng.gauss(0, 3)),
                    "mem_util_pct": 40 + rng.gauss(0, 5), "vram_used_mb": 8000 + rng.random() * 50,
                    "vram_total_mb": 24564.0, "power_w": power, "energy_j": energy, "temp_c": 70 + rng.random(),
                    "sm_clock_mhz": 1900 + rng.choice((0, -15, -30)), "mem_clock_mhz": 9501.0,
                    "torch_mem_alloc_mb": 5000 + rng.random() * 10}))
            files[phase].write("\n".join(lines) + "\n" if lines else "")
            written += count
            metrics.append({"t": t, "epoch": epoch, "step": epoch * 100, "phase": phase, "loss": 2.0 / epoch,
                            "top1": 1 - 0.5 / epoch, "top5": 0.99, "images": 50_000 if phase == "train" else 10_000,
                            "seconds": count * 0.1, "energy_j": 250.0 * count * 0.1,
                            **({"lr": 0.1 / epoch} if phase == "train" else {})})
    for f in files.values():
        f.close()
    (folder / name / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="telemetry rows in all runs together")
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        names = [f"run{i}" for i in range(args.runs)]
        for i, name in enumerate(names):
            write_run(folder, name, args.rows // args.runs, seed=i)
        size = sum(p.stat().st_size for p in folder.rglob("*.jsonl")) / 1e6
        print(f"generated {args.rows:,} telemetry rows in {args.runs} runs ({size:.0f} MB of JSONL) "
              f"in {time.perf_counter() - start:.1f}s\n")
        cmd = [sys.executable, "-m", "nnperf", "plot", *(str(folder / n) for n in names), "--out", str(folder / "out")]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            if proc.returncode != 0:
                sys.exit(f"nnperf plot failed:\n{proc.stderr}")
        files = len(list((folder / "out").iterdir()))
        median = statistics.median(times)
        print(f"{'rows':>10s} {'runs':>4s} {'files out':>9s} {'median s':>8s} {'min-max s':>11s} {'rows/s':>10s}")
        print(f"{args.rows:10,d} {args.runs:4d} {files:9d} {median:8.1f} "
              f"{f'{min(times):.1f}-{max(times):.1f}':>11s} {args.rows / median:10,.0f}")
        print("\nlast run's output:\n" + proc.stdout)


if __name__ == "__main__":
    main()
