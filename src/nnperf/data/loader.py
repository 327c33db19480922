"""Batches for training and evaluation from uint8 tensors.

The order of an epoch and the augmentation of each batch are derived from (seed, epoch, step)
alone, so a run resumed at any step sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler

from .augment import Augment, crop_flip, derive_seed, draw
from .sources import Split

# Keep a dataset on the GPU only while it takes at most this share of the free memory.
DEVICE_SHARE = 0.4
# Interpolations of the on-device resize (F.interpolate's modes; pretrained weights name one of them).
RESIZE_MODES = ("bilinear", "bicubic")


def resize(images: torch.Tensor, side: int, mode: str = "bilinear") -> torch.Tensor:
    """A normalised float batch resized to side x side on its device, in one batched call. Linear in
    the pixels, so resizing after normalising equals torchvision's Resize before it (on float
    pixels) while the per-channel arithmetic runs on the smaller images; antialiased like
    torchvision's Resize when shrinking. Keeps the batch's memory format."""
    if tuple(images.shape[2:]) == (side, side):
        return images
    fmt = torch.channels_last if images.is_contiguous(memory_format=torch.channels_last) and images.shape[1] > 1 \
        else torch.contiguous_format
    out = F.interpolate(images, size=(side, side), mode=mode, align_corners=False, antialias=True)
    return out.contiguous(memory_format=fmt)


def fits_on(device: torch.device, nbytes: int) -> bool:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return nbytes <= DEVICE_SHARE * free
    if device.type == "xpu":
        xpu = torch.xpu
        try:  # free memory where this torch can tell it (mem_get_info: torch 2.6+), else the total
            free = xpu.mem_get_info(device)[0] if hasattr(xpu, "mem_get_info") else \
                xpu.get_device_properties(device).total_memory
        except Exception:  # noqa: BLE001 - a driver without the query: the total is the best bound left
            free = xpu.get_device_properties(device).total_memory
        return nbytes <= DEVICE_SHARE * free
    return True


def draws_on_host(device: torch.device) -> bool:
    """Whether a batch's random draws are made by a host generator: on the CPU only (the numbers of
    CPU runs). On an accelerator they are made on the device by a device generator, since copying
    host draws to the device with a blocking `.to` waits for all queued work: a hidden sync per batch."""
    return device.type == "cpu"


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`, copied without waiting for the device's queued work where that is
    safe: from pinned memory with non_blocking on CUDA (and ROCm). On other accelerators a plain,
    blocking copy (MPS corrupts non_blocking copies from pageable memory): the tensor path only
    copies the epoch's order there, once per epoch; the DataLoader path copies each batch."""
    if t.device.type != "cpu":
        return t.to(device, non_blocking=True)
    if device.type == "cpu":
        return t
    if device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class Shard:
    """Which part of each batch this process takes when several train one model: `rank` of `world`
    takes its contiguous share of the rows of every global batch (training), or, with
    `whole_batches`, every world-th batch whole (evaluation: each batch exactly as one process
    evaluates it). The draws are made for the whole global batch and sliced, so the ranks together
    see exactly the images, crops and flips of one process."""

    rank: int = 0
    world: int = 1
    whole_batches: bool = False

    def takes(self, step: int) -> bool:
        return not self.whole_batches or step % self.world == self.rank

    def rows(self, n: int) -> slice:
        if self.whole_batches or self.world == 1:
            return slice(0, n)
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)


class Batches:
    """Device-resident input: the whole split lives on the device as uint8 (or in pinned host
    memory when it does not fit); each batch is gathered, augmented and normalised on the device
    with batched tensor operations."""

    def __init__(self, split: Split, batch_size: int, device: torch.device, mean: list[float], std: list[float], *,
                 shuffle: bool = False, augment: Augment = Augment(), seed: int = 0, channels_last: bool = False,
                 shard: Shard | None = None, resize: tuple[int, str] | None = None):
        self.n = len(split)
        self.resize = resize  # (side, interpolation): the model's input size, when it is not the stored one
        self.batch_size = batch_size
        self.shard = shard or Shard()
        self.device = device
        self.shuffle, self.augment, self.seed = shuffle, augment, seed
        self.channels_last = channels_last
        self.images, self.labels = self._place(split)
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(std, device=device).view(1, -1, 1, 1) * 255)
        flip_gen = torch.Generator().manual_seed(derive_seed(seed, "flip"))
        self.flip_base = torch.rand(self.n, generator=flip_gen) < 0.5  # per image, for alternating flips
        self._flip_base_dev: torch.Tensor | None = None  # its copy on the device, made once
        self._copy_stream: CopyStream | None = None  # made on first use, for batches from host memory

    def _place(self, split: Split) -> tuple[torch.Tensor, torch.Tensor]:
        if fits_on(self.device, split.images.numel()):
            return split.images.to(self.device), split.labels.to(self.device)
        # Stays in pageable host memory: each batch is gathered into pinned memory (no pinned copy
        # of the whole split, which would double its host memory).
        return split.images, split.labels

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(derive_seed(self.seed, "order", epoch)))

    def _flip_base_on(self, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return self.flip_base
        if self._flip_base_dev is None:
            self._flip_base_dev = to_device(self.flip_base, device)
        return self._flip_base_dev

    def prepare(self, images: torch.Tensor, index: torch.Tensor, epoch: int, step: int,
                rows: slice | None = None) -> torch.Tensor:
        """uint8 batch on the device (dataset indices `index`, on the host or the device) ->
        augmented, normalised float batch (resized to the model's input size, if that differs). The draws come from a generator seeded from (seed,
        epoch, step), on the host for CPU runs and on the images' device otherwise: no per-batch
        host->device copy, and a resumed run draws exactly what an uninterrupted one would. With
        `rows`, `index` is the whole global batch and `images` its `rows`: the draws are made for
        all of it and sliced."""
        a = self.augment
        if a.active:
            pad = a.pad if a.crop else 0
            gen_device = torch.device("cpu") if draws_on_host(self.device) else images.device
            gen = torch.Generator(device=gen_device).manual_seed(derive_seed(self.seed, "augment", epoch, step))
            d = draw(len(index), pad, a.flip == "random", gen, tuple(images.shape[2:]), a.cutout)
            if rows is not None:
                d, index = d.rows(rows), index[rows]
            if a.flip == "alternate":
                if index.device.type != gen_device.type:  # a caller's index from the other side
                    index = index.to(gen_device)
                d.flip = self._flip_base_on(gen_device)[index] ^ bool(epoch % 2)
            images = crop_flip(images, d, pad, a.pad_mode, a.cutout)
        if self.channels_last:  # reorder the uint8 pixels: a quarter of the bytes of the float batch
            images = images.contiguous(memory_format=torch.channels_last)
        images = images.float().sub_(self.mean).mul_(self.inv_std)
        return resize(images, *self.resize) if self.resize else images

    def _index(self, order: torch.Tensor, step: int) -> torch.Tensor:
        return order[step * self.batch_size:(step + 1) * self.batch_size]

    def _order_for_draws(self, order: torch.Tensor) -> torch.Tensor:
        """The epoch's order where the draws are made (copied once per epoch, not per batch)."""
        return order if draws_on_host(self.device) else to_device(order, self.device)

    def _fetch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, labels)[index] on the device. From host memory (a split too large for the GPU)
        the batch is gathered into pinned memory and copied on the copy stream."""
        if self.images.device.type != "cpu" or self.device.type != "cuda":
            return to_device(self.images[index], self.device), to_device(self.labels[index], self.device)
        return self._copies.copy(*(_gather_pinned(t, index) for t in (self.images, self.labels)))

    @property
    def _copies(self) -> CopyStream:
        if self._copy_stream is None:
            self._copy_stream = CopyStream(self.device)
        return self._copy_stream

    def epoch(self, epoch: int, start: int = 0,
              fetched: Callable[[], None] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `start`, `start`+1, ... of `epoch`. `fetched` is called once a batch's pixels are
        on the device (queued), before its augmentation: the input wait is timed up to there."""
        order = self.order(epoch)
        order_draws = self._order_for_draws(order)
        same = order_draws.device.type == self.images.device.type
        order_here = order_draws if same else to_device(order, self.images.device)  # where the images are
        for step in (s for s in range(start, len(self)) if self.shard.takes(s)):
            index = self._index(order_here, step)
            rows = self.shard.rows(len(index))
            images, labels = self._fetch(index[rows])
            if fetched is not None:
                fetched()
            yield self.prepare(images, self._index(order_draws, step), epoch, step, rows), labels

    def global_rows(self, step: int) -> int:
        """Images in global batch `step` (the last one of an epoch may be short)."""
        return min(self.batch_size, self.n - step * self.batch_size)


def _gather_pinned(source: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """source[index] into pinned host memory, so that its copy to the GPU can be asynchronous. The
    buffer comes from PyTorch's caching host allocator, which hands a block out again once the
    copies that read it have finished (it records an event on the copying stream): one reused
    pool of pinned buffers, no allocation by the driver per batch, never overwritten mid-copy."""
    out = torch.empty((len(index), *source.shape[1:]), dtype=source.dtype, pin_memory=True)
    return torch.index_select(source, 0, index, out=out)


class CopyStream:
    """Host->GPU copies on their own CUDA (or HIP) stream, so that the next batch's copy runs while
    the current step still computes on the default stream (a copy queued on the default stream
    would wait for the step to finish). The compute stream waits for the copies before it uses
    them, and each copy is marked as used there, so the allocator does not reuse its memory while
    the compute stream may still read it. The pattern of NVIDIA Apex's data prefetcher."""

    def __init__(self, device: torch.device, cuda=torch.cuda):
        self.device, self.cuda = device, cuda
        self.stream = cuda.Stream(device)

    def copy(self, *pinned: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with self.cuda.stream(self.stream):
            out = tuple(t.to(self.device, non_blocking=True) for t in pinned)
        compute = self.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for t in out:
            t.record_stream(compute)
        return out


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

    def epoch(self, epoch: int, start: int = 0, fetched: Callable[[], None] | None = None):
        order = self.order(epoch)
        order_draws = self._order_for_draws(order)
        self.sampler.indices = order[start * self.batch_size:].tolist()
        for step, (images, labels) in enumerate(self.loader, start):
            if not self.shard.takes(step):
                continue
            rows = self.shard.rows(len(labels))
            images, labels = images[rows], labels[rows]
            # Pinned by the DataLoader on CUDA: copied on the copy stream, overlapping the step.
            if self.device.type == "cuda":
                images, labels = self._copies.copy(images, labels)
            else:
                images, labels = to_device(images, self.device), to_device(labels, self.device)
            if fetched is not None:
                fetched()
            yield self.prepare(images, self._index(order_draws, step), epoch, step, rows), labels
