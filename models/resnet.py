"""ResNet-18 / ResNet-34 for small images (the CIFAR variant).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, adapted
to 32x32 inputs as in https://github.com/kuangliu/pytorch-cifar (models/resnet.py):
a 3x3 stride-1 stem with no max-pool, BasicBlocks in four stages with strides
1, 2, 2, 2. Module names follow that repository so its checkpoints load.
Global adaptive average pooling makes the network accept 28x28, 32x32 and 64x64
inputs alike. `width` sets the channels of the first stage (64 in the paper);
the stages use width, 2*width, 4*width, 8*width.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 conv-BN projection) shortcut."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet built from BasicBlocks; `num_blocks` gives the blocks per stage."""

    def __init__(self, num_blocks: Sequence[int], num_classes: int = 10, in_channels: int = 3, width: int = 64):
        super().__init__()
        if len(num_blocks) != 4:
            raise ValueError(f"ResNet needs block counts for 4 stages, got {list(num_blocks)}")
        if width < 1:
            raise ValueError(f"ResNet width must be a positive integer, got {width}")
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = self._make_layer(width, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(2 * width, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * width, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(8 * width, num_blocks[3], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * width, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(torch.flatten(self.pool(out), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18: stages of [2, 2, 2, 2] BasicBlocks."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, width=width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-34: stages of [3, 4, 6, 3] BasicBlocks."""
    return ResNet([3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, width=width)
