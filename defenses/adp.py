"""ADP: adaptive diversity promoting ensembles (Pang et al., ICML 2019); docs/method.md section 12.

K members f_1..f_K, each a full classifier; the ensemble predicts the average of their probabilities
p_bar = (1/K) sum_k softmax(f_k(x)) and exposes log p_bar as its logits, so every attack and NAMID work on
the log-probabilities of what it predicts (the authors' attacks read p_bar as if it were logits, which
made their robustness look larger: utils/evaluation.py's "-p" attacks reproduce that protocol). Training:

    L = sum_k CE(f_k(x), y) - alpha * H(p_bar) - beta * log det(M~^T M~ + 1e-6 I)

with M~ the K members' non-true-label probability vectors, each scaled to unit L2 norm (the authors'
utils.py: log offset 1e-20 in H, det offset 1e-6). slogdet keeps the log-determinant finite when members
agree (identical members give a singular Gram matrix, which the 1e-6 jitter keeps at log(1e-6) per
missing direction). No library implements ADP, hence written here.
"""
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

LOG_OFFSET = 1e-20
DET_OFFSET = 1e-6


class Ensemble(nn.Module):
    """forward(x): log of the members' averaged probabilities, (B, L); inside member_outputs(), the members'
    own logits, (B, K, L), for the ADP loss (the forward still goes through any DDP wrapper)."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.return_members = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack([member(x) for member in self.members], dim=1)
        return stacked if self.return_members else ensemble_logits(stacked)


def ensemble_logits(member_logits: torch.Tensor) -> torch.Tensor:
    """log p_bar from (B, K, L) member logits, by logsumexp (exact where p_bar underflows float32)."""
    k = member_logits.shape[1]
    return torch.logsumexp(F.log_softmax(member_logits.float(), dim=-1), dim=1) - torch.log(torch.tensor(float(k)))


@contextmanager
def member_outputs(model: nn.Module):
    """Every Ensemble inside `model` returns its members' logits for the duration."""
    ensembles = [m for m in model.modules() if isinstance(m, Ensemble)]
    for ensemble in ensembles:
        ensemble.return_members = True
    try:
        yield
    finally:
        for ensemble in ensembles:
            ensemble.return_members = False


def ensemble_entropy(member_logits: torch.Tensor) -> torch.Tensor:
    """(B,) H(p_bar) = -sum_i p_bar_i log(p_bar_i + 1e-20)."""
    p_bar = F.softmax(member_logits.float(), dim=-1).mean(dim=1)
    return -(p_bar * torch.log(p_bar + LOG_OFFSET)).sum(dim=-1)


def log_ensemble_diversity(member_logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) log det(M~^T M~ + 1e-6 I): M~'s columns are the members' probabilities without the true label's
    entry, each normalised to unit L2 norm."""
    probs = F.softmax(member_logits.float(), dim=-1)                      # (B, K, L)
    b, k, num_classes = probs.shape
    keep = ~F.one_hot(y, num_classes).bool()                              # (B, L)
    non_true = probs.masked_select(keep[:, None, :]).view(b, k, num_classes - 1)
    unit = non_true / non_true.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    # float64: the K x K Gram matrices are tiny, and in float32 the 1e-6 eigenvalues of agreeing members are
    # within rounding of the others' (3 for K = 3): their log-determinant was off by 0.1. MPS has no float64.
    unit = unit.to(torch.float32 if unit.device.type == "mps" else torch.float64)
    gram = unit @ unit.transpose(1, 2) + DET_OFFSET * torch.eye(k, device=unit.device, dtype=unit.dtype)
    return torch.linalg.slogdet(gram).logabsdet.float()


def adp_loss(member_logits: torch.Tensor, y: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """The ADP training loss averaged over the batch (module docstring); alpha = beta = 0 is the plain sum of
    the members' cross-entropies (the ADP paper's baseline ensemble)."""
    k = member_logits.shape[1]
    ce = sum(F.cross_entropy(member_logits[:, i].float(), y) for i in range(k))
    loss = ce
    if alpha:
        loss = loss - alpha * ensemble_entropy(member_logits).mean()
    if beta:
        loss = loss - beta * log_ensemble_diversity(member_logits, y).mean()
    return loss
