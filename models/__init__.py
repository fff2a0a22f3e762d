"""Model zoo: every network takes [0, 1] images and starts with its own Normalize layer.

Use `build_model`; it returns nn.Sequential(normalize=Normalize(mean, std), net=<network>),
so `model.net` is the bare network and `model(x)` maps (B, C, H, W) images in [0, 1]
to (B, num_classes) logits. With another `head` (defenses/__init__.py), `model.net` is that head around
the network: a Max-Mahalanobis head (mm-lda, mmc) whose network outputs `feature_dim` features, or an
ADP ensemble of `members` networks, or the RCE wrapper that returns -network(x); `model(x)` still returns
the logits whose argmax is the prediction.
"""
from collections import OrderedDict
from typing import Sequence

from torch import nn

from defenses import HEAD_NAMES
from defenses.adp import Ensemble
from defenses.max_mahalanobis import MaxMahalanobisHead
from defenses.rce import ReversedLogits
from .normalize import Normalize
from .resnet import ResNet, resnet18, resnet20, resnet32, resnet34
from .small_cnn import SmallCNN
from .vgg import VGG, vgg19
from .wideresnet import WideResNet

ARCHITECTURES = ("resnet18", "resnet34", "resnet20", "resnet32", "wrn-34-10", "wideresnet", "vgg19", "small-cnn")
# first-stage channels when --width is not given: the papers' (He et al. 2016)
DEFAULT_WIDTH = {"resnet20": 16, "resnet32": 16}  # every other ResNet: 64

__all__ = ["ARCHITECTURES", "DEFAULT_WIDTH", "HEAD_NAMES", "build_model", "count_parameters", "Normalize",
           "ResNet", "WideResNet", "VGG", "SmallCNN"]


def _build_network(arch: str, num_classes: int, in_channels: int, image_size: int,
                   width: int, depth: int, widen_factor: int, ensemble_member: bool = False) -> nn.Module:
    if arch == "resnet18":
        return resnet18(num_classes, in_channels, width)
    if arch == "resnet34":
        return resnet34(num_classes, in_channels, width)
    if arch == "resnet20":
        return resnet20(num_classes, in_channels, width)
    if arch == "resnet32":
        return resnet32(num_classes, in_channels, width)
    if arch == "wrn-34-10":
        return WideResNet(34, 10, num_classes, in_channels)
    if arch == "wideresnet":
        return WideResNet(depth, widen_factor, num_classes, in_channels)
    if arch == "vgg19":
        return vgg19(num_classes, in_channels)
    if arch == "small-cnn":
        return SmallCNN(num_classes, in_channels, image_size, zero_last_layer=not ensemble_member)
    raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHITECTURES)}")


def _build_head(head: str, arch: str, num_classes: int, feature_dim: int, mm_scale: float, members: int,
                **network) -> nn.Module:
    if head == "softmax":
        return _build_network(arch, num_classes, **network)
    if head in ("mm-lda", "mmc"):
        # The network's last linear layer becomes the Dense(d) that outputs the feature z.
        return MaxMahalanobisHead(_build_network(arch, feature_dim, **network), head, num_classes, feature_dim, mm_scale)
    if head == "rce":
        # The network outputs Z; the model's logits are -Z (its prediction is argmin Z).
        return ReversedLogits(_build_network(arch, num_classes, **network))
    if head == "adp":
        if members < 2:
            raise ValueError(f"an ADP ensemble needs at least 2 members, got {members}")
        return Ensemble([_build_network(arch, num_classes, **network, ensemble_member=True) for _ in range(members)])
    raise ValueError(f"unknown head '{head}'; choose one of: {', '.join(HEAD_NAMES)}")


def build_model(arch: str, num_classes: int, in_channels: int, image_size: int,
                mean: Sequence[float], std: Sequence[float], *,
                width: int = 64, depth: int = 34, widen_factor: int = 10, head: str = "softmax",
                feature_dim: int = 256, mm_scale: float = 10.0, members: int = 3) -> nn.Module:
    """Build `arch` behind a Normalize(mean, std) layer, with the given head.

    `width` applies to the ResNets only, `depth`/`widen_factor` to "wideresnet" only;
    `image_size` matters only to "small-cnn" (the other networks pool adaptively); `feature_dim` and
    `mm_scale` (the centers' norm C_MM) to the mm-lda and mmc heads, `members` to adp.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}'; choose one of: {', '.join(ARCHITECTURES)}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(f"mean and std need {in_channels} values (one per input channel), "
                         f"got {len(mean)} and {len(std)}")
    net = _build_head(head, arch, num_classes, feature_dim, mm_scale, members, in_channels=in_channels,
                      image_size=image_size, width=width, depth=depth, widen_factor=widen_factor)
    return nn.Sequential(OrderedDict(normalize=Normalize(mean, std), net=net))


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters in `model` (buffers such as BN statistics and mean/std excluded)."""
    return sum(p.numel() for p in model.parameters())
