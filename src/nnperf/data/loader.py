"""Batches for training and evaluation from uint8 tensors.

The order of an epoch and the augmentation of each batch are derived from (seed, epoch, step)
alone, so a run resumed at any step sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from .augment import Augment, crop_flip, derive_seed, draw
from .sources import Split

# Keep a dataset on the GPU only while it takes at most this share of the free memory.
DEVICE_SHARE = 0.4


def fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= DEVICE_SHARE * free
    return True


class Batches:
    """Device-resident input: the whole split lives on the device as uint8 (or in pinned host
    memory when it does not fit); each batch is gathered, augmented and normalised on the device
    with batched tensor operations."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, mean: list[float], std: list[float], *,
                 shuffle: bool = False, augment: Augment = Augment(), seed: int = 0, channels_last: bool = False):
        self.n = len(split)
        self.batch_size = batch_size
        self.device = device
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.channels_last = channels_last
        self.images, self.labels = self._place(split)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
        flip_gen = torch.Generator().manual_seed(derive_seed(seed, "flip"))
        self.flip_base = torch.rand(self.n, generator=flip_gen) < 0.5  # per image, for alternating flips

    def _place(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        if fits_on(self.device, split.images.numel()):
            return split.images.to(self.device), split.labels.to(self.device)
        pinned = split.images.pin_memory() if self.device.type == "cuda" else split.images
        return pinned, split.labels

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch)))

    def prepare(self, images: torch.Tensor, index: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """uint8 batch on the device (dataset indices `index`) -> augmented, normalised float batch."""
        a = self.augment
        if a.active:
            pad = a.pad if a.crop else 0
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, step))
            d = draw(len(images), pad, a.flip == "random", gen, tuple(images.shape[2:]), a.cutout)
            if a.flip == "alternate":
                d.flip = self.flip_base[index.cpu()] ^ bool(epoch % 2)
            images = crop_flip(images, d, pad, a.pad_mode, a.cutout)
        if self.channels_last:  # reorder the uint8 pixels: a quarter of the bytes of the float batch
            images = images.contiguous(memory_format=torch.channels_last)
        return images.float().sub_(self.mean).mul_(self.inv_std)

    def _index(self, order: torch.Tensor, step: int) -> torch.Tensor:
        return order[step * self.batch_size:(step + 1) * self.batch_size]

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start`+1, ... of `epoch`."""
        order = self.order(epoch)
        order_here = order.to(self.images.device)
        for step in range(start, len(self)):
            index = self._index(order_here, step)
            images = self.images[index].to(self.device, non_blocking=True)
            labels = self.labels[index].to(self.device, non_blocking=True)
            yield self.prepare(images, self._index(order, step), epoch, step), labels


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.images[i], self.split.labels[i]


class _Order(Sampler):
    """The sampler of a persistent DataLoader: set to each epoch's order before iterating."""

    def __init__(self):
        self.indices: list[int] = []

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class LoaderBatches(Batches):
    """A standard DataLoader (persistent worker processes, pinned memory) gathers uint8 batches in
    host memory, for datasets too large for the device; augmentation and normalisation then run on
    the device exactly as in `Batches`, so both paths give the same batches."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, mean, std, *, workers: int = 0, **kw):
        super().__init__(split, batch_size, device, mean, std, **kw)
        self.sampler = _Order()
        self.loader = DataLoader(_Indexed(split), batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                 pin_memory=device.type == "cuda", persistent_workers=workers > 0)

    def _place(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return split.images, split.labels

    def epoch(self, epoch: int, start: int = 0):
        order = self.order(epoch)
        self.sampler.indices = order[start * self.batch_size:].tolist()
        for step, (images, labels) in enumerate(self.loader, start):
            images = images.to(self.device, non_blocking=True)
            yield self.prepare(images, self._index(order, step), epoch, step), labels.to(self.device, non_blocking=True)
