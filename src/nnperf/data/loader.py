"""Batches for training and evaluation from uint8 tensors.

The order of an epoch and the augmentation of each batch are derived from (seed, epoch, step)
alone, so a run resumed at any step sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from .augment import crop_flip, derive_seed, draw
from .sources import Split


class Batches:
    """Device-resident input: the whole split lives on the device as uint8; each batch is gathered,
    augmented and normalised there with batched tensor operations."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, mean: list[float], std: list[float], *,
                 shuffle: bool = False, augment: str = "none", pad: int = 0, seed: int = 0,
                 channels_last: bool = False):
        self.n = len(split)
        self.batch_size = batch_size
        self.device = device
        self.shuffle, self.augment, self.pad, self.seed = shuffle, augment, pad, seed
        self.channels_last = channels_last
        self.images, self.labels = self._place(split)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)

    def _place(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return split.images.to(self.device), split.labels.to(self.device)

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch)))

    def prepare(self, images: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """uint8 batch on the device -> augmented, normalised float batch."""
        if self.augment in ("crop", "crop-flip"):
            gen = torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, step))
            images = crop_flip(images, draw(len(images), self.pad, self.augment == "crop-flip", gen), self.pad)
        x = (images.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start`+1, ... of `epoch`."""
        order = self.order(epoch).to(self.images.device)
        for step in range(start, len(self)):
            index = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self.prepare(self.images[index], epoch, step), self.labels[index]


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        return self.split.images[i], self.split.labels[i]


class LoaderBatches(Batches):
    """A standard DataLoader (worker processes, pinned memory) gathers uint8 batches in host
    memory, for datasets too large for the device; augmentation and normalisation then run on the
    device exactly as in `Batches`, so both paths give the same batches."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, mean, std, *, workers: int = 0, **kw):
        self.workers = workers
        self.split = split
        super().__init__(split, batch_size, device, mean, std, **kw)

    def _place(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        return split.images, split.labels

    def epoch(self, epoch: int, start: int = 0):
        indices = self.order(epoch)[start * self.batch_size:].tolist()
        loader = DataLoader(_Indexed(self.split), batch_size=self.batch_size, sampler=indices,
                            num_workers=self.workers, pin_memory=self.device.type == "cuda")
        for step, (images, labels) in enumerate(loader, start):
            images = images.to(self.device, non_blocking=True)
            yield self.prepare(images, epoch, step), labels.to(self.device, non_blocking=True)
