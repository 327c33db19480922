"""ResNet-18/34 from torchvision with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool,
so 32x32 inputs keep their resolution into the first stage."""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet

from .layers import GlobalAvgPool


def cifar_resnet(depth: int, in_channels: int, num_classes: int) -> nn.Module:
    model = {18: resnet.resnet18, 34: resnet.resnet34}[depth](weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    model.avgpool = GlobalAvgPool()  # keeps channels_last gradients channels_last
    return model
