"""ResNet-50, pytorch style (stride on the 3x3 conv), frozen BN, torchvision/mmdet parameter names."""

from __future__ import annotations

import torch
from torch import nn

from gfocal_pipeline.constants import RESNET_BLOCKS
from gfocal_pipeline.nets.layers import FrozenBatchNorm2d


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = FrozenBatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = FrozenBatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                FrozenBatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """Returns C2..C5 (strides 4, 8, 16, 32); `out_indices=(0, 1, 2, 3)` as in the config."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = FrozenBatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index, blocks in enumerate(RESNET_BLOCKS):
            planes = 64 * 2**index
            stride = 1 if index == 0 else 2
            layer = []
            for block in range(blocks):
                layer.append(Bottleneck(in_channels, planes, stride if block == 0 else 1))
                in_channels = planes * Bottleneck.expansion
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        outs = []
        for index in range(len(RESNET_BLOCKS)):
            x = getattr(self, f"layer{index + 1}")(x)
            outs.append(x)
        return outs
