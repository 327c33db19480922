"""Model registry: every entry builds a model from the dataset's shape and class count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..errors import UsageError
from . import pretrained as library
from .fast import FastNet
from .resnet import cifar_resnet
from .small import ConvNet3, SmallCNN


@dataclass(frozen=True)
class ModelSpec:
    """in_channels, num_classes, image_size, width (None: the model's default), conv_impl -> model."""

    build: Callable[..., nn.Module]
    summary: str


REGISTRY: dict[str, ModelSpec] = {
    "small_cifar": ModelSpec(lambda c, k, s, w, impl: SmallCNN(c, k, w or 32),
                             "small from-scratch CNN: 5 conv+BN layers, global pooling (--width, default 32)"),
    "convnet3": ModelSpec(lambda c, k, s, w, impl: ConvNet3(c, k, s, w or 32, impl),
                          "3 conv + max-pool, 2 dropout, 3 fully-connected layers; --conv-impl handmade"),
    "fast": ModelSpec(lambda c, k, s, w, impl: FastNet(c, k, (w, 4 * w, 4 * w) if w else (64, 256, 256)),
                      "airbench-class speed-record net: whitening 2x2 conv, 3 conv groups, BN+GELU (--width 64)"),
    "resnet18": ModelSpec(lambda c, k, s, w, impl: cifar_resnet(18, c, k), "ResNet-18, CIFAR stem (11.2M params)"),
    "resnet34": ModelSpec(lambda c, k, s, w, impl: cifar_resnet(34, c, k), "ResNet-34, CIFAR stem (21.3M params)"),
}


def names() -> list[str]:
    return list(REGISTRY)


def known(name: str) -> bool:
    """One of nnperf's models, or a name of the torchvision/timm families (checked when built)."""
    return name in REGISTRY or library.is_library(name)


def describe() -> str:
    own = "\n".join(f"  {name:12s} {spec.summary}" for name, spec in REGISTRY.items())
    return own + "\n" + library.describe()


def build(name: str, in_channels: int, num_classes: int, image_size: int, width: int | None = None,
          conv_impl: str = "torch", pretrained: bool = False) -> nn.Module:
    """The model for images of `in_channels` x `image_size` and `num_classes`; `pretrained` (tv:,
    timm: and effnet_lite0 models only): with its library's default weights, the head new."""
    if library.is_library(name):
        return library.build(name, in_channels, num_classes, pretrained)  # checks the name first
    if name not in REGISTRY:
        raise UsageError(f"--model: unknown model '{name}' (choose from {', '.join(REGISTRY)}, "
                         f"{library.EFFNET}, or tv:NAME / timm:NAME in lower case: nnperf train --model help)")
    if name == "convnet3" and image_size < 8:
        raise UsageError(f"--model convnet3: needs images of at least 8x8 pixels, got {image_size}")
    return REGISTRY[name].build(in_channels, num_classes, image_size, width, conv_impl)
