"""Batched augmentation of uint8 image tensors: one gather for a whole batch, no per-image Python.

Random draws are made separately from their application, so that a per-image reference can be
checked against the batched version on the same draws.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any parts (run seed, epoch, step...): the same parts give the same seed."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class Draws:
    """Per-image random choices: crop offsets into the padded image, and whether to flip."""

    dy: torch.Tensor  # (N,) int64 in [0, 2*pad]
    dx: torch.Tensor  # (N,) int64 in [0, 2*pad]
    flip: torch.Tensor  # (N,) bool


def draw(n: int, pad: int, flip: bool, gen: torch.Generator) -> Draws:
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flips = torch.rand(n, generator=gen) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    return Draws(dy, dx, flips)


def crop_flip(images: torch.Tensor, d: Draws, pad: int) -> torch.Tensor:
    """Random crop with zero padding, then horizontal flip, for a (N,C,H,W) batch."""
    n, c, h, w = images.shape
    dev = images.device
    dy, dx, flips = d.dy.to(dev), d.dx.to(dev), d.flip.to(dev)
    if pad > 0:
        images = F.pad(images, (pad, pad, pad, pad))
    rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
    cols = torch.arange(w, device=dev).expand(n, w)
    # Flipping is reading the crop's columns right to left.
    cols = torch.where(flips[:, None], cols.flip(1), cols) + dx[:, None]
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(c, device=dev)[None, :, None, None]
    return images[batch, chan, rows, cols[:, None, None, :]]


def crop_flip_one(image: torch.Tensor, dy: int, dx: int, flip: bool, pad: int) -> torch.Tensor:
    """The straightforward per-image version of `crop_flip` (the reference for tests)."""
    _, h, w = image.shape
    padded = F.pad(image, (pad, pad, pad, pad)) if pad > 0 else image
    out = padded[:, dy:dy + h, dx:dx + w]
    return out.flip(2) if flip else out
