"""The DIM-style local mutual-information estimator of docs/method.md section 3 (after Hjelm et al. 2019,
Zhu et al. 2020).

An estimator pairs a local encoder C, applied to an image-shaped input u (a natural image x or an
adversarial pattern n = x~ - x), with a global head G, applied to the target's logits h(v). The
score of global vector i against local patch k of sample j is <G(h(v_i)), C(u_j)[:, k]>.
"""
import torch
from torch import nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of a (B, C, H, W) map."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x):
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Residual1x1Block(nn.Module):
    """1x1 conv -> BN -> ReLU -> 1x1 conv, plus a 1x1 linear shortcut started close to the identity,
    then LayerNorm over channels (DIM's MI1x1ConvNet)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.nonlinear = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels),
                                       nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 1))
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = ChannelLayerNorm(out_channels)
        with torch.no_grad():
            self.shortcut.weight.uniform_(-0.01, 0.01)
            if out_channels >= in_channels:
                eye = torch.eye(out_channels, in_channels, dtype=torch.bool)[:, :, None, None]
                self.shortcut.weight.masked_fill_(eye, 1.0)

    def forward(self, x):
        return self.norm(self.nonlinear(x) + self.shortcut(x))


class LocalEncoder(nn.Module):
    """C_phi: two 4x4 stride-2 convolutions (in -> 64 -> 128, BN, ReLU) and a residual 1x1 block to hsize.

    A 32x32 input gives an (hsize, 8, 8) map, a 28x28 input (hsize, 7, 7): one local vector per patch.
    """

    def __init__(self, in_channels: int, hsize: int):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, 64, 4, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.Conv2d(64, 128, 4, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU(inplace=True))
        self.block = Residual1x1Block(128, hsize)

    def forward(self, u):
        """(B, C, H, W) -> (B, hsize, K) with K = (H/4) * (W/4) local vectors."""
        return self.block(self.convs(u)).flatten(2)


class GlobalHead(nn.Module):
    """G_phi: the residual 1x1 block from the target's logits (B, num_classes) to one hsize vector."""

    def __init__(self, num_classes: int, hsize: int):
        super().__init__()
        self.block = Residual1x1Block(num_classes, hsize)

    def forward(self, logits):
        return self.block(logits[:, :, None, None]).flatten(1)


class MIEstimator(nn.Module):
    """One estimator E_phi = (C_phi, G_phi). E_n (natural MI, u = x) and E_a (adversarial MI, u = n)
    are two instances of this class."""

    def __init__(self, in_channels: int, num_classes: int, hsize: int = 2048):
        super().__init__()
        self.local = LocalEncoder(in_channels, hsize)
        self.head = GlobalHead(num_classes, hsize)

    def encode_local(self, u):
        return self.local(u)

    def encode_global(self, logits):
        return self.head(logits)


def build_estimators(in_channels: int, num_classes: int, hsize: int = 2048) -> nn.ModuleDict:
    """The natural-MI and adversarial-MI estimators, as one module (one state dict, one optimiser)."""
    return nn.ModuleDict({"natural": MIEstimator(in_channels, num_classes, hsize),
                          "adversarial": MIEstimator(in_channels, num_classes, hsize)})
