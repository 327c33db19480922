"""What telemetry costs: the sampler's own CPU time, each backend's sample() in microseconds, and an
interleaved A/B of small_cifar training throughput with telemetry at 10 Hz against telemetry off.

The sampler's cost is measured directly as CPU time (its thread and the backend threads, with
time.thread_time()), in milliseconds of CPU per second of wall time, because throughput on these
shared machines varies about +-10% from run to run.

    python benchmarks/telemetry_overhead.py [--seconds 20] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from nnperf import data, models
from nnperf.telemetry import Sampler
from nnperf.telemetry import backends as registry
from nnperf.train.build import choose_hardware
from nnperf import config
from nnperf.train.optim import make_optimizer
from nnperf.train.step import TrainStep


def sampler_cost(dev: torch.device, seconds: float, interval_s: float = 0.1) -> tuple[float, int, list[str]]:
    """(ms of CPU per s of wall, samples taken, backend names) of a sampler left running."""
    backends = registry.for_device(dev)
    with tempfile.TemporaryDirectory() as tmp:
        s = Sampler(backends, tmp, interval_s).start()
        start = time.monotonic()
        time.sleep(seconds)
        s.stop()
        wall = time.monotonic() - start
    return 1000 * s.cpu_s / wall, s.samples, [b.name for b in backends]


def per_sample_us(dev: torch.device, calls: int = 200, interval_s: float = 0.01) -> dict[str, float]:
    """Mean CPU microseconds of one sample() per backend, called at a steady pace (some backends
    refresh their slow parts only once a second, so a tight loop would flatter them)."""
    out = {}
    for b in registry.for_device(dev):
        b.sample()  # the first call of psutil and friends sets up state
        spent = 0.0
        for _ in range(calls):
            time.sleep(interval_s)
            t = time.thread_time()
            b.sample()
            spent += time.thread_time() - t
        out[f"{b.name} ({b.device})"] = 1e6 * spent / calls
        b.close()
    return out


def throughput_ab(rounds: int, steps: int) -> list[tuple[float, float]]:
    """(images/s without, with telemetry at 10 Hz) per round, A and B interleaved, same model."""
    cfg = config.build({}, {"dataset": "synthetic", "synthetic_size": 8192})
    hw = choose_hardware(cfg)
    ds = data.load(cfg)
    mean, std = data.channel_stats(ds.train)
    batches = data.Batches(ds.train, 128, hw.dev, mean, std, shuffle=True,
                           augment=data.Augment(crop=True, flip="random", pad=4), channels_last=hw.channels_last)
    torch.manual_seed(0)
    model = models.build("small_cifar", 3, 10, 32).to(memory_format=torch.channels_last).train()
    step = TrainStep(model, make_optimizer(cfg, model), None, hw.dev, hw.precision)
    stream = (b for epoch in range(10**6) for b in batches.epoch(epoch))

    def images_per_s() -> float:
        for _ in range(2):
            step(*next(stream))
        start, n = time.perf_counter(), 0
        for _ in range(steps):
            x, y = next(stream)
            step(x, y)[0].item()
            n += len(y)
        return n / (time.perf_counter() - start)

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            off = images_per_s()
            sampler = Sampler(registry.for_device(hw.dev), tmp, 0.1).start()
            sampler.set_phase("train", 1, r)
            on = images_per_s()
            sampler.stop()
            results.append((off, on))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    dev = choose_hardware(config.build({}, {})).dev
    ms_per_s, samples, names = sampler_cost(dev, args.seconds)
    print(f"sampler at 10 Hz on {dev} with backends {', '.join(names)}: {ms_per_s:.2f} ms of CPU per s of wall "
          f"({samples} samples in {args.seconds:.0f} s)")
    print("\nbackend            one sample(), mean CPU at 100 Hz")
    for name, us in per_sample_us(dev).items():
        print(f"{name:18s} {us:8.0f} us")
    ab = throughput_ab(args.rounds, args.steps)
    ratios = [on / off for off, on in ab]
    print(f"\nsmall_cifar training, {args.rounds} interleaved rounds of {args.steps} steps (batch 128):")
    print(f"  telemetry off  median {statistics.median(o for o, _ in ab):7.0f} img/s")
    print(f"  telemetry 10Hz median {statistics.median(n for _, n in ab):7.0f} img/s")
    print(f"  ratio on/off   median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
