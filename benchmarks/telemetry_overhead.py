"""What telemetry costs: the sampler's own CPU time, each backend's sample() in microseconds, and an
interleaved A/B of small_cifar training throughput with telemetry at 10 Hz against telemetry off.

The sampler's cost is measured directly as CPU time, in milliseconds of CPU per second of wall time,
because throughput on these shared machines varies about +-10% from run to run. Two figures, each the
median of --repeats interleaved pairs of blocks of --seconds:
  - sampler threads: the CPU time of the sampler's thread and its backend threads (time.thread_time()
    in each, start to end: their wakeups included), per second of the block;
  - whole process: resource.getrusage(RUSAGE_SELF) CPU time around an idle `profile()` block (starting
    and stopping the sampler included), minus the same around an idle block of the same length without
    one, per second.

    python benchmarks/telemetry_overhead.py [--seconds 20] [--repeats 3] [--rounds 15] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from nnperf import data, models
from nnperf.telemetry import Sampler, profile
from nnperf.telemetry import backends as registry
from nnperf.train.build import choose_hardware
from nnperf import config
from nnperf.train.optim import make_optimizer
from nnperf.train.step import TrainStep


def process_cpu_s() -> float:
    """User and system CPU time of the whole process so far (every thread, the sampler's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sampler_cost(dev: torch.device, seconds: float, repeats: int, interval_s: float = 0.1) -> dict:
    """Medians over `repeats` interleaved pairs (an idle block without telemetry, then an idle `profile()`
    block sampling at `interval_s`, each `seconds` long) of: the sampler threads' CPU ms per s, the
    whole process's CPU ms per s beyond the idle block's, the idle block's own, and the samples taken."""
    threads, process, idle, samples, names = [], [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            cpu, wall = process_cpu_s(), time.monotonic()
            time.sleep(seconds)
            idle_ms = 1000 * (process_cpu_s() - cpu) / (time.monotonic() - wall)
            cpu, wall = process_cpu_s(), time.monotonic()
            with profile("bench", Path(tmp) / f"bench{r}.jsonl", interval_s=interval_s, device=dev) as sampler:
                time.sleep(seconds)
            wall = time.monotonic() - wall
            process.append(1000 * (process_cpu_s() - cpu) / wall - idle_ms)
            threads.append(1000 * sampler.cpu_s / wall)
            idle.append(idle_ms)
            samples.append(sampler.samples)
            names = [w.backend.name for w in sampler.workers]
    return {"threads_ms_per_s": statistics.median(threads), "process_ms_per_s": statistics.median(process),
            "idle_ms_per_s": statistics.median(idle), "samples": statistics.median(samples), "backends": names,
            "process_range": (min(process), max(process))}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wakeup_floor_ms_per_s(seconds: float, interval_s: float = 0.1) -> float:
    """CPU ms per s of wall of a thread that does nothing but wake up every `interval_s` (time.sleep):
    the least any sampling thread costs on this machine, before it reads anything."""
    spent = []

    def idle() -> None:
        start = time.thread_time()
        for _ in range(round(seconds / interval_s)):
            time.sleep(interval_s)
        spent.append(time.thread_time() - start)

    wall = time.monotonic()
    thread = threading.Thread(target=idle)
    thread.start()
    thread.join()
    return 1000 * spent[0] / (time.monotonic() - wall)


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
            step(x, y).loss.item()
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


def at_least(minimum: float, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    return parse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=at_least(1.0, float), default=20, help="length of each measured block")
    ap.add_argument("--repeats", type=at_least(1), default=3, help="interleaved pairs of blocks for the CPU cost")
    ap.add_argument("--rounds", type=at_least(1), default=15, help="interleaved rounds of the throughput A/B")
    ap.add_argument("--steps", type=at_least(1), default=20, help="training steps per round")
    ap.add_argument("--no-throughput", action="store_true", help="measure the CPU cost only, skip the A/B")
    args = ap.parse_args()
    dev = choose_hardware(config.build({}, {})).dev
    print(f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"
          f" cores usable), torch {torch.__version__}")
    cost = sampler_cost(dev, args.seconds, args.repeats)
    low, high = cost["process_range"]
    print(f"sampler at 10 Hz on {dev} with backends {', '.join(cost['backends'])}, medians of {args.repeats} "
          f"interleaved blocks of {args.seconds:.0f} s ({cost['samples']:.0f} samples each):")
    print(f"  sampler threads (thread_time)     {cost['threads_ms_per_s']:5.2f} ms of CPU per s of wall")
    print(f"  whole process (getrusage)         {cost['process_ms_per_s']:5.2f} ms of CPU per s of wall "
          f"(min {low:.2f}, max {high:.2f}; idle baseline {cost['idle_ms_per_s']:.2f} ms/s subtracted)")
    print(f"  floor: a thread that only wakes  {wakeup_floor_ms_per_s(min(args.seconds, 10)):5.2f} ms of CPU per s of wall "
          "(10 Hz, time.sleep)")
    print("\nbackend            one sample(), mean CPU at 100 Hz")
    for name, us in per_sample_us(dev).items():
        print(f"{name:18s} {us:8.0f} us")
    if args.no_throughput:
        return
    ab = throughput_ab(args.rounds, args.steps)
    ratios = [on / off for off, on in ab]
    print(f"\nsmall_cifar training, {args.rounds} interleaved rounds of {args.steps} steps (batch 128):")
    print(f"  telemetry off  median {statistics.median(o for o, _ in ab):7.0f} img/s")
    print(f"  telemetry 10Hz median {statistics.median(n for _, n in ab):7.0f} img/s")
    print(f"  ratio on/off   median {statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


if __name__ == "__main__":
    main()
