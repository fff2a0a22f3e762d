"""ResNets for small images (the CIFAR variants).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016. ResNet-18 / ResNet-34 are adapted
to 32x32 inputs as in https://github.com/kuangliu/pytorch-cifar (models/resnet.py): a 3x3 stride-1 stem
with no max-pool, BasicBlocks in four stages with strides 1, 2, 2, 2; module names follow that repository
so its checkpoints load. ResNet-20 / ResNet-32 are the paper's own CIFAR networks (its section 4.2): three
stages of n BasicBlocks (depth 6n + 2) with 16, 32, 64 channels, the networks of the seed talk's papers
(ADP's members are ResNet-20s; MMC and RCE report a "ResNet-32"). Where the channels change, the shortcut is
a 1x1 conv-BN projection here, as in ResNet-18, where the paper padded with zeros (its option A) and the
ADP authors' Keras ResNet-v1 used a 1x1 conv without BN: 2 752 parameters more than the paper's 0.27M.
Global adaptive average pooling makes every network accept 28x28, 32x32 and 64x64 inputs alike. `width`
sets the channels of the first stage (64 for ResNet-18/34, 16 for ResNet-20/32 in the paper); each later
stage doubles them.
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
        if len(num_blocks) not in (3, 4):
            raise ValueError(f"ResNet needs block counts for 3 or 4 stages, got {list(num_blocks)}")
        if width < 1:
            raise ValueError(f"ResNet width must be a positive integer, got {width}")
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.stages = len(num_blocks)
        for index, blocks in enumerate(num_blocks):  # layer1 ... layer4, as in pytorch-cifar
            setattr(self, f"layer{index + 1}", self._make_layer(width * 2 ** index, blocks, stride=1 if index == 0 else 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(width * 2 ** (self.stages - 1), num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for block_stride in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, block_stride))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        for index in range(self.stages):
            out = getattr(self, f"layer{index + 1}")(out)
        return self.linear(torch.flatten(self.pool(out), 1))


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-18: stages of [2, 2, 2, 2] BasicBlocks."""
    return ResNet([2, 2, 2, 2], num_classes=num_classes, in_channels=in_channels, width=width)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    """ResNet-34: stages of [3, 4, 6, 3] BasicBlocks."""
    return ResNet([3, 4, 6, 3], num_classes=num_classes, in_channels=in_channels, width=width)


def resnet20(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-20 (He et al. section 4.2, n = 3): stages of [3, 3, 3] BasicBlocks."""
    return ResNet([3, 3, 3], num_classes=num_classes, in_channels=in_channels, width=width)


def resnet32(num_classes: int = 10, in_channels: int = 3, width: int = 16) -> ResNet:
    """ResNet-32 (He et al. section 4.2, n = 5): stages of [5, 5, 5] BasicBlocks."""
    return ResNet([5, 5, 5], num_classes=num_classes, in_channels=in_channels, width=width)
