"""Training throughput: the usual CIFAR loop against nnperf's default input path, side by side.

Reference loop, as the usual scripts write it: a Dataset like torchvision's CIFAR10 holding the decoded
uint8 images in memory and making a PIL image per sample, RandomCrop(32, padding=4) + RandomHorizontalFlip
+ ToTensor + Normalize per sample, a DataLoader with 2 workers, fp32. JPEG decoding is done once up front
for both and not charged to either.

nnperf's path: the uint8 dataset on the device, batched crop+flip and normalisation, the device's
precision and memory layout (bf16 + channels_last on CPUs with AVX512-BF16/AMX).

Same model, same data (the CIFAR-10 JPEG split), interleaved rounds; medians of images/s and their ratio.

    python benchmarks/throughput.py [--models small_cifar,resnet18,fast] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from nnperf import config, data, models
from nnperf.train.build import choose_hardware
from nnperf.train.optim import make_optimizer
from nnperf.train.step import TrainStep

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg-train.tar.gz"
# Batch size and timed steps per model: about the same wall time for each.
PLAN = {"small_cifar": (128, 30), "resnet18": (128, 4), "fast": (512, 8), "convnet3": (128, 30)}


class CifarLike(Dataset):
    """torchvision.datasets.CIFAR10's way: HWC uint8 in memory, a PIL image per sample."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, transform):
        self.data, self.targets, self.transform = images_hwc, labels, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), int(self.targets[i])


def reference_batches(split: data.Split, mean, std, batch_size: int):
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(mean, std)])
    ds = CifarLike(split.images.permute(0, 2, 3, 1).numpy(), split.labels.numpy(), transform)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=2, drop_last=True,
                        persistent_workers=True)
    while True:
        yield from loader


def reference_step(model, optimizer):
    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return step


def nnperf_batches(batches: data.Batches):
    epoch = 0
    while True:
        yield from batches.epoch(epoch)
        epoch += 1


def timed(step, batches, warmup: int, steps: int) -> tuple[float, float]:
    """(images/s, share of the time spent waiting for input) over `steps` steps after `warmup`."""
    for _ in range(warmup):
        x, y = next(batches)
        step(x, y)
    waited, n = 0.0, 0
    start = time.perf_counter()
    for _ in range(steps):
        ask = time.perf_counter()
        x, y = next(batches)
        waited += time.perf_counter() - ask
        step(x, y).item()  # .item(): wait for the step, as a loop that logs its loss does
        n += len(y)
    seconds = time.perf_counter() - start
    return n / seconds, waited / seconds


def build(name: str, cfg: config.TrainConfig, channels_last: bool):
    torch.manual_seed(0)
    model = models.build(name, 3, 10, 32)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, make_optimizer(cfg, model)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="small_cifar,resnet18,fast")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    cfg = config.build({}, {"dataset": "imagefolder", "data": args.data, "val_split": 5000, "momentum": 0.9})
    t0 = time.perf_counter()
    ds = data.load(cfg)
    print(f"data: {len(ds.train)} CIFAR-10 (JPEG) images decoded/cached in {time.perf_counter() - t0:.1f}s")
    train = ds.train
    mean, std = data.channel_stats(train)
    hw = choose_hardware(cfg)
    print(f"nnperf path: {hw.describe()}; reference: fp32, NCHW, DataLoader(num_workers=2)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} interleaved rounds\n")
    rows = []
    for name in args.models.split(","):
        batch_size, steps = PLAN.get(name, (128, 10))
        ref_model, ref_opt = build(name, cfg, channels_last=False)
        ref_step = reference_step(ref_model.train(), ref_opt)
        ref_batches = reference_batches(train, mean, std, batch_size)
        nn_model, nn_opt = build(name, cfg, hw.channels_last)
        nn_step_fn = TrainStep(nn_model.train(), nn_opt, None, hw.dev, hw.precision)
        nn_batches = nnperf_batches(data.Batches(train, batch_size, hw.dev, mean, std, shuffle=True,
                                                 augment=data.Augment(crop=True, flip="random", pad=4),
                                                 channels_last=hw.channels_last))
        ref, ours, wait = [], [], []
        for _ in range(args.rounds):
            ref.append(timed(ref_step, ref_batches, 2, steps)[0])
            ips, share = timed(lambda x, y: nn_step_fn(x, y)[0], nn_batches, 2, steps)
            ours.append(ips)
            wait.append(share)
        r, o = statistics.median(ref), statistics.median(ours)
        ratios = [b / a for a, b in zip(ref, ours)]
        rows.append((name, batch_size, r, o, statistics.median(ratios), min(ratios), max(ratios),
                     100 * statistics.median(wait)))
        del ref_batches  # stop the workers
    print(f"{'model':12s} {'batch':>5s} {'reference img/s':>16s} {'nnperf img/s':>13s} {'ratio':>6s} "
          f"{'(min-max)':>11s} {'input wait':>10s}")
    for name, bs, r, o, ratio, lo, hi, w in rows:
        print(f"{name:12s} {bs:5d} {r:16.0f} {o:13.0f} {ratio:5.2f}x {f'{lo:.2f}-{hi:.2f}':>11s} {w:9.1f}%")


if __name__ == "__main__":
    main()
