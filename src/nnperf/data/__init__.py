"""Datasets as uint8 tensors, and the batches built from them."""

from __future__ import annotations

import torch

from .augment import Augment
from .info import DataInfo
from .loader import Batches, LoaderBatches, Shard
from .sources import Dataset, Source, Split, holdout, load, names

__all__ = ["Augment", "DataInfo", "Batches", "LoaderBatches", "Shard", "Dataset", "Source", "Split", "holdout", "load", "names",
           "channel_stats", "choose_augment", "make_batches"]

# Centred 28x28 grayscale sets: on short runs crops and flips cost more than they add
# (small_cifar, Fashion-MNIST, 3 epochs: 0.921 top-1 without, 0.906 with crop+flip), and a
# mirrored digit is another symbol. Pass --augment to choose otherwise.
_NO_AUGMENT = {"mnist", "fashion-mnist"}


def channel_stats(split: Split, max_images: int = 10_000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std on 0-1 pixels, from (at most `max_images` of) the training split."""
    x = split.images[:max_images].float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()


def choose_augment(kind: str, dataset: str, image_size: int, *, crop_pad: int | None = None,
                   flip: str = "random", pad_mode: str = "zero", cutout: int = 0) -> Augment:
    """The training augmentation `--augment kind` means; `auto` is crop+flip except for the MNIST
    family. The crop pads 4 pixels from 32x32 up, else 2, unless `crop_pad` says otherwise."""
    if kind == "auto":
        kind = "none" if dataset in _NO_AUGMENT else "crop-flip"
    pad = crop_pad if crop_pad is not None else (4 if image_size >= 32 else 2)
    return Augment(crop=kind in ("crop", "crop-flip"), flip=flip if kind == "crop-flip" else None,
                   pad=pad, pad_mode=pad_mode, cutout=cutout)


def make_batches(split: Split, batch_size: int, device: torch.device, mean, std, *, loader: str = "tensor",
                 workers: int = 0, **kw) -> Batches:
    if loader == "torch":
        return LoaderBatches(split, batch_size, device, mean, std, workers=workers, **kw)
    return Batches(split, batch_size, device, mean, std, **kw)
