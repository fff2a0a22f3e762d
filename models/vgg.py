"""VGG-19 with batch normalisation.

Simonyan & Zisserman, "Very Deep Convolutional Networks for Large-Scale Image
Recognition", ICLR 2015, in the CIFAR form of https://github.com/kuangliu/pytorch-cifar
(models/vgg.py): sixteen 3x3 conv-BN-ReLU layers, five max-pools and a single
Linear(512, num_classes). Max-pools use ceil_mode=True and an adaptive average
pool precedes the classifier, so 28x28 (-> 1x1), 32x32 (-> 1x1) and 64x64
(-> 2x2, then pooled) inputs all work.
"""
import torch
from torch import nn

VGG19_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                512, 512, 512, 512, "M", 512, 512, 512, 512, "M")


class VGG(nn.Module):
    """VGG feature stack from `config` (ints are conv widths, "M" a 2x2 max-pool) plus one linear layer."""

    def __init__(self, config=VGG19_CONFIG, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers = []
        channels = in_channels
        for v in config:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1),
                           nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.features(x))
        return self.classifier(torch.flatten(out, 1))


def vgg19(num_classes: int = 10, in_channels: int = 3) -> VGG:
    """VGG-19-BN (configuration E of the paper)."""
    return VGG(VGG19_CONFIG, num_classes=num_classes, in_channels=in_channels)
