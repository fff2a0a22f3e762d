"""The classifier heads a target model can have, and what training needs to know about each.

A head decides the model's logits (the one logits(x) whose argmax is the prediction, which attacks,
AutoAttack and NAMID read) and its own classification loss, which plays the part of cross-entropy in
natural training and in Standard AT:

    softmax   a linear layer; cross-entropy                                  (the project's default)
    mm-lda    logits z . mu on fixed Max-Mahalanobis centers; cross-entropy  (defenses/max_mahalanobis.py)
    mmc       logits -||z - mu||^2; the MMC loss 1/2 ||z - mu_y||^2          (defenses/max_mahalanobis.py)
    adp       an ensemble of K softmax members, logits log p_bar; the ADP loss (defenses/adp.py)
    rce       a linear layer Z, logits -Z; the reverse cross-entropy           (defenses/rce.py)

TRADES and MART are defined on a softmax over the logits; they apply to softmax and mm-lda heads only
(MMC's logit gaps of ~10^2 saturate that softmax; ADP's loss is defined on its members; RCE's would mix
cross-entropy, which makes argmax Z = y, with the reverse cross-entropy, which makes argmin Z = y).
"""
from dataclasses import dataclass

import torch.nn.functional as F

from defenses.adp import adp_loss, ensemble_logits, member_outputs
from defenses.max_mahalanobis import mmc_loss
from defenses.rce import rce_loss

HEAD_NAMES = ("softmax", "mm-lda", "mmc", "adp", "rce")


@dataclass(frozen=True)
class Head:
    """Training's view of a head. outputs(model, x) is what its loss reads (the logits, or the members' logits
    for adp); logits(outputs) the model's logits; loss(outputs, y) its classification loss."""
    name: str
    adp_alpha: float = 0.0
    adp_beta: float = 0.0

    @property
    def is_ensemble(self) -> bool:
        return self.name == "adp"

    @property
    def softmax_objectives(self) -> bool:
        """Whether TRADES and MART (a softmax over the logits) apply."""
        return self.name in ("softmax", "mm-lda")

    @property
    def attack_loss(self) -> str:
        """The loss PGD ascends in adversarial training. MMC: the CW margin, since cross-entropy on its
        logits is saturated (its authors' PGD on that cross-entropy barely moved correctly classified points)."""
        return "cw" if self.name == "mmc" else "ce"

    @property
    def adversarial_loss_uses_clean(self) -> bool:
        """ADP's adversarial training (its paper's Table 4) trains on the ADP loss of x~ and of x."""
        return self.is_ensemble

    def outputs(self, model, x):
        if not self.is_ensemble:
            return model(x)
        from utils.distributed import unwrap
        with member_outputs(unwrap(model)):
            return model(x)

    def logits(self, outputs):
        return ensemble_logits(outputs) if self.is_ensemble else outputs

    def loss(self, outputs, y):
        if self.name == "mmc":
            return mmc_loss(outputs, y)
        if self.name == "rce":
            return rce_loss(outputs, y)
        if self.is_ensemble:
            return adp_loss(outputs, y, self.adp_alpha, self.adp_beta)
        return F.cross_entropy(outputs, y)

    def adversarial_loss(self, outputs_nat, outputs_adv, y):
        """Standard AT's loss with this head: its loss on x~ (and on x for adp)."""
        loss = self.loss(outputs_adv, y)
        if self.adversarial_loss_uses_clean:
            loss = loss + self.loss(outputs_nat, y)
        return loss


def head_for(spec: dict, args=None) -> Head:
    """The training head of a model spec (utils/training.model_spec_from_args); ADP's weights from args (without
    args, 0: enough for what does not train, such as the attack loss)."""
    name = spec.get("head", "softmax")
    if name == "adp" and args is not None:
        return Head(name, float(args.adp_alpha), float(args.adp_beta))
    return Head(name)
