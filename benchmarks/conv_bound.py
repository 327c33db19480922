"""How fast could a training step be if everything but the convolutions were free?

Times each convolution of a model on its own (forward + backward, the shapes one training step
sees), once as the reference loop runs it (fp32, NCHW) and once as nnperf's default path runs it
on this machine (the device's precision and memory layout). The sum is a ceiling on images/s for
each path, and the ratio of the two sums bounds the speed-up that any input pipeline or fusion can
give on this hardware.

    python benchmarks/conv_bound.py [--models small_cifar,resnet18] [--batch 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from nnperf import config, device, models
from nnperf.train.build import choose_hardware

CALLS = 4  # per timed repeat


def conv_shapes(name: str, batch: int) -> list[tuple[nn.Conv2d, tuple[int, ...]]]:
    model = models.build(name, 3, 10, 32)
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((m, tuple(args[0].shape))))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model.eval()(torch.randn(batch, 3, 32, 32))
    for h in hooks:
        h.remove()
    return seen


def conv_ms(conv: nn.Conv2d, shape, precision: device.Precision, channels_last: bool, repeats: int) -> float:
    """Median milliseconds of one forward + backward of `conv` on an input of `shape`."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    conv = conv.to(memory_format=fmt).requires_grad_(True)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_(True)

    with device.autocast(torch.device("cpu"), precision):
        grad = torch.ones_like(conv(x))

    def once():
        conv.weight.grad = x.grad = None
        with device.autocast(torch.device("cpu"), precision):
            out = conv(x)
        out.backward(grad)

    once()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(CALLS):
            once()
        times.append((time.perf_counter() - start) / CALLS)
    return 1e3 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small_cifar,resnet18")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    hw = choose_hardware(config.build({}, {"dataset": "synthetic"}))
    print(f"nnperf path: {hw.describe()}; reference: fp32, NCHW; batch {args.batch}\n")
    print(f"{'model':12s} {'convs':>5s} {'reference ms':>12s} {'nnperf ms':>10s} {'ref ceiling':>12s} "
          f"{'nnperf ceiling':>15s} {'ratio bound':>11s}")
    for name in args.models.split(","):
        shapes = conv_shapes(name, args.batch)
        fp32 = device.Precision("fp32", "reference")
        ref = sum(conv_ms(c, s, fp32, False, args.repeats) for c, s in shapes)
        ours = sum(conv_ms(c, s, hw.precision, hw.channels_last, args.repeats) for c, s in shapes)
        print(f"{name:12s} {len(shapes):5d} {ref:12.1f} {ours:10.1f} {args.batch / ref * 1e3:8.0f} img/s "
              f"{args.batch / ours * 1e3:10.0f} img/s {ref / ours:10.2f}x")


if __name__ == "__main__":
    main()
