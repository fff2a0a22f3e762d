"""RCE: reverse cross-entropy training (Pang, Du, Dong, Zhu, NeurIPS 2018); docs/method.md section 14.

The network outputs Z(x). Training minimises the reverse cross-entropy

    L_RCE(x, y) = -R_y . log softmax(Z(x)),    R_y = (1 - onehot(y)) / (L - 1)

(uniform 1/(L-1) on every wrong class, 0 on y), and the classifier is softmax(-Z): the prediction is
argmin Z. The model therefore exposes h = -Z as its logits (ReversedLogits), everywhere: attacks,
AutoAttack, NAMID's selection and the detectors all read h, whose argmax is the prediction, and nothing
ever takes the argmax of the raw Z (that would be the least likely class). Given h, the loss is
-R_y . log_softmax(-h) (rce_loss).

penultimate_features gives the input of the network's last nn.Linear (the feature the K-density detector
of defenses/detectors.py works on), for softmax and rce models.
No library implements RCE (torchattacks, advertorch, ART checked), hence written here.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from utils.errors import UserError

# The heads whose network ends in a linear classifier on a feature vector (the detectors' models).
DETECTABLE_HEADS = ("softmax", "rce")


class ReversedLogits(nn.Module):
    """forward(x) = -network(x): the RCE classifier's logits h = -Z."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -self.network(x)


def reverse_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, L) R_y = (1 - onehot(y)) / (L - 1)."""
    return (1.0 - F.one_hot(y, num_classes).float()) / (num_classes - 1)


def rce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reverse cross-entropy averaged over the batch, from the model's logits h = -Z:
    -R_y . log_softmax(Z) with Z = -h."""
    log_probs = F.log_softmax(-logits.float(), dim=1)
    return -(reverse_labels(y, logits.shape[1]) * log_probs).sum(dim=1).mean()


def check_detectable(head: str, where: str = "this checkpoint"):
    """UserError unless the head ends in a linear classifier whose input is the detectors' feature."""
    if head not in DETECTABLE_HEADS:
        raise UserError(f"{where} has a {head} head; the detectors (confidence, non-ME, K-density) need a softmax "
                        f"or rce head (a linear classifier on the penultimate feature)")


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear (in module order): SmallCNN's fc3, the ResNets' linear, WideResNet's fc."""
    from defenses.adp import Ensemble
    from defenses.max_mahalanobis import MaxMahalanobisHead
    for module in model.modules():
        if isinstance(module, (Ensemble, MaxMahalanobisHead)):
            raise UserError(f"the detectors need a softmax or rce head, not {type(module).__name__}")
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise UserError("the model has no nn.Linear layer, so no penultimate feature for the K-density detector")
    return linears[-1]


@contextmanager
def capture_penultimate(model: nn.Module):
    """Within the block, every forward of `model` stores the input of its last nn.Linear in the yielded list
    (with its autograd graph, so that an attack can differentiate through it)."""
    seen = []
    handle = last_linear(model).register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    try:
        yield seen
    finally:
        handle.remove()


def logits_and_features(model: nn.Module, x: torch.Tensor) -> tuple:
    """(h(x), z(x)) from one forward: the model's logits and the input of its last nn.Linear, (B, d) float32."""
    with capture_penultimate(model) as seen:
        logits = model(x)
    return logits, seen[-1].flatten(1).float()


def penultimate_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, d) the input of the model's last nn.Linear (the K-density detector's feature z(x))."""
    return logits_and_features(model, x)[1]
