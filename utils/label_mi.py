"""Label MI: I(Y; Y^), the mutual information between the true labels Y and a classifier's predictions Y^.

Not the MI of the rest of the project: the NAMID estimators (utils/mi.py) estimate the MI between an input and
a network's features; label MI is a plug-in quantity over a set of examples and their predictions. By data
processing, I(Y; f(X + delta)) <= I(Y; X + delta): on a given classifier it is an upper proxy for how much
an attack leaves of the label information in the attacked input.

Unlike accuracy, label MI does not care which class is predicted, only how much the prediction tells about
the label: a permutation of the predicted classes keeps I(Y; Y^) = H(Y) while the accuracy drops to 0, and a
constant prediction gives 0 whatever the accuracy.

- soft_confusion(probs, y, C): P(Y^ = j | Y = i), the mean of the predicted probabilities over the batch's
  examples of class i (rows: true classes; a class absent from the batch gets a zero row).
- label_mi(probs, y): the plug-in I(Y; Y^) of the soft confusion matrix with the batch's empirical P(Y), in
  nats; differentiable (utils.attacks' "label-mi" loss minimises it).
- hard_label_mi(predictions, y, C): I(Y; Y^) in bits from the confusion matrix of hard predictions, for
  reporting (stage 4's label-MI table).
Every log is taken of a probability clamped at the dtype's smallest normal number, multiplied by the
probability itself: p log p is exactly 0 at p = 0 and its gradient stays finite there (xlogy's is -inf).
"""
import math

import torch
import torch.nn.functional as F

LN2 = math.log(2.0)


def nats_to_bits(value):
    return value / LN2


def _plogp_sum(p: torch.Tensor) -> torch.Tensor:
    """sum p log p over all entries, 0 log 0 = 0, with a finite gradient at p = 0."""
    return (p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum()


def _mi_of_joint(joint: torch.Tensor) -> torch.Tensor:
    """I(Y; Y^) in nats of a joint pmf (rows Y, columns Y^): H(Y) + H(Y^) - H(Y, Y^)."""
    return _plogp_sum(joint) - _plogp_sum(joint.sum(dim=1)) - _plogp_sum(joint.sum(dim=0))


def soft_confusion(probs: torch.Tensor, y: torch.Tensor, num_classes: int = None) -> torch.Tensor:
    """P(Y^ | Y) (C x C, rows: true classes) from per-example predicted probabilities (n x C) and labels (n):
    row i is the mean of probs over the examples with y == i; rows of classes absent from y are zero."""
    num_classes = probs.shape[1] if num_classes is None else num_classes
    if probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} classes, expected {num_classes}")
    with torch.autocast(device_type=probs.device.type, enabled=False):  # under --amp: not a bf16 matmul
        onehot = F.one_hot(y, num_classes).to(probs.dtype)
        counts = onehot.sum(dim=0)
        return (onehot.t() @ probs) / counts.clamp_min(1)[:, None]


def label_mi(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The plug-in I(Y; Y^) in nats of the soft confusion matrix, with the empirical P(Y) of y:
    sum_i P(i) sum_j P(j|i) log(P(j|i) / P(j)), P(j) = sum_i P(i) P(j|i). Differentiable in probs.
    Over a batch, a joint quantity: each example's gradient depends on the whole batch."""
    if len(y) == 0:
        return probs.sum() * 0.0
    num_classes = probs.shape[1]
    prior = torch.bincount(y, minlength=num_classes).to(probs.dtype) / len(y)
    joint = prior[:, None] * soft_confusion(probs, y, num_classes)
    return _mi_of_joint(joint)


def label_mi_bits(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nats_to_bits(label_mi(probs, y))


def confusion_matrix(predictions: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts (C x C, int64): entry (i, j) is the number of examples of class i predicted as j."""
    predictions, y = torch.as_tensor(predictions).long().flatten(), torch.as_tensor(y).long().flatten()
    if predictions.shape != y.shape:
        raise ValueError(f"{len(predictions)} predictions for {len(y)} labels")
    return torch.bincount(y * num_classes + predictions, minlength=num_classes ** 2).view(num_classes, num_classes)


def hard_label_mi(predictions, y, num_classes: int = None) -> float:
    """I(Y; Y^) in bits, plug-in from the confusion matrix of hard predictions (float64); nan when empty.
    num_classes defaults to the largest class seen + 1 (classes never seen add nothing)."""
    predictions, y = torch.as_tensor(predictions).long().flatten(), torch.as_tensor(y).long().flatten()
    if len(y) == 0:
        return float("nan")
    if num_classes is None:
        num_classes = int(max(predictions.max(), y.max())) + 1
    joint = confusion_matrix(predictions, y, num_classes).double() / len(y)
    return max(float(nats_to_bits(_mi_of_joint(joint))), 0.0)
