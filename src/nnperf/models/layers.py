"""Layers shared by the models."""

from __future__ import annotations

import torch
from torch import nn


class GlobalAvgPool(nn.Module):
    """Mean over the spatial positions, (N, C, H, W) -> (N, C), whose gradient keeps the input's memory
    layout. nn.AdaptiveAvgPool2d(1) and x.mean((2, 3)) hand back an NCHW-contiguous gradient even for
    a channels_last input; the ReLU before them then runs its backward on mixed layouts, which on the
    CPU is ~30x slower than on matching ones (2.3 ms instead of 0.08 ms per step for small_cifar)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return x.permute(0, 2, 3, 1).mean((1, 2))
        return x.mean((2, 3))
