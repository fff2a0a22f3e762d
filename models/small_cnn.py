"""SmallCNN, the MNIST network of TRADES.

Zhang et al., "Theoretically Principled Trade-off between Robustness and
Accuracy", ICML 2019; https://github.com/yaodongyu/TRADES (models/small_cnn.py).
Four 3x3 valid convolutions with two 2x2 max-pools, then 200-200-num_classes
fully connected layers. Module names follow TRADES so its checkpoints load.

Differences from the TRADES file: the dropout between fc1 and fc2 is left out
(it holds no parameters, so state_dict keys are unchanged) to keep the forward
pass deterministic, and the flattened feature size is computed from image_size
instead of being fixed to 28x28 inputs.
"""
from collections import OrderedDict

import torch
from torch import nn


def feature_size(image_size: int) -> int:
    """Side length of the final feature map: two (conv3, conv3, pool2) stages, no padding."""
    s = image_size
    for _ in range(2):
        s = (s - 4) // 2
    return s


class SmallCNN(nn.Module):
    """conv32-conv32-pool-conv64-conv64-pool-fc200-fc200-fc(num_classes), ReLU activations."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, zero_last_layer: bool = True):
        super().__init__()
        s = feature_size(image_size)
        if s < 1:
            raise ValueError(f"SmallCNN needs images of at least 12x12 pixels, got {image_size}x{image_size}")
        self.num_features = 64 * s * s
        self.feature_extractor = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(in_channels, 32, 3)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 32, 3)),
            ("relu2", nn.ReLU()),
            ("maxpool1", nn.MaxPool2d(2, 2)),
            ("conv3", nn.Conv2d(32, 64, 3)),
            ("relu3", nn.ReLU()),
            ("conv4", nn.Conv2d(64, 64, 3)),
            ("relu4", nn.ReLU()),
            ("maxpool2", nn.MaxPool2d(2, 2)),
        ]))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(self.num_features, 200)),
            ("relu1", nn.ReLU()),
            ("fc2", nn.Linear(200, 200)),
            ("relu2", nn.ReLU()),
            ("fc3", nn.Linear(200, num_classes)),
        ]))

        # TRADES initialisation: He-normal convs with zero bias, and a zero last layer,
        # so every class starts with logit 0 (fc1/fc2 keep PyTorch's default init). An ADP ensemble's members
        # keep the default init there (zero_last_layer False): identical uniform members would start ADP's
        # log-determinant at its singular point, where its gradient is ~1/1e-6.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_last_layer:
            nn.init.zeros_(self.classifier.fc3.weight)
            nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.feature_extractor(x)
        return self.classifier(torch.flatten(features, 1))
