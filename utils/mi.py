"""Per-sample mutual-information estimates (docs/method.md section 3), the Eq. 6 selection (section 4), and the
stage-2 estimator objectives (section 5).

Written by hand: no maintained library offers DIM-style local MI estimates per sample. Conventions:
estimates are MI values (higher = more information); objectives are losses to minimise.

Precision: the estimators, their scores and every MI reduction run in float32 with autocast turned
off, whatever --amp does to the target and the attacks: in bf16 a per-sample estimate moved by up to
0.38 nats and L_mi by up to 122 % in a batch (bench/results/amp_precision.json).
"""
import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

MI_MEASURES = ("dv", "jsd", "nce")
QUANTITIES = ("nat_mi_clean", "nat_mi_adv", "adv_mi_adv", "adv_mi_clean")
QUANTITY_LABELS = {"nat_mi_clean": "I_N(x; h(x))", "nat_mi_adv": "I_N(x; h(x~))",
                   "adv_mi_adv": "I_A(n; h(x~))", "adv_mi_clean": "I_A(n; h(x))"}


def score_tensor(global_vectors, local_maps):
    """s[i, j, k] = <G(h(v_i)), C(u_j)[:, k]>: (B, H) and (B, H, K) -> (B, B, K)."""
    return torch.einsum("ih,jhk->ijk", global_vectors, local_maps)


def mi_from_scores(scores, measure="dv"):
    """Per-sample MI estimates (B,) from a (B, B, K) score tensor; sample i's negatives are the other
    samples j != i of the batch, at the same location k, averaged over locations.

    dv:  mean_k [ s(i,i,k) - logsumexp_{j != i} s(i,j,k) + log(B - 1) ]   (Donsker-Varadhan)
    jsd: mean_k [ (log 2 - softplus(-s(i,i,k))) - mean_{j != i} (softplus(s(i,j,k)) - log 2) ]
    nce: mean_k [ s(i,i,k) - logsumexp_j s(i,j,k) + log B ]               (InfoNCE: the positive is in the denominator)

    The diagonal is excluded from the DV and JSD negatives (the published code multiplies it by zero,
    which adds exp(0) = 1 to every sum). A batch of fewer than 2 samples has no negatives: zeros.
    """
    if measure not in MI_MEASURES:
        raise ValueError(f"unknown MI measure {measure!r}; choose one of {MI_MEASURES}")
    batch = scores.shape[0]
    if batch < 2:
        return scores.new_zeros(batch)
    positive = scores.diagonal(dim1=0, dim2=1).transpose(0, 1)  # (B, K)
    diagonal = torch.eye(batch, dtype=torch.bool, device=scores.device)[:, :, None]
    if measure == "dv":
        negative = scores.masked_fill(diagonal, float("-inf")).logsumexp(dim=1)
        return (positive - negative + math.log(batch - 1)).mean(dim=1)
    if measure == "nce":
        return (positive - scores.logsumexp(dim=1) + math.log(batch)).mean(dim=1)
    log2 = math.log(2.0)
    expected_positive = log2 - F.softplus(-positive)
    expected_negative = F.softplus(scores).masked_fill(diagonal, 0.0).sum(dim=1) / (batch - 1) - log2
    return (expected_positive - expected_negative).mean(dim=1)


@contextmanager
def full_precision(tensor):
    """Autocast off on the tensor's device for the duration (inputs must then be cast to float32)."""
    with torch.autocast(device_type=tensor.device.type, enabled=False):
        yield


def mi_estimate(estimator, local_maps, logits, measure="dv"):
    """I(u; h(v)) per sample, from precomputed local encodings C(u) (B, H, K) and the logits h(v) (B, C)."""
    with full_precision(local_maps):
        return mi_from_scores(score_tensor(estimator.encode_global(logits.float()), local_maps.float()), measure)


def local_encoding(estimator, u):
    """C(u) (B, H, K) in float32."""
    with full_precision(u):
        return estimator.encode_local(u.float())


def local_encodings(estimators, x, x_adv):
    """C_n(x) and C_a(n) with n = x~ - x: computed once per batch and shared by every MI term."""
    return local_encoding(estimators["natural"], x), local_encoding(estimators["adversarial"], x_adv.float() - x.float())


def global_encodings(estimator, logits_nat, logits_adv):
    """G(h(x)) and G(h(x~)) from one pass of the head over both batches.

    One pass, so that the head's BatchNorm, in train mode during stage 2, normalises h(x) and h(x~)
    with the same batch statistics, and its running statistics (what eval mode, stage 3 and the
    held-out reports use) describe that mixture. Two passes would normalise each batch by its own
    statistics in training and by the shared running ones afterwards."""
    return estimator.encode_global(torch.cat([logits_nat, logits_adv])).chunk(2)


# Which estimator, local encoding and logits each of the paper's four quantities pairs.
PAIRINGS = {"nat_mi_clean": ("natural", "nat", "nat"), "nat_mi_adv": ("natural", "nat", "adv"),
            "adv_mi_adv": ("adversarial", "adv", "adv"), "adv_mi_clean": ("adversarial", "adv", "nat")}


def mi_quantities(estimators, local_nat, local_adv, logits_nat, logits_adv, measure="dv", which=QUANTITIES):
    """The four per-sample quantities of the paper, over the whole batch:

    nat_mi_clean = I_N(x; h(x)),  nat_mi_adv = I_N(x; h(x~)),
    adv_mi_adv   = I_A(n; h(x~)), adv_mi_clean = I_A(n; h(x)).
    """
    with full_precision(local_nat):
        logits_nat, logits_adv = logits_nat.float(), logits_adv.float()
        local = {"nat": local_nat.float(), "adv": local_adv.float()}
        heads = {name: dict(zip(("nat", "adv"), global_encodings(estimators[name], logits_nat, logits_adv)))
                 for name in sorted({PAIRINGS[q][0] for q in which})}
        result = {}
        for q in which:
            estimator, local_key, logits_key = PAIRINGS[q]
            result[q] = mi_from_scores(score_tensor(heads[estimator][logits_key], local[local_key]), measure)
        return result


def derangement(n: int, generator=None):
    """A random permutation of range(n) without a fixed point (one cycle through a random order), so that
    every sample is paired with another's: the shuffled-pairs reference of the informativeness check."""
    order = torch.randperm(n, generator=generator)
    permutation = torch.empty_like(order)
    permutation[order] = order.roll(-1)
    return permutation


def select_misled(logits_nat, logits_adv, y):
    """Paper Eq. 6: samples classified correctly when natural and wrongly when adversarial.

    The argmax is over classes (dim 1); the published code takes a softmax over the batch first,
    which flips 6-20 % of the selections.
    """
    return (logits_nat.argmax(dim=1) == y) & (logits_adv.argmax(dim=1) != y)


def masked_mean(values, mask):
    """Mean of values[mask]; 0 (never NaN) when the mask is empty."""
    count = mask.sum()
    return (values * mask).sum() / count.clamp_min(1)


def cosine(a, b, mask):
    """Cosine similarity of the vectors a[mask] and b[mask] (zeros elsewhere change nothing); 0 if empty."""
    a, b = a * mask, b * mask
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)


# ----------------------------------------------------------------------------------------------
# Stage-2 objectives (losses to minimise). q holds the four per-sample quantities over the batch.

def only_max_objective(q, logits_nat, logits_adv, y):
    """Eq. 4: E_n maximises I_N(x; h(x)) over correctly classified natural samples, E_a maximises
    I_A(n; h(x~)) over samples whose adversarial is misclassified."""
    correct = logits_nat.argmax(dim=1) == y
    fooled = logits_adv.argmax(dim=1) != y
    return -(masked_mean(q["nat_mi_clean"], correct) + masked_mean(q["adv_mi_adv"], fooled))


def paper_objective(q, logits_nat, logits_adv, y, beta=1.0, bounded=False):
    """Eq. 5 on the selected set X': E_n maximises I_N(x; h(x)) - beta I_N(x; h(x~)),
    E_a maximises I_A(n; h(x~)) - beta I_A(n; h(x)).

    Literally, the objective is unbounded: the subtracted estimate can be driven to -infinity (a critic
    that scores the mismatched pair far below its negatives), which is what the estimators then learn
    instead of the MI they are meant to measure. bounded=True clamps each subtracted per-sample estimate
    at 0, the score of a constant critic: the objective still pushes the mismatched pair's MI down to
    "no information", and gains nothing below it (docs/method.md section 5)."""
    selected = select_misled(logits_nat, logits_adv, y)
    subtracted_nat, subtracted_adv = q["nat_mi_adv"], q["adv_mi_clean"]
    if bounded:
        subtracted_nat, subtracted_adv = subtracted_nat.clamp_min(0), subtracted_adv.clamp_min(0)
    natural = masked_mean(q["nat_mi_clean"] - beta * subtracted_nat, selected)
    adversarial = masked_mean(q["adv_mi_adv"] - beta * subtracted_adv, selected)
    return -(natural + adversarial)


def reference_objective(q, logits_nat, logits_adv, y):
    """The published code's estimator objective (train_MI_estimator.py, MI_loss_nat + MI_loss_adv),
    with its selection bug fixed. Over the correctly classified natural samples C, split into the
    wrongly attacked W and the robust R:

    E_n: W-part 5 |cos(I_N(x;h(x)), I_N(x;h(x~)))|_W - sum_W I_N(x;h(x)) / |C|
         R-part 5 |1 - cos(...)|_R                   - sum_R I_N(x;h(x)) / |C|
    E_a: W-part 5 |cos(I_A(n;h(x~)), I_A(n;h(x)))|_W - mean_W I_A(n;h(x~))
         R-part 8 |1 - cos(...)|_R                   + 0.1 mean_R I_A(n;h(x~))
    each total = W-part + 0.5 R-part; with no correct sample, -mean I_N(x;h(x)) and -mean I_A(n;h(x~)).
    (The normalisation by |C| for E_n and by the subset size for E_a is the published code's.)
    """
    correct = logits_nat.argmax(dim=1) == y
    if not correct.any():
        return -(q["nat_mi_clean"].mean() + q["adv_mi_adv"].mean())
    wrong = correct & (logits_adv.argmax(dim=1) != y)
    robust = correct & ~wrong
    n_correct = correct.sum()
    loss = logits_nat.new_zeros(())
    if wrong.any():
        loss = loss + 5 * cosine(q["nat_mi_clean"], q["nat_mi_adv"], wrong).abs() - (q["nat_mi_clean"] * wrong).sum() / n_correct
        loss = loss + 5 * cosine(q["adv_mi_adv"], q["adv_mi_clean"], wrong).abs() - masked_mean(q["adv_mi_adv"], wrong)
    if robust.any():
        loss = loss + 0.5 * (5 * (1 - cosine(q["nat_mi_clean"], q["nat_mi_adv"], robust)).abs()
                             - (q["nat_mi_clean"] * robust).sum() / n_correct)
        loss = loss + 0.5 * (8 * (1 - cosine(q["adv_mi_clean"], q["adv_mi_adv"], robust)).abs()
                             + 0.1 * masked_mean(q["adv_mi_adv"], robust))
    return loss
