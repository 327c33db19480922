"""A 2-D convolution written with tensor operations (unfold + matmul), matching nn.Conv2d."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


class HandmadeConv2d(nn.Module):
    """Drop-in for nn.Conv2d (groups=1): same parameters, same initialisation, same outputs and
    gradients. Each output pixel is the dot product of the filter bank with the input patch under it,
    so unfolding every patch into a column turns the whole convolution into one matrix product."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 bias: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Conv2d's own initialisation, so both start from the same distribution.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
            nn.init.uniform_(self.bias, -bound, bound)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        def side(n, k, s, p, d):
            return (n + 2 * p - d * (k - 1) - 1) // s + 1
        return (side(h, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
                side(w, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        oh, ow = self.output_size(h, w)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
        # reshape, not view: a channels_last weight (the default layout on GPUs) is not viewable as (O, C*kh*kw).
        out = self.weight.reshape(self.out_channels, -1) @ cols  # (N, O, L)
        if self.bias is not None:
            out = out + self.bias.view(1, -1, 1)
        return out.view(n, self.out_channels, oh, ow)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}")
