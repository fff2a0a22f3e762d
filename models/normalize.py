"""Per-channel input normalisation as the first layer of every model.

Images enter the models in [0, 1] pixel space, so attacks and epsilon balls are
defined on raw pixels; the dataset mean/std live inside the model instead of in
the data pipeline.
"""
from typing import Sequence

import torch
from torch import nn


class Normalize(nn.Module):
    """Compute (x - mean) / std per channel, with mean and std as (1, C, 1, 1) buffers."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() != std.numel():
            raise ValueError(f"mean has {mean.numel()} channels but std has {std.numel()}")
        if not bool((std > 0).all()):
            raise ValueError(f"std must be positive, got {std.tolist()}")
        # Buffers, not parameters: they follow .to(device) and land in the state_dict but are never trained.
        self.register_buffer("mean", mean.view(1, -1, 1, 1))
        self.register_buffer("std", std.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
