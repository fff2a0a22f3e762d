"""Model zoo: every network takes [0, 1] images and starts with its own Normalize layer.

Use `build_model`; it returns nn.Sequential(normalize=Normalize(mean, std), net=<network>),
so `model.net` is the bare network and `model(x)` maps (B, C, H, W) images in [0, 1]
to (B, num_classes) logits.
"""
from collections import OrderedDict
from typing import Sequence

from torch import nn

from .normalize import Normalize
from .resnet import ResNet, resnet18, resnet34
from .small_cnn import SmallCNN
from .vgg import VGG, vgg19
from .wideresnet import WideResNet

ARCHITECTURES = ("resnet18", "resnet34", "wrn-34-10", "wideresnet", "vgg19", "small-cnn")

__all__ = ["ARCHITECTURES", "build_model", "count_parameters", "Normalize",
           "ResNet", "WideResNet", "VGG", "SmallCNN"]


def _build_network(arch: str, num_classes: int, in_channels: int, image_size: int,
                   width: int, depth: int, widen_factor: int) -> nn.Module:
    if arch == "resnet18":
        return resnet18(num_classes, in_channels, width)
    if arch == "resnet34":
        return resnet34(num_classes, in_channels, width)
    if arch == "wrn-34-10":
        return WideResNet(34, 10, num_classes, in_channels)
    if arch == "wideresnet":
        return WideResNet(depth, widen_factor, num_classes, in_channels)
    if arch == "vgg19":
        return vgg19(num_classes, in_channels)
    if arch == "small-cnn":
        return SmallCNN(num_classes, in_channels, image_size)
    raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHITECTURES)}")


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int,
                mean: Sequence[float], std: Sequence[float], *,
                width: int = 64, depth: int = 34, widen_factor: int = 10) -> nn.Module:
    """Build `arch` behind a Normalize(mean, std) layer.

    `width` applies to the ResNets only, `depth`/`widen_factor` to "wideresnet" only;
    `image_size` matters only to "small-cnn" (the other networks pool adaptively).
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHITECTURES)}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values (one per input channel), "
                         f"got {len(mean)} and {len(std)}")
    net = _build_network(arch, num_classes, in_channels, image_size, width, depth, widen_factor)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in `model` (buffers such as BN statistics and mean/std excluded)."""
    return sum(p.numel() for p in model.parameters())
