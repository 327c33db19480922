"""The fast recipe over several seeds: top-1 (with TTA) on the held-out images and wall time per run.

Each run is the whole command, `nnperf train --config configs/cifar10-fast.yaml --seed S`, data
preparation included (the first run decodes the JPEGs into the cache unless --cold is given, which
gives every run an empty cache of its own). The held-out split is fixed (--split-seed 0).

    python benchmarks/fast_recipe.py [--seeds 0,1,2] [--cold] [--keep DIR] [-- extra nnperf train flags]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(seed: int, extra: list[str], out_dir: str, cache: str | None) -> tuple[float, float, str]:
    env = dict(os.environ, **({"NNPERF_CACHE": cache} if cache else {}))
    cmd = [sys.executable, "-m", "nnperf", "train", "--config", str(ROOT / "configs" / "cifar10-fast.yaml"),
           "--seed", str(seed), "--out-dir", out_dir, "--name", f"seed{seed}", *extra]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"seed {seed} failed:\n{proc.stderr}")
    final = [line for line in proc.stdout.splitlines() if line.startswith("FINAL")][-1]
    return float(final.split("top1 ")[1].split(",")[0]), wall, final


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cold", action="store_true", help="an empty dataset cache for every run")
    ap.add_argument("--keep", metavar="DIR", help="keep the run directories in DIR (default: a temporary folder)")
    ap.add_argument("extra", nargs="*", help="more flags for nnperf train (after --)")
    args = ap.parse_args()
    accs, walls = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in map(int, args.seeds.split(",")):
            cache = str(Path(tmp) / f"cache{seed}") if args.cold else None
            acc, wall, final = run(seed, args.extra, args.keep or str(Path(tmp) / "runs"), cache)
            accs.append(acc)
            walls.append(wall)
            print(f"seed {seed}: {final} | wall {wall:.0f}s", flush=True)
    spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
    print(f"\ntop-1 (TTA, 5,000 held-out CIFAR-10 JPEG images): mean {statistics.mean(accs):.4f}, "
          f"std {spread:.4f}, min {min(accs):.4f}, max {max(accs):.4f} over {len(accs)} seeds")
    print(f"wall time per run: median {statistics.median(walls):.0f}s, max {max(walls):.0f}s")


if __name__ == "__main__":
    main()
