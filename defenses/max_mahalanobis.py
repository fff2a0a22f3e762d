"""Max-Mahalanobis centers, and the two heads built on them: MM-LDA (Pang et al., ICML 2018) and the MMC
loss (Pang et al., ICLR 2020). docs/method.md section 12 gives the formulas and the authors' settings.

The network's last linear layer outputs a d-dimensional feature z (the "Dense(d) after pooling" of the
authors' code); the C_MM-scaled Max-Mahalanobis centers mu_1..mu_L are a fixed buffer, never trained.
    MM-LDA  logits z . mu_i                  loss: cross-entropy on them (a frozen, bias-free last layer)
    MMC     logits -||z - mu_i||^2           loss: 1/2 ||z - mu_y||^2, no softmax; prediction: the nearest center
Both expose those logits as the model's output, so attacks, AutoAttack and NAMID see one logits(x) whose
argmax is the prediction. MMC's logits are all <= 0 and differ by ~10^2 between classes: softmax-CE on
them is saturated, which is why its evaluation needs margin attacks (utils/evaluation.py).
No library implements these (torchattacks, advertorch, ART, RobustBench checked), hence written here.
"""
import math

import torch
from torch import nn

HEADS = ("mm-lda", "mmc")


def max_mahalanobis_centers(num_classes: int, dim: int, scale: float = 10.0) -> torch.Tensor:
    """(L, d) centers of norm `scale` with pairwise inner products -scale^2/(L-1): a regular simplex, built by
    the authors' recursion (craft_MMcenters.m) in float64: mu_0 = e_0; row k solves <mu_k, mu_j> = -1/(L-1)
    for j < k in its first k coordinates and takes the rest of the unit norm on coordinate k."""
    if num_classes < 2:
        raise ValueError(f"Max-Mahalanobis centers need at least 2 classes, got {num_classes}")
    if dim < num_classes:
        raise ValueError(f"Max-Mahalanobis centers need a feature dimension >= the number of classes "
                         f"({num_classes}), got {dim}")
    mu = torch.zeros(num_classes, dim, dtype=torch.float64)
    mu[0, 0] = 1.0
    for k in range(1, num_classes):
        for j in range(k):
            mu[k, j] = -(1.0 / (num_classes - 1) + mu[k] @ mu[j]) / mu[j, j]
        mu[k, k] = math.sqrt(abs(1.0 - float(mu[k] @ mu[k])))
    return scale * mu


class MaxMahalanobisHead(nn.Module):
    """features: a network whose output is the d-dimensional z; kind: mm-lda or mmc (module docstring)."""

    def __init__(self, features: nn.Module, kind: str, num_classes: int, feature_dim: int, scale: float):
        super().__init__()
        if kind not in HEADS:
            raise ValueError(f"unknown Max-Mahalanobis head {kind!r}; choose one of {HEADS}")
        self.features, self.kind = features, kind
        self.register_buffer("centers", max_mahalanobis_centers(num_classes, feature_dim, scale).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x).float()  # the squared distances lose too much in bf16
        if self.kind == "mm-lda":
            return z @ self.centers.t()
        return -squared_distances(z, self.centers)


def squared_distances(z: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """(B, L) ||z_b - mu_l||^2, computed as a difference (not ||z||^2 - 2 z.mu + ||mu||^2, which cancels badly
    near a center: the MMC loss is minimised exactly there)."""
    return (z[:, None, :] - centers[None]).pow(2).sum(dim=-1)


def mmc_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The MMC loss 1/2 ||z - mu_y||^2 averaged over the batch, from the MMC logits -||z - mu||^2."""
    return -0.5 * logits.gather(1, y[:, None]).mean()
