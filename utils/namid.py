"""The stage-3 MI losses (docs/method.md section 6): NAMID's L_mi (paper Eq. 8 and 9) and the WMIM baseline.

    L_mi = Lcos(I_N(x'; h(x~')), I_N(x'; h(x')))          natural-MI term   (--no-nat-mi drops it)
         + Lcos(I_A(n'; h(x~')), I_A(n'; h(x')))          adversarial-MI term (--no-adv-mi drops it)
         + lambda * mean_{X'} [I_A(n'; h(x~')) - I_N(x'; h(x~'))]   (--lambda 0 drops it)

Lcos(a, b) = 1 - cos(a, b) over the vectors of per-sample estimates on the selected set X' (the paper
writes a per-sample scalar form, which is degenerate). An empty X' contributes exactly zero.
"""
import torch

from utils import distributed
from utils.attacks import pgd_attack
from utils.losses import training_loss
from utils.training import SOFTMAX, clean_logits_in_train_mode, natural_step
from utils.mi import (cosine, full_precision, local_encoding, local_encodings, masked_mean, mi_estimate, mi_quantities,
                      select_misled)

MI_MODES = ("namid", "wmim")


def cosine_distance(a, b, mask):
    """1 - cos(a[mask], b[mask]); 0 when the mask is empty."""
    if not mask.any():
        return a.new_zeros(())
    return 1 - cosine(a, b, mask)


def needed_quantities(use_nat: bool, use_adv: bool, lam: float) -> tuple:
    """The per-sample MI quantities the enabled terms need (the others are not computed)."""
    needed = set()
    if use_nat:
        needed |= {"nat_mi_adv", "nat_mi_clean"}
    if use_adv:
        needed |= {"adv_mi_adv", "adv_mi_clean"}
    if lam != 0:
        needed |= {"adv_mi_adv", "nat_mi_adv"}
    return tuple(sorted(needed))


def namid_mi_loss(q: dict, selected, lam: float, use_nat=True, use_adv=True):
    """L_mi and its three raw terms from the per-sample quantities q (over the batch) and the X' mask."""
    zero = next(iter(q.values())).new_zeros(()) if q else selected.new_zeros((), dtype=torch.float)
    nat = cosine_distance(q["nat_mi_adv"], q["nat_mi_clean"], selected) if use_nat else zero
    adv = cosine_distance(q["adv_mi_adv"], q["adv_mi_clean"], selected) if use_adv else zero
    gap = masked_mean(q["adv_mi_adv"] - q["nat_mi_adv"], selected) if lam != 0 else zero
    loss = nat + adv + lam * gap
    terms = {"mi_nat_cos": nat.detach(), "mi_adv_cos": adv.detach(), "mi_gap": gap.detach()}
    return loss, terms


def namid_step_mi(estimators, local_nat, local_adv, logits_nat, logits_adv, y, measure, lam, use_nat, use_adv,
                  min_selected=1):
    """Selection (Eq. 6) and L_mi for one batch; local encodings were computed under no_grad. With fewer
    than min_selected samples in X', L_mi is 0 for the batch (the cosine of a 1-element vector is a
    constant sign, of a 2-element one mostly noise)."""
    selected = select_misled(logits_nat.detach(), logits_adv.detach(), y)
    which = needed_quantities(use_nat, use_adv, lam)
    if int(selected.sum()) < max(min_selected, 1) or not which:
        loss, terms = namid_mi_loss({}, selected, 0.0, False, False)
    else:
        with full_precision(local_nat):
            q = mi_quantities(estimators, local_nat, local_adv, logits_nat, logits_adv, measure, which=which)
            loss, terms = namid_mi_loss(q, selected, lam, use_nat, use_adv)
    terms["selected"] = selected.sum().float()
    return loss, terms


def wmim_mi_loss(natural_estimator, local_adv_image, logits_adv, measure):
    """WMIM (after Zhu et al. 2020): -mean over the batch of I(x~; h(x~)), with the natural estimator
    applied to the adversarial image itself (no disentanglement of natural and adversarial MI)."""
    mi = mi_estimate(natural_estimator, local_adv_image, logits_adv, measure)  # float32, autocast off
    return -mi.mean(), {"mi_wmim": mi.mean().detach()}


def alpha_schedule(alpha: float, warmup_epochs: float):
    """alpha after `adversarial_epochs` adversarial epochs: grown linearly from 0 over warmup_epochs, then constant."""
    def alpha_at(adversarial_epochs: float) -> float:
        if warmup_epochs <= 0:
            return alpha
        return alpha * min(1.0, adversarial_epochs / warmup_epochs)
    return alpha_at


def make_namid_step(model, estimators, objective, schedule, generator, *, beta, alpha, lam, measure,
                    mi_mode="namid", use_nat=True, use_adv=True, bn_stats="base", alpha_warmup_epochs=0.0,
                    min_selected=1, head=SOFTMAX):
    """The stage-3 step: L_all = L_base + alpha * L_mi, alpha ramped from 0 over the first
    alpha_warmup_epochs adversarial epochs (schedule.adversarial_epochs), L_mi off in batches whose X'
    has fewer than min_selected samples (namid_step_mi).

    Per step the target runs forward once on x and once on x~ (after the attack); those logits feed the
    Eq. 6 selection, the base loss and every MI term. bn_stats decides whether the clean forward updates
    BatchNorm running statistics (clean_logits_in_train_mode). The estimators are frozen (eval mode, no parameter
    gradients), and their local encodings, which do not depend on theta, are computed once under no_grad.
    The published code ran 7 target forwards per step (docs/method.md section 8). With another head
    (defenses/__init__.py) L_base is that head's (MMC loss, ADP loss), and the selection and the estimators
    read the head's logits (an ensemble's log p_bar), the ones the estimators were trained on.
    """
    alpha_at = alpha_schedule(alpha, alpha_warmup_epochs)

    def step(x, y, index):
        config = schedule(index)
        if config is None:  # clean warm-up epoch: no attack, no MI term
            return natural_step(model, x, y, head)
        x_adv = pgd_attack(distributed.unwrap(model), x, y, config, generator)
        with torch.no_grad():
            if mi_mode == "namid":
                local_nat, local_adv = local_encodings(estimators, x, x_adv)
            else:
                local_adv_image = local_encoding(estimators["natural"], x_adv)
        model.train()
        outputs_nat = clean_logits_in_train_mode(model, x, objective, bn_stats, for_mi=True, head=head)
        outputs_adv = head.outputs(model, x_adv)
        base = training_loss(objective, head, outputs_nat, outputs_adv, y, beta)
        logits_nat, logits_adv = head.logits(outputs_nat), head.logits(outputs_adv)
        if mi_mode == "namid":
            mi, terms = namid_step_mi(estimators, local_nat, local_adv, logits_nat, logits_adv, y, measure, lam,
                                      use_nat, use_adv, min_selected)
        else:
            mi, terms = wmim_mi_loss(estimators["natural"], local_adv_image, logits_adv, measure)
        weight = alpha_at(schedule.adversarial_epochs(index)) if alpha_warmup_epochs > 0 else alpha
        extras = {"base_loss": base.detach(), "mi_loss": mi.detach(), **terms, "alpha": base.new_tensor(weight)}
        return base + weight * mi, logits_nat, logits_adv, extras
    return step
