"""The training objectives: natural training, and the base adversarial-training objectives Standard AT
(Madry), TRADES and MART.

Each adversarial objective is an attack (how x~ is crafted during training) plus a loss computed from the
logits h(x) and h(x~), so that NAMID (stage 3) can reuse the same two forward passes for its MI terms.
With another head than softmax (defenses/__init__.py), natural training and Standard AT use that head's
own loss in place of cross-entropy (training_loss).
"""
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from utils.attacks import PGDConfig
from utils.errors import UserError

BASE_LOSSES = ("at", "trades", "mart")
# Mixup and interpolated adversarial training, for mixup inference (their steps: defenses/mixup_inference.py).
MIXUP_LOSSES = ("mixup", "iat")
TRAINING_LOSSES = ("natural",) + BASE_LOSSES + MIXUP_LOSSES
_LOG_EPS = 1e-12


def standard_at_loss(logits_nat, logits_adv, y, beta=None):
    """Madry et al.: cross-entropy on the adversarial examples (logits_nat is unused)."""
    return F.cross_entropy(logits_adv, y)


def trades_loss(logits_nat, logits_adv, y, beta=6.0):
    """Zhang et al. 2019: CE(h(x), y) + beta * KL(p(x) || p(x~)), the KL averaged over the batch."""
    natural = F.cross_entropy(logits_nat, y)
    robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_nat, dim=1), reduction="batchmean")
    return natural + beta * robust


def mart_loss(logits_nat, logits_adv, y, beta=6.0):
    """Wang et al. 2020: boosted CE on x~ + beta * KL(p(x) || p(x~)) weighted by (1 - p_y(x)).

    Boosted CE = CE(h(x~), y) - log(1 - max_{j != y} p_j(x~)); the constants 1.0001 and 1.0000001
    are those of the MART reference code.
    """
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = adv_probs.argsort(dim=1)[:, -2:]
    hardest_wrong = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    boosted_ce = F.cross_entropy(logits_adv, y) + F.nll_loss(torch.log(1.0001 - adv_probs + _LOG_EPS), hardest_wrong)
    nat_probs = F.softmax(logits_nat, dim=1)
    true_probs = nat_probs.gather(1, y[:, None]).squeeze(1)
    kl_per_example = F.kl_div(torch.log(adv_probs + _LOG_EPS), nat_probs, reduction="none").sum(dim=1)
    return boosted_ce + beta * (kl_per_example * (1.0000001 - true_probs)).mean()


@dataclass(frozen=True)
class Objective:
    """One base training objective: its loss function and how its training attack differs from PGD-CE."""
    name: str
    loss_fn: callable
    attack_loss: str          # the loss the training attack ascends
    random_start: str         # the training attack's initialisation
    needs_clean_logits: bool  # whether the loss uses h(x) (with gradient) as well as h(x~)
    adversarial: bool = True  # False: natural training, no attack

    def training_attack(self, base: PGDConfig, head=None, at_attack_loss: str = None) -> PGDConfig:
        """The training attack; under Standard AT it ascends at_attack_loss if given (--at-attack-loss), else the
        loss the head asks for (MMC: the CW margin)."""
        loss = self.attack_loss
        if self.name == "at":
            loss = at_attack_loss or (head.attack_loss if head is not None else loss)
        return replace(base, loss=loss, random_start=self.random_start)

    def loss(self, logits_nat, logits_adv, y, beta):
        return self.loss_fn(logits_nat, logits_adv, y, beta)

    def needs_clean_outputs(self, head=None) -> bool:
        """Whether the loss reads the outputs on x (ADP's adversarial training does, as TRADES and MART)."""
        return self.needs_clean_logits or (head is not None and self.name == "at" and head.adversarial_loss_uses_clean)


def training_loss(objective: Objective, head, outputs_nat, outputs_adv, y, beta):
    """The objective's loss with the head's outputs (defenses.Head): Standard AT is the head's adversarial loss
    (cross-entropy on h(x~) for softmax heads, exactly standard_at_loss); TRADES and MART read the logits."""
    if objective.name == "at":
        return head.adversarial_loss(outputs_nat, outputs_adv, y)
    return objective.loss(head.logits(outputs_nat), head.logits(outputs_adv), y, beta)


def check_head_supports(head_name: str, loss: str, at_attack_loss: str = None):
    """UserError (one line from the stage scripts) when an objective is not defined for a head
    (defenses/__init__.py says why), or --at-attack-loss is given without Standard AT or as the saturated CE of MMC."""
    if at_attack_loss is not None and loss != "at":
        raise UserError(f"--at-attack-loss chooses Standard AT's training attack; --loss {loss} has its own")
    if at_attack_loss == "ce" and head_name == "mmc":
        raise UserError("--at-attack-loss ce with --head mmc ascends a saturated cross-entropy (the MMC logits are "
                        "-||z - mu||^2, far apart), which barely moves correctly classified points; use cw")
    if loss in ("trades", "mart") and head_name == "rce":
        raise UserError(f"{loss.upper()} adds cross-entropy terms on the logits, which with --head rce would train the "
                        f"same output Z both ways (CE makes argmax Z = y, RCE argmin Z = y); use --loss natural or at")
    if loss in MIXUP_LOSSES and head_name != "softmax":
        raise UserError(f"--loss {loss} trains on soft labels with cross-entropy, defined here for the softmax head "
                        f"only, not --head {head_name}")
    if loss in ("trades", "mart") and head_name not in ("softmax", "mm-lda"):
        raise UserError(f"{loss.upper()} uses a softmax over the logits, which is saturated for the {head_name} head "
                         f"(mmc) or not its prediction rule (adp); use --loss natural or at with --head {head_name}")


OBJECTIVES = {
    "at": Objective("at", standard_at_loss, "ce", "uniform", needs_clean_logits=False),
    # TRADES crafts x~ by maximising the KL to the clean prediction from a small Gaussian start.
    "trades": Objective("trades", trades_loss, "kl", "normal", needs_clean_logits=True),
    # MART's reference code also starts its CE attack from a small Gaussian.
    "mart": Objective("mart", mart_loss, "ce", "normal", needs_clean_logits=True),
    # Natural (non-adversarial) training: the head's loss on clean images, as the SCE/MMC/ADP rows of the seed talk.
    "natural": Objective("natural", None, "ce", "none", needs_clean_logits=True, adversarial=False),
    # Mixup (best.pt on validation clean accuracy, as natural) and IAT, whose PGD (random start) ascends the
    # cross-entropy of the model's predicted labels; both steps are defenses/mixup_inference.make_mixup_step.
    "mixup": Objective("mixup", None, "ce", "none", needs_clean_logits=True, adversarial=False),
    "iat": Objective("iat", None, "ce", "uniform", needs_clean_logits=False),
}
