"""Small from-scratch CNNs: `small_cifar` and `convnet3`."""

from __future__ import annotations

import torch
from torch import nn

from .handconv import HandmadeConv2d
from .layers import GlobalAvgPool


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Five 3x3 conv+BN+ReLU layers in three stages (width, 2x, 4x channels), global pooling, one
    linear layer: about 0.3M parameters at width 32, fast enough to train on a laptop CPU."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            conv_bn(in_channels, w), conv_bn(w, w), nn.MaxPool2d(2),
            conv_bn(w, 2 * w), conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            conv_bn(2 * w, 4 * w), GlobalAvgPool(),
        )
        self.head = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ConvNet3(nn.Module):
    """The classic course network: 3 conv layers with max-pooling, 2 dropout layers, 3 fully
    connected layers. `conv_impl="handmade"` swaps nn.Conv2d for the unfold+matmul version."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 32,
                 conv_impl: str = "torch"):
        super().__init__()
        conv = HandmadeConv2d if conv_impl == "handmade" else nn.Conv2d
        w = width
        self.features = nn.Sequential(
            conv(in_channels, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            conv(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            conv(2 * w, 4 * w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.25),
        )
        side = image_size // 8
        self.classifier = nn.Sequential(
            nn.Linear(4 * w * side * side, 8 * w), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(8 * w, 4 * w), nn.ReLU(inplace=True),
            nn.Linear(4 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
