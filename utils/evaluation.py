"""Stage 4 (docs/method.md section 7): the attack suite of the paper's Table 1, per-example robustness, the
per-threat-model worst case, sanity checks, and the result tables.

Every attack returns adversarial examples; an example is robust to an attack when the model still
classifies its adversarial correctly. Minimum-norm attacks (CW, DDN) are thresholded first: a result
farther than epsilon from x is replaced by x itself (the published code did not threshold, which
made its CW/DDN numbers incomparable). The worst case of a threat model counts an example as robust
only when it is classified correctly clean and survives every attack of that threat model.

Besides the paper's attacks (the default), adaptive L-inf attacks run when named, for the defenses whose
logits defeat the usual losses (MMC: h_i = -||z - mu_i||^2, all <= 0 and ~10^2 apart, so the cross-entropy
is saturated; ADP: log of the members' averaged probabilities, all <= 0): fgsm, bim and mim (the ADP
authors' attacks, honest: their cross-entropy is on the model's logits), pgd-mt (multi-targeted PGD on the
targeted margin h_t - max_{j != t} h_j, masked with -inf, so right on all-negative logits), and pgd-restarts
(a long cross-entropy PGD with random restarts). torchattacks' CW and UPGD(loss='margin') are never used:
they mask the true logit by multiplying with (1 - one_hot), which on all-negative logits makes the masked 0
the maximum.

The "-p" variants fgsm-p, bim-p, pgd-p and mim-p are the ADP authors' evaluation protocol (cleverhans 2.1.0):
the same attack and settings, but its cross-entropy computed on softmax(logits) taken as logits (for ADP,
whose logits are log p_bar, that is the cross-entropy on the averaged probabilities p_bar, as they ran it).
Accuracy is still that of the real model. They exist to show, side by side with the honest attack, whether
and by how much that protocol overstates robustness; the L-inf worst case includes them (they can only
lower it).

pgd-label-mi, also run only when named, is our formulation of the problem posed in Yi et al. 2020 carried to a
trained classifier: PGD that minimises the label MI I(Y; Y^) between the true labels and the predictions
(utils/label_mi.py) instead of raising each example's loss. Per attack (and clean) the run also keeps each
example's predicted class, and reports I(Y; Y^) in bits, plug-in from the confusion matrix over the whole
evaluated set, beside the accuracy (AttackResult.label_mi_bits).
"""
import importlib
import inspect
import itertools
import logging
import math
import random
import sys
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from utils import distributed
from utils.advertorch_compat import advertorch_attacks
from utils.attacks import PGDConfig, frozen_eval, momentum_attack, perturbation_norms, pgd_attack
from utils.errors import UserError
from utils.fwa import FWAConfig, LocalTransport, fw_wasserstein_attack
from utils.label_mi import hard_label_mi
from utils.runtime import autocast

# The white-box attacks of the paper's Table 1, in its order (L-inf group, then L2 group): the default.
WHITE_BOX_ATTACKS = ("pgd", "aa", "fwa", "tidim", "pgd-l2", "cw", "ddn")
# Adaptive L-inf attacks (module docstring), run only when named; the "-p" variants are the ADP authors'
# protocol (cross-entropy on softmax(logits) taken as logits), each beside its honest attack in the table.
ADAPTIVE_ATTACKS = ("fgsm", "bim", "mim", "pgd-mt", "pgd-restarts")
PROBABILITY_ATTACKS = {"fgsm-p": "fgsm", "bim-p": "bim", "pgd-p": "pgd", "mim-p": "mim"}  # -p variant: honest attack
# PGD minimising the label MI I(Y; Y^) of each batch (module docstring), run only when named.
LABEL_MI_ATTACKS = ("pgd-label-mi",)
# Table order: the L-inf columns (FWA, a threat model of its own, among them as in the paper), the L2 ones.
LINF_COLUMNS = ("pgd", "pgd-p", "aa", "fwa", "tidim", "fgsm", "fgsm-p", "bim", "bim-p", "mim", "mim-p", "pgd-mt",
                "pgd-restarts", "pgd-label-mi")
L2_COLUMNS = ("pgd-l2", "cw", "ddn")
ATTACK_NAMES = LINF_COLUMNS + L2_COLUMNS + ("transfer",)
# The attacks whose per-example AND is a threat model's worst case. FWA is a threat model of its own,
# and the transfer attack is black-box (reported separately, as the paper's Table 2).
WORST_CASE_GROUPS = {"linf": ("pgd", "aa", "tidim", "fgsm", "bim", "mim", "pgd-mt", "pgd-restarts", "fgsm-p",
                              "bim-p", "pgd-p", "mim-p", "pgd-label-mi"),
                     "l2": ("pgd-l2", "cw", "ddn")}
WORST_CASE_HEADERS = {"linf": "Worst L-inf", "l2": "Worst L2"}

# FWA radius, relative to the image's total mass (see fwa_default_radius).
FWA_RADIUS = {"mnist": 0.5, "fashion-mnist": 0.1}
FWA_RADIUS_COLOUR = 0.005

# Float slack for the budget checks (x + delta - x is not exactly delta in float32).
_ABS_TOL, _REL_TOL = 1e-6, 1e-5


def fwa_default_radius(dataset: str) -> float:
    """Colour data: 0.005, Wu et al.'s CIFAR-10 radius. MNIST: 0.5, the radius of the MNIST runs in their
    published attack scripts (not measured here: MNIST is not available offline). Fashion-MNIST, which
    they did not use: 0.1. On a SmallCNN adversarially trained on Fashion-MNIST (L-inf 0.1; 82 % clean,
    66 % under PGD-40 on 100 test images) FWA-40 leaves 75 / 61 / 40 / 27 / 15 % at radius
    0.01 / 0.05 / 0.1 / 0.2 / 0.5, so 0.1 keeps the column where defenses can differ (as the project's
    L-inf budget for Fashion-MNIST, 0.1, is a third of MNIST's)."""
    return FWA_RADIUS.get(dataset, FWA_RADIUS_COLOUR)


def tidim_default_kernel(image_size: int) -> int:
    """The TI smoothing kernel: 15 (TI-DIM's and torchattacks' default) on 32x32 and larger images,
    7 on 28x28 images, where a 15x15 Gaussian would blur over half the image."""
    return 7 if image_size <= 28 else 15


# ----------------------------------------------------------------------------------------------
# Attacks


@dataclass
class AttackOutput:
    x_adv: torch.Tensor
    unthresholded: Optional[torch.Tensor] = None  # a minimum-norm attack's result before thresholding
    plan: Optional[torch.Tensor] = None           # FWA's transport plan (its image is x_adv)
    notes: list = field(default_factory=list)     # the attack library's own warnings (AutoAttack's checks)


@dataclass
class Attack:
    """One column of the table: how to craft adversarials (craft(model, x, y, generator) -> AttackOutput)
    and the budget they must respect."""
    name: str
    column: str
    threat: str        # linf | l2 | wasserstein
    bound: float       # epsilon, or the Wasserstein radius
    settings: dict
    craft: Callable
    white_box: bool = True
    minimum_norm: bool = False


def threshold_minimum_norm(x, x_adv, epsilon: float, norm: str = "l2"):
    """A minimum-norm attack's result where it lies within epsilon of x, and x itself elsewhere:
    an adversarial counts only inside the threat model's ball."""
    inside = perturbation_norms(x_adv, x, norm) <= epsilon
    return torch.where(inside.view(-1, *([1] * (x.dim() - 1))), x_adv, x)


def _pgd(config: PGDConfig):
    def craft(model, x, y, generator):
        return AttackOutput(pgd_attack(model, x, y, config, generator))
    return craft


class SoftmaxAsLogits(nn.Module):
    """What the "-p" attacks see: softmax(model(x)) returned as if it were logits, so that their cross-entropy
    is CE(softmax(softmax(logits))): on an ADP ensemble (logits log p_bar) the cross-entropy on the averaged
    probabilities p_bar, as the ADP authors' cleverhans 2.1.0 evaluation computed it. It starts in the
    model's train/eval mode, so that frozen_eval hands the model back in the mode it found it in."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.train(model.training)

    def forward(self, x):
        return F.softmax(self.model(x).float(), dim=1)


def _on_probabilities(craft):
    """The attack `craft`, crafting on SoftmaxAsLogits(model); its result is judged on the model itself."""
    def craft_on_probabilities(model, x, y, generator):
        return craft(SoftmaxAsLogits(model), x, y, generator)
    return craft_on_probabilities


def first_success(model, x, y, runs):
    """Per example, the first run's adversarial that the model misclassifies, or the last run's where none does.

    runs: functions (x, y, index) -> adversarials of x, called in turn on the examples (index: their rows in
    the batch) that no earlier run has broken; the runs stop once every example is broken."""
    x_adv = x.detach().clone()
    unbroken = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for run in runs:
        index = unbroken.nonzero().squeeze(1)
        if len(index) == 0:
            break
        candidate = run(x[index], y[index], index)
        with torch.no_grad(), frozen_eval(model):
            broken = model(candidate).argmax(dim=1) != y[index]
        x_adv[index] = candidate.to(x_adv.dtype)
        unbroken[index[broken]] = False
    return x_adv


def _multi_targeted(config: PGDConfig, targets: int):
    """Multi-targeted PGD (Gowal et al. 2019; Tramer et al. 2020 against MMC): for each of the `targets`
    wrong classes with the highest clean logits, highest first, PGD on the targeted margin towards it, on
    the examples no earlier target broke (first_success)."""
    def craft(model, x, y, generator):
        with torch.no_grad(), frozen_eval(model):
            logits = model(x).float()
        wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        ranked = wrong.sort(dim=1, descending=True, stable=True).indices[:, :logits.shape[1] - 1]
        runs = [lambda xs, ys, index, rank=rank: pgd_attack(model, xs, ys, config, generator,
                                                            target=ranked[index, rank])
                for rank in range(min(targets, ranked.shape[1]))]
        return AttackOutput(first_success(model, x, y, runs))
    return craft


def _restarts(config: PGDConfig, restarts: int):
    """PGD from `restarts` random starts, each on the examples no earlier restart broke (first_success)."""
    def craft(model, x, y, generator):
        runs = [lambda xs, ys, index: pgd_attack(model, xs, ys, config, generator)] * restarts
        return AttackOutput(first_success(model, x, y, runs))
    return craft


def _mim(epsilon, step_size, steps, decay):
    """MI-FGSM by utils.attacks.momentum_attack, not torchattacks' MIFGSM: an exactly zero (saturated)
    cross-entropy gradient makes that one's momentum NaN and freezes the example (see momentum_attack)."""
    def craft(model, x, y, generator):
        return AttackOutput(momentum_attack(model, x, y, epsilon, step_size, steps, decay))
    return craft


def autoattack_class():
    """AutoAttack's reference code: the official `autoattack` module if installed (pip install
    git+https://github.com/fra31/auto-attack), else its PyPI packaging `pyautoattack`."""
    for module_name in ("autoattack", "pyautoattack"):
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, "AutoAttack"):
            return module.AutoAttack, module_name
    raise UserError("the aa attack needs AutoAttack's reference code: pip install pyautoattack "
                    "(or git+https://github.com/fra31/auto-attack)")


def autoattack_module() -> str:
    return autoattack_class()[1]


class _AutoAttackReport(logging.Handler):
    """AutoAttack's own log while it runs: each of its attacks and the robust accuracy after it go to the
    terminal (it can run for many minutes on one batch), and its checks' warnings are kept."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.warnings = []

    def emit(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            self.warnings.append(f"AutoAttack warns: {message}")
        elif distributed.is_main() and message.startswith(("running ", "robust accuracy after ", "initial accuracy",
                                                           "no robust datapoints")):
            tqdm.write(f"  AA: {message}", file=sys.stderr)


@contextmanager
def autoattack_log():
    logger = logging.getLogger("auto-attack")
    report, level, propagate = _AutoAttackReport(), logger.level, logger.propagate
    logger.addHandler(report)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield report
    finally:
        logger.removeHandler(report)
        logger.setLevel(level)
        logger.propagate = propagate


def autoattack_craft(epsilon: float, version: str, seed: int):
    """AutoAttack exactly as its authors run it (version 'standard': APGD-CE, APGD-T, FAB-T, Square;
    100 iterations, 5000 queries); the two packagings differ only in argument names. Its progress
    (attack by attack) is shown, and its own checks' warnings are reported with the results."""
    def craft(model, x, y, generator):
        cls, _ = autoattack_class()
        kwargs = dict(norm="Linf", eps=epsilon, version=version, seed=seed, device=x.device)
        if "verbose" in inspect.signature(cls).parameters:  # the official package prints its progress itself
            kwargs["verbose"] = distributed.is_main()
        with frozen_eval(model), autoattack_log() as report:
            adversary = cls(Float32Logits(model).eval(), **kwargs)
            run = adversary.run_standard_evaluation
            size_name = "batch_size" if "batch_size" in inspect.signature(run).parameters else "bs"
            result = run(x, y, **{size_name: len(x)})
        x_adv = result[0] if isinstance(result, tuple) else result
        return AttackOutput(x_adv.detach(), notes=report.warnings)
    return craft


def _fwa(config: FWAConfig):
    def craft(model, x, y, generator):
        x_adv, plan = fw_wasserstein_attack(model, x, y, config, return_plan=True)
        return AttackOutput(x_adv, plan=plan)
    return craft


class Float32Logits(nn.Module):
    """The model with float32 logits: under bf16 autocast (--amp), AutoAttack's Square attack writes losses
    computed in float32 into buffers made from bf16 logits, and fails ("Index put requires the source and
    destination dtypes match")."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).float()


class _GreyAsColour(nn.Module):
    """Shows a one-channel model to an attack as a three-channel one (torchattacks' TIFGSM hard-codes
    three channels). The channels start equal and get equal gradients, so they stay equal and the
    attack is exactly the one-channel attack; any channel of the result is the adversarial."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.mean(dim=1, keepdim=True))


def _tidim(epsilon, step_size, steps, kernel_size, decay, diversity_prob, resize_rate):
    """TI-DIM by torchattacks' TIFGSM (Gaussian kernel, momentum, input diversity); its random
    diversity draws come from the global RNG, which the caller seeds and restores."""
    def craft(model, x, y, generator):
        import torchattacks
        channels = x.shape[1]
        if channels not in (1, 3):
            raise UserError(f"tidim supports 1- and 3-channel images, not {channels}")
        with frozen_eval(model):
            target = _GreyAsColour(model) if channels == 1 else model
            attack = torchattacks.TIFGSM(target, eps=epsilon, alpha=step_size, steps=steps, decay=decay,
                                         kernel_name="gaussian", len_kernel=kernel_size, nsig=3,
                                         resize_rate=resize_rate, diversity_prob=diversity_prob, random_start=False)
            x_in = x.expand(-1, 3, -1, -1) if channels == 1 else x
            x_adv = attack(x_in, y)
        return AttackOutput((x_adv[:, :1] if channels == 1 else x_adv).detach())
    return craft


def _cw(epsilon, num_classes, steps, lr, search_steps, initial_const, confidence):
    def craft(model, x, y, generator):
        attacks = advertorch_attacks()
        with frozen_eval(model):
            attack = attacks.CarliniWagnerL2Attack(model, num_classes, confidence=confidence, targeted=False,
                                                   learning_rate=lr, binary_search_steps=search_steps,
                                                   max_iterations=steps, abort_early=True,
                                                   initial_const=initial_const, clip_min=0.0, clip_max=1.0)
            raw = attack.perturb(x, y).detach()
        return AttackOutput(threshold_minimum_norm(x, raw, epsilon), unthresholded=raw)
    return craft


def _ddn(epsilon, steps, gamma, init_norm, levels):
    def craft(model, x, y, generator):
        attacks = advertorch_attacks()
        with frozen_eval(model), warnings.catch_warnings():
            # advertorch steps its lr scheduler before the optimizer, which PyTorch warns about each batch.
            warnings.simplefilter("ignore", UserWarning)
            attack = attacks.DDNL2Attack(model, nb_iter=steps, gamma=gamma, init_norm=init_norm,
                                         quantize=levels > 0, levels=max(levels, 2), clip_min=0.0, clip_max=1.0,
                                         targeted=False)
            raw = attack.perturb(x, y).detach()
        return AttackOutput(threshold_minimum_norm(x, raw, epsilon), unthresholded=raw)
    return craft


def build_attacks(names, args, num_classes: int) -> list:
    """Attack objects for the requested names, from the resolved command-line settings."""
    eps, eps2 = args.epsilon, args.epsilon_l2
    pgd = PGDConfig("linf", eps, args.pgd_step_size, args.pgd_steps)
    pgd_l2 = PGDConfig("l2", eps2, args.pgd_l2_step_size, args.pgd_l2_steps)
    fwa = FWAConfig(radius=args.fwa_radius, num_steps=args.fwa_steps, kernel_size=args.fwa_kernel_size,
                    entropy=args.fwa_entropy, dual_steps=args.fwa_dual_steps)
    attacks = {
        "pgd": lambda: Attack("pgd", f"PGD-{pgd.num_steps}", "linf", eps,
                              {"epsilon": eps, "step_size": pgd.step_size, "steps": pgd.num_steps,
                               "random_start": "uniform", "loss": "ce", "implementation": "utils.attacks.pgd_attack"},
                              _pgd(pgd)),
        "aa": lambda: Attack("aa", "AA", "linf", eps,
                             {"epsilon": eps, "version": args.aa_version, "seed": attack_seed(args.seed, "aa"),
                              "implementation": f"{autoattack_module()}.AutoAttack"},
                             autoattack_craft(eps, args.aa_version, attack_seed(args.seed, "aa"))),
        "fwa": lambda: Attack("fwa", f"FWA-{fwa.num_steps}", "wasserstein", fwa.radius,
                              {"radius": fwa.radius, "steps": fwa.num_steps, "kernel_size": fwa.kernel_size,
                               "entropy": fwa.entropy, "dual_steps": fwa.dual_steps, "step_rule": "2/(t+2)",
                               "implementation": "utils.fwa.fw_wasserstein_attack"},
                              _fwa(fwa)),
        "tidim": lambda: Attack("tidim", "TI-DIM", "linf", eps,
                                {"epsilon": eps, "step_size": args.tidim_step_size, "steps": args.tidim_steps,
                                 "kernel_size": args.tidim_kernel_size, "kernel": "gaussian, nsig 3",
                                 "decay": args.tidim_decay, "diversity_prob": args.tidim_diversity_prob,
                                 "resize_rate": args.tidim_resize_rate, "implementation": "torchattacks.TIFGSM"},
                                _tidim(eps, args.tidim_step_size, args.tidim_steps, args.tidim_kernel_size,
                                       args.tidim_decay, args.tidim_diversity_prob, args.tidim_resize_rate)),
        "pgd-l2": lambda: Attack("pgd-l2", f"PGD-{pgd_l2.num_steps} (L2)", "l2", eps2,
                                 {"epsilon": eps2, "step_size": pgd_l2.step_size, "steps": pgd_l2.num_steps,
                                  "random_start": "uniform", "loss": "ce", "implementation": "utils.attacks.pgd_attack"},
                                 _pgd(pgd_l2)),
        "cw": lambda: Attack("cw", "CW (L2)", "l2", eps2,
                             {"epsilon": eps2, "steps": args.cw_steps, "lr": args.cw_lr,
                              "binary_search_steps": args.cw_search_steps, "initial_const": args.cw_initial_const,
                              "confidence": args.cw_confidence, "thresholded": True,
                              "implementation": "advertorch.attacks.CarliniWagnerL2Attack"},
                             _cw(eps2, num_classes, args.cw_steps, args.cw_lr, args.cw_search_steps,
                                 args.cw_initial_const, args.cw_confidence), minimum_norm=True),
        "ddn": lambda: Attack("ddn", "DDN (L2)", "l2", eps2,
                              {"epsilon": eps2, "steps": args.ddn_steps, "gamma": args.ddn_gamma,
                               "init_norm": args.ddn_init_norm, "quantize_levels": args.ddn_levels, "thresholded": True,
                               "implementation": "advertorch.attacks.DDNL2Attack"},
                              _ddn(eps2, args.ddn_steps, args.ddn_gamma, args.ddn_init_norm, args.ddn_levels),
                              minimum_norm=True),
        "transfer": lambda: Attack("transfer", "transfer", "linf", eps,
                                   {"epsilon": eps, "step_size": pgd.step_size, "steps": pgd.num_steps,
                                    "random_start": "uniform", "crafted_on": "the --surrogate checkpoint",
                                    "implementation": "utils.attacks.pgd_attack"},
                                   _pgd(pgd), white_box=False),
    }
    attacks.update(adaptive_attacks(args, num_classes, attacks["pgd"]))
    attacks["pgd-label-mi"] = lambda: label_mi_attack(args)
    return [attacks[name]() for name in names]


def label_mi_attack(args) -> Attack:
    """pgd-label-mi: our formulation of the problem posed in Yi et al. 2020 on a trained classifier. PGD
    (utils.attacks.pgd_attack, loss "label-mi") descends the plug-in label MI I(Y; Y^) of the batch's soft
    confusion matrix, softmax probabilities averaged per true class with the batch's empirical P(Y)
    (utils.label_mi.label_mi), jointly over the batch, with the usual per-example L-inf projection, [0, 1]
    box and uniform random start. Not a per-example loss: it can leave an example correctly classified if
    that makes the predictions as a whole less informative of the labels (an attack against label MI, not
    accuracy). Because the objective is a batch's, each example's adversarial depends on the other examples
    of its batch: batches are seeded by their index like every attack's, and the batch size (--batch-size;
    the last batch may be shorter) is recorded in the settings, since the result changes with it; the batches
    are the same whether one process or several (torchrun) evaluate them."""
    eps = args.epsilon
    config = PGDConfig("linf", eps, args.label_mi_step_size, args.label_mi_steps, loss="label-mi")
    return Attack("pgd-label-mi", f"PGD-{config.num_steps} (label MI)", "linf", eps,
                  {"epsilon": eps, "step_size": config.step_size, "steps": config.num_steps, "random_start": "uniform",
                   "loss": "minus the plug-in label MI I(Y; Y^) of the batch's soft confusion matrix, jointly over "
                           "the batch",
                   "batch_size": args.batch_size,
                   "implementation": "utils.attacks.pgd_attack (loss label-mi: utils.label_mi.label_mi)"},
                  _pgd(config))


CE_ON_PROBABILITIES = ("the ADP authors' protocol (cleverhans 2.1.0): cross-entropy on softmax(logits) taken as "
                       "logits, i.e. on p_bar for an ADP ensemble; shown beside the honest attack to measure "
                       "whether and by how much it overstates robustness; accuracy is the real model's")


def adaptive_attacks(args, num_classes: int, pgd: Callable) -> dict:
    """build_attacks' entries for the adaptive attacks and the "-p" variants (module docstring); pgd makes
    the pgd attack, which pgd-p wraps."""
    eps = args.epsilon

    def sign_attack(name, column, steps, step_size):  # fgsm, bim: PGD without random start
        config = PGDConfig("linf", eps, step_size, steps, random_start="none")
        return Attack(name, column, "linf", eps,
                      {"epsilon": eps, "step_size": step_size, "steps": steps, "random_start": "none", "loss": "ce",
                       "implementation": "utils.attacks.pgd_attack"}, _pgd(config))

    def mim():
        return Attack("mim", f"MIM-{args.mim_steps}", "linf", eps,
                      {"epsilon": eps, "step_size": args.mim_step_size, "steps": args.mim_steps,
                       "decay": args.mim_decay, "random_start": "none", "loss": "ce", "implementation": "utils.attacks.momentum_attack"},
                      _mim(eps, args.mim_step_size, args.mim_steps, args.mim_decay))

    def pgd_mt():
        config = PGDConfig("linf", eps, args.mt_step_size, args.mt_steps, loss="targeted-margin")
        targets = min(args.mt_targets or num_classes - 1, num_classes - 1)
        return Attack("pgd-mt", f"PGD-MT-{config.num_steps}x{targets}", "linf", eps,
                      {"epsilon": eps, "step_size": config.step_size, "steps": config.num_steps, "targets": targets,
                       "target_order": "wrong classes by clean logit, highest first", "random_start": "uniform",
                       "loss": "targeted margin h_t - max_{j != t} h_j (masked with -inf)",
                       "keeps": "per example the first target's adversarial that fools the model, else the last's",
                       "implementation": "utils.evaluation.first_success over utils.attacks.pgd_attack"},
                      _multi_targeted(config, targets))

    def pgd_restarts():
        config = PGDConfig("linf", eps, args.restarts_step_size, args.restarts_steps)
        return Attack("pgd-restarts", f"PGD-{config.num_steps}x{args.restarts}", "linf", eps,
                      {"epsilon": eps, "step_size": config.step_size, "steps": config.num_steps,
                       "restarts": args.restarts, "random_start": "uniform", "loss": "ce",
                       "keeps": "per example the first restart's adversarial that fools the model, else the last's",
                       "implementation": "utils.evaluation.first_success over utils.attacks.pgd_attack"},
                      _restarts(config, args.restarts))

    honest = {
        "fgsm": lambda: sign_attack("fgsm", "FGSM", 1, eps),
        "bim": lambda: sign_attack("bim", f"BIM-{args.bim_steps}", args.bim_steps, args.bim_step_size),
        "mim": mim,
        "pgd": pgd,
    }

    def on_probabilities(name):
        attack = honest[PROBABILITY_ATTACKS[name]]()
        return Attack(name, f"{attack.column} (CE on p)", attack.threat, attack.bound,
                      {**attack.settings, "loss": "ce on softmax(logits) taken as logits",
                       "protocol": CE_ON_PROBABILITIES},
                      _on_probabilities(attack.craft))

    return {"fgsm": honest["fgsm"], "bim": honest["bim"], "mim": mim, "pgd-mt": pgd_mt, "pgd-restarts": pgd_restarts,
            **{name: (lambda name=name: on_probabilities(name)) for name in PROBABILITY_ATTACKS}}


def attack_seed(seed: int, name: str) -> int:
    """Each attack's own seed: a function of --seed and the attack's name only."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 62)


# ----------------------------------------------------------------------------------------------
# Side effects: random streams and the model's state


def _seed_global_rng(seed: int):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


@contextmanager
def isolated_rng(seed: int, device: torch.device):
    """Seed torch, numpy and random for code that draws from the global RNG (AutoAttack, torchattacks,
    DDN), and put every global random state back afterwards."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    mps_state = torch.mps.get_rng_state() if device.type == "mps" else None
    with torch.random.fork_rng(devices=devices):
        _seed_global_rng(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            if mps_state is not None:
                torch.mps.set_rng_state(mps_state)


class ModelSnapshot:
    """The model's weights, buffers (BN statistics), mode and requires_grad flags, to check that an
    attack left nothing behind (parameter gradients included) and to restore them if it did."""

    def __init__(self, model):
        self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        self.training = model.training
        self.flags = [p.requires_grad for p in model.parameters()]

    def problems(self, model) -> list:
        found = []
        if any(p.grad is not None for p in model.parameters()):
            found.append("parameter gradients")
        changed = [key for key, value in model.state_dict().items() if not torch.equal(value, self.state[key])]
        if changed:
            found.append(f"changed weights or BN statistics ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})")
        if model.training != self.training:
            found.append("a changed train/eval mode")
        if [p.requires_grad for p in model.parameters()] != self.flags:
            found.append("changed requires_grad flags")
        return found

    def restore(self, model):
        model.load_state_dict(self.state)
        for p, flag in zip(model.parameters(), self.flags):
            p.grad = None
            p.requires_grad_(flag)
        model.train(self.training)


# ----------------------------------------------------------------------------------------------
# Batches: which process evaluates which, and the seed of each


def shard_of_batches(num_examples: int, batch_size: int, rank: int = 0, world_size: int = 1) -> dict:
    """{batch index: example indices} of the batches one process evaluates: the test set in order, cut
    into batches of batch_size, batch b going to process b % world_size (every batch in a single process)."""
    starts = range(0, num_examples, batch_size)
    return {index: list(range(start, min(start + batch_size, num_examples)))
            for index, start in enumerate(starts) if index % world_size == rank}


def sharded_loader(dataset, batch_size: int, *, workers: int = 0, device=None, rank: int = 0,
                   world_size: int = 1) -> DataLoader:
    """A DataLoader over this process's batches of the unshuffled dataset (shard_of_batches); its
    batch_indices say which batch of the whole set each one is."""
    shard = shard_of_batches(len(dataset), batch_size, rank, world_size)
    loader = DataLoader(dataset, batch_sampler=list(shard.values()), num_workers=workers,
                        pin_memory=device is not None and torch.device(device).type == "cuda")
    loader.batch_indices = list(shard)
    return loader


def numbered_batches(loader):
    """(batch index, (x, y)) per batch: a sharded_loader's own indices; any other loader is taken to hold
    the whole set in order (0, 1, 2, ...)."""
    return zip(getattr(loader, "batch_indices", itertools.count()), loader)


def batch_seed(seed: int, batch_index: int) -> int:
    """The seed of one batch of an attack: a function of the attack's seed and the batch's index only."""
    return (seed * 7_919 + batch_index) % (2 ** 62)


def seed_batch(seed: int, batch_index: int, generator: torch.Generator):
    """Seed the attack's generator and the (isolated) global RNG for one batch, so that its adversarials
    depend neither on the process that attacks it nor on the batches attacked before it."""
    seed = batch_seed(seed, batch_index)
    generator.manual_seed(seed)
    _seed_global_rng(seed)


def _progress(loader, desc: str):
    """The loader's numbered batches, with a progress bar on rank 0 only."""
    return tqdm(numbered_batches(loader), total=len(loader), desc=desc, leave=False, dynamic_ncols=True,
                disable=not distributed.is_main())


# ----------------------------------------------------------------------------------------------
# Running attacks


@dataclass
class BudgetCheck:
    """What the returned examples of one attack measured against its budget, over all batches."""
    limit: float
    measure: str
    max_value: float = 0.0
    batches: int = 0
    violating_batches: int = 0
    min_pixel: float = 0.0
    max_pixel: float = 1.0

    def record(self, value: float, allowed: float, low: float, high: float):
        self.batches += 1
        self.max_value = max(self.max_value, value)
        self.min_pixel, self.max_pixel = min(self.min_pixel, low), max(self.max_pixel, high)
        if value > allowed or low < -_ABS_TOL or high > 1 + _ABS_TOL or math.isnan(value):
            self.violating_batches += 1


def measure_budget(attack: Attack, x, output: AttackOutput) -> tuple:
    """One returned batch against the budget, as BudgetCheck.record's (value, allowed, low, high): its
    largest perturbation (or transport cost relative to the image's mass, and the plan's marginals, for
    FWA) and its pixel range."""
    x_adv = output.x_adv.float()
    low, high = float(x_adv.min()), float(x_adv.max())
    if attack.threat == "wasserstein":
        geometry = LocalTransport(x.shape[2], x.shape[3], attack.settings["kernel_size"], x.device)
        precise = torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64
        plan, x_precise = output.plan.to(precise), x.to(precise)
        relative_cost = geometry.cost_of(plan) / x_precise.flatten(1).sum(dim=1).clamp_min(1e-12)
        marginal_error = max(float((geometry.source_mass(plan) - x_precise).abs().max()),
                             float((geometry.image_of(plan) - x_adv.to(precise)).abs().max()))
        value = float(relative_cost.max())
        allowed = attack.bound * (1 + _REL_TOL) + _ABS_TOL if marginal_error <= _REL_TOL else -1.0
    else:
        value = float(perturbation_norms(x_adv, x.float(), attack.threat).max())
        allowed = attack.bound * (1 + _REL_TOL) + _ABS_TOL
    return value, allowed, low, high


def predictions(model, x, device, amp):
    """Predicted classes, and whether any logit was NaN."""
    with torch.no_grad(), frozen_eval(model), autocast(device, amp):
        logits = model(x)
    return logits.argmax(dim=1), bool(torch.isnan(logits).any())


@dataclass
class AttackResult:
    robust: torch.Tensor                     # bool per example: still classified correctly
    seconds: float
    budget: Optional[BudgetCheck] = None
    nan_batches: int = 0
    unthresholded_robust: Optional[torch.Tensor] = None
    side_effects: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    predicted: Optional[torch.Tensor] = None  # the predicted class per example (int64)
    labels: Optional[torch.Tensor] = None     # the true class per example
    seconds_this_run: Optional[float] = None  # a continued run (--resume): its own wall time; seconds includes
                                              # the journalled batches' seconds (None: seconds is this run's)
    journalled_batches: int = 0               # batches taken from the journal, not attacked again (all processes)

    @property
    def accuracy(self) -> float:
        return self.robust.float().mean().item() if len(self.robust) else float("nan")

    @property
    def label_mi_bits(self) -> float:
        """I(Y; Y^) in bits between the true labels and the predictions, plug-in from the confusion matrix over
        every evaluated example (nan when the predictions were not kept)."""
        if self.predicted is None or self.labels is None:
            return float("nan")
        return hard_label_mi(self.predicted, self.labels)


@dataclass
class BatchOutcome:
    """What one batch gave; an AttackResult is its batches' outcomes, every process's, in batch order."""
    index: int                               # the batch's index in the whole test set
    robust: torch.Tensor                     # on the CPU
    nan: bool = False
    budget: Optional[tuple] = None           # BudgetCheck.record's arguments
    unthresholded_robust: Optional[torch.Tensor] = None
    notes: list = field(default_factory=list)
    predicted: Optional[torch.Tensor] = None  # the predicted class per example, on the CPU
    labels: Optional[torch.Tensor] = None     # the true class per example, on the CPU


def in_batch_order(per_process: list) -> list:
    """Every process's BatchOutcome lists (distributed.gather_from_all's answer) as one list in batch order."""
    return sorted((outcome for outcomes in per_process for outcome in outcomes), key=lambda outcome: outcome.index)


def combine(outcomes: list, seconds: float, budget: Optional[BudgetCheck] = None,
            side_effects: list = ()) -> AttackResult:
    """One AttackResult from the outcomes of every batch, in batch order."""
    if budget is not None:
        for outcome in outcomes:
            budget.record(*outcome.budget)
    robust = [outcome.robust for outcome in outcomes]
    unthresholded = [outcome.unthresholded_robust for outcome in outcomes if outcome.unthresholded_robust is not None]
    predicted, labels = None, None
    if all(outcome.predicted is not None and outcome.labels is not None for outcome in outcomes):
        empty = torch.zeros(0, dtype=torch.long)
        predicted = torch.cat([empty] + [outcome.predicted.long() for outcome in outcomes])
        labels = torch.cat([empty] + [outcome.labels.long() for outcome in outcomes])
    return AttackResult(torch.cat(robust) if robust else torch.zeros(0, dtype=torch.bool), seconds, budget,
                        sum(outcome.nan for outcome in outcomes), torch.cat(unthresholded) if unthresholded else None,
                        list(side_effects), list(dict.fromkeys(note for outcome in outcomes for note in outcome.notes)),
                        predicted, labels)


def problems_of_every_process(problems: list) -> list:
    """The side effects any process found, each once (a collective: every process calls it)."""
    return list(dict.fromkeys(problem for found in distributed.gather_from_all(problems) for problem in found))


def clean_predictions(model, loader, device, amp, desc="clean") -> AttackResult:
    started = time.perf_counter()
    outcomes = []
    for index, (x, y) in _progress(loader, desc):
        x, y = x.to(device), y.to(device)
        predicted, has_nan = predictions(model, x, device, amp)
        outcomes.append(BatchOutcome(index, (predicted == y).cpu(), has_nan, predicted=predicted.cpu(), labels=y.cpu()))
    outcomes = in_batch_order(distributed.gather_from_all(outcomes))
    return combine(outcomes, time.perf_counter() - started)


def _new_budget_check(attack: Attack) -> BudgetCheck:
    measure = {"linf": "L-inf norm", "l2": "L2 norm", "wasserstein": "transport cost / image mass"}[attack.threat]
    return BudgetCheck(limit=attack.bound, measure=measure)


def run_attack(model, attack: Attack, loader, device, amp, seed: int, desc: str, journal=None) -> AttackResult:
    """Attack every batch; per example, whether the model still classifies the adversarial correctly.

    Each batch draws from the attack's generator (PGD) or from the global RNG (library attacks), both
    seeded from (seed, batch index) and the global one restored afterwards. Under torchrun each process
    attacks its shard of the loader and every process gets the whole result. The model is checked for
    left-behind gradients or changed state, and restored if needed (reported in side_effects).

    With a journal (utils/eval_journal.py AttackJournal), a batch it holds is taken from it, not attacked
    again, and every batch attacked is recorded in it as soon as it is done. The result's seconds are then
    this run's wall time plus the journalled batches' seconds; seconds_this_run is this run's alone."""
    snapshot = ModelSnapshot(model)
    generator = torch.Generator(device=device)
    outcomes, journalled, journalled_seconds = [], 0, 0.0
    started = time.perf_counter()
    with isolated_rng(seed, device):
        bar = _progress(loader, desc)
        for index, (x, y) in bar:
            if journal is not None and index in journal.done:
                outcome, seconds = journal.done[index]
                outcomes.append(outcome)
                journalled, journalled_seconds = journalled + 1, journalled_seconds + seconds
                bar.set_postfix(resumed=journalled)  # redraw now: the next batch to attack may take minutes
                continue
            batch_started = time.perf_counter()
            x, y = x.to(device), y.to(device)
            seed_batch(seed, index, generator)
            with autocast(device, amp):
                output = attack.craft(model, x, y, generator)
            predicted, has_nan = predictions(model, output.x_adv.clamp(0, 1), device, amp)
            unthresholded = None
            if output.unthresholded is not None:
                unthresholded = (predictions(model, output.unthresholded.clamp(0, 1), device, amp)[0] == y).cpu()
            outcomes.append(BatchOutcome(index, (predicted == y).cpu(), has_nan, measure_budget(attack, x, output),
                                         unthresholded, output.notes, predicted.cpu(), y.cpu()))
            if journal is not None:
                journal.record(outcomes[-1], time.perf_counter() - batch_started)
            done = torch.cat([outcome.robust for outcome in outcomes])
            bar.set_postfix(acc=f"{done.float().mean().item():.3f}", refresh=False)
    side_effects = snapshot.problems(model)
    if side_effects:
        snapshot.restore(model)
    outcomes = in_batch_order(distributed.gather_from_all(outcomes))
    side_effects = problems_of_every_process(side_effects)
    this_run = time.perf_counter() - started
    if journal is None:
        return combine(outcomes, this_run, _new_budget_check(attack), side_effects)
    # every process's batches taken from the journal and their seconds, so that all agree on the totals
    counts = distributed.gather_from_all((journalled, journalled_seconds))
    result = combine(outcomes, this_run + sum(seconds for _, seconds in counts), _new_budget_check(attack),
                     side_effects)
    result.seconds_this_run, result.journalled_batches = this_run, sum(count for count, _ in counts)
    return result


def run_transfer(surrogate, targets: list, attack: Attack, loader, device, amp, seed: int) -> list:
    """Adversarials crafted on the surrogate (white-box there), evaluated on every target: one
    AttackResult per target. The budget is checked once, on the crafted examples. Batches are seeded
    and sharded as in run_attack."""
    snapshots = [ModelSnapshot(model) for model in [surrogate, *targets]]
    generator = torch.Generator(device=device)
    outcomes = [[] for _ in targets]  # per target, per batch
    started = time.perf_counter()
    with isolated_rng(seed, device):
        for index, (x, y) in _progress(loader, "transfer"):
            x, y = x.to(device), y.to(device)
            seed_batch(seed, index, generator)
            with autocast(device, amp):
                output = attack.craft(surrogate, x, y, generator)
            budget = measure_budget(attack, x, output)
            for target_outcomes, model in zip(outcomes, targets):
                predicted, has_nan = predictions(model, output.x_adv.clamp(0, 1), device, amp)
                target_outcomes.append(BatchOutcome(index, (predicted == y).cpu(), has_nan, budget,
                                                    predicted=predicted.cpu(), labels=y.cpu()))
    side_effects = []
    for snapshot, model in zip(snapshots, [surrogate, *targets]):
        side_effects.extend(snapshot.problems(model))
        snapshot.restore(model)
    per_process = distributed.gather_from_all(outcomes)
    side_effects = problems_of_every_process(side_effects)
    seconds = time.perf_counter() - started
    return [combine(in_batch_order([process_outcomes[target] for process_outcomes in per_process]), seconds,
                    _new_budget_check(attack), side_effects)
            for target in range(len(targets))]


# ----------------------------------------------------------------------------------------------
# Worst case and sanity checks


def worst_case(clean_correct, robust_by_attack: dict) -> dict:
    """Per threat model with at least one of its attacks run: the per-example AND of clean correctness
    and every one of its attacks' robust flags, and the attacks included."""
    result = {}
    for threat, group in WORST_CASE_GROUPS.items():
        names = [name for name in group if name in robust_by_attack]
        if not names:
            continue
        robust = clean_correct.clone()
        for name in names:
            robust &= robust_by_attack[name]
        result[threat] = (robust, names)
    return result


# A stronger L-inf attack leaving this many points fewer correct than PGD means PGD alone would mislead.
PGD_OVERSTATES_BY = 0.03


def sanity_warnings(label: str, clean: AttackResult, results: dict, attacks: dict) -> list:
    """One-line warnings in the spirit of AutoAttack's checks, for one model: a model at chance, attacks that
    fail, leave their budget or return NaN, and PGD outdone by another attack (a masked or saturated gradient)."""
    lines = []
    if clean.nan_batches:
        lines.append(f"{label}: NaN in the model's outputs on clean examples ({clean.nan_batches} batches)")
    if clean.labels is not None and len(clean.labels):
        chance = 1 / (int(clean.labels.max()) + 1)
        if clean.accuracy < 1.5 * chance:
            lines.append(f"{label}: clean accuracy {clean.accuracy:.2%} is near chance ({chance:.0%}): the model is "
                         f"not trained, and its robust accuracy says nothing about its defense")
    pgd = results.get("pgd")
    stronger = {name: r for name, r in results.items() if name in WORST_CASE_GROUPS["linf"] and name != "pgd"
                and name not in LABEL_MI_ATTACKS}
    if pgd is not None and stronger:
        best = min(stronger, key=lambda name: stronger[name].accuracy)
        if stronger[best].accuracy <= pgd.accuracy - PGD_OVERSTATES_BY:
            lines.append(f"{label}: {attacks[best].column} leaves {stronger[best].accuracy:.2%} correct, "
                         f"{100 * (pgd.accuracy - stronger[best].accuracy):.1f} points fewer than {attacks['pgd'].column} "
                         f"({pgd.accuracy:.2%}): PGD alone overstates this model's robustness (a masked or saturated "
                         f"gradient); the worst case is the honest number")
    for name, result in results.items():
        attack = attacks[name]
        column = attack.column if name != "transfer" else "the transfer attack"
        if name in LABEL_MI_ATTACKS:  # it minimises the label MI, not the accuracy: judged on the label MI
            if result.label_mi_bits > clean.label_mi_bits:
                lines.append(f"{label}: {column} label MI {result.label_mi_bits:.3f} bits is above the clean label MI "
                             f"{clean.label_mi_bits:.3f} bits: the attack is failing")
        elif result.accuracy > clean.accuracy:
            revived = int((result.robust & ~clean.robust).sum())
            lines.append(f"{label}: {column} accuracy {result.accuracy:.2%} is above clean accuracy {clean.accuracy:.2%} "
                         f"({revived} examples misclassified clean are correct after the attack): the attack is failing")
        check = result.budget
        if check is not None and check.violating_batches:
            lines.append(f"{label}: {column} returned examples outside its budget in {check.violating_batches} of "
                         f"{check.batches} batches (max {check.measure} {check.max_value:.6g}, limit {check.limit:.6g}; "
                         f"pixel range [{check.min_pixel:.6g}, {check.max_pixel:.6g}])")
        if result.nan_batches:
            lines.append(f"{label}: NaN in the model's outputs under {column} ({result.nan_batches} batches)")
        if result.side_effects:
            lines.append(f"{label}: {column} left {' and '.join(result.side_effects)} behind; the model was restored")
        lines += [f"{label}: {column}: {note}" for note in result.notes]
    transfer = results.get("transfer")
    white = {name: r for name, r in results.items() if name in WORST_CASE_GROUPS["linf"]}
    if transfer is not None and white:
        best_name = min(white, key=lambda name: white[name].accuracy)
        if transfer.accuracy < white[best_name].accuracy:
            lines.append(f"{label}: the black-box transfer attack ({transfer.accuracy:.2%}) beats every white-box L-inf "
                         f"attack (best: {attacks[best_name].column} {white[best_name].accuracy:.2%}): "
                         f"the white-box attacks are failing (gradient masking?)")
    return lines


# ----------------------------------------------------------------------------------------------
# Tables


def table_columns(attack_names, attacks: dict, transfer_header: str = None) -> list:
    """(key, header) per column in the paper's Table 1 order: clean, the L-inf attacks and FWA (the adaptive
    attacks after the paper's, each "-p" variant beside its honest attack), the L-inf worst case, the L2
    attacks, the L2 worst case, then the transfer attack (Table 2)."""
    columns = [("clean", "None")]
    for name in LINF_COLUMNS:
        if name in attack_names:
            columns.append((name, attacks[name].column))
    if any(name in attack_names for name in WORST_CASE_GROUPS["linf"]):
        columns.append(("worst_linf", WORST_CASE_HEADERS["linf"]))
    for name in L2_COLUMNS:
        if name in attack_names:
            columns.append((name, attacks[name].column))
    if any(name in attack_names for name in WORST_CASE_GROUPS["l2"]):
        columns.append(("worst_l2", WORST_CASE_HEADERS["l2"]))
    if "transfer" in attack_names:
        columns.append(("transfer", transfer_header or "transfer"))
    return columns


def row_accuracies(record: dict) -> dict:
    values = {"clean": record["clean"]["accuracy"]}
    values.update({name: entry["accuracy"] for name, entry in record["attacks"].items()})
    values.update({f"worst_{threat}": entry["accuracy"] for threat, entry in record["worst_case"].items()})
    return values


def row_label_mi(record: dict) -> dict:
    """A results.json model record's label MI I(Y; Y^) in bits per column key (clean and every attack; the
    worst-case columns have none: they keep no single prediction per example)."""
    values = {"clean": record["clean"].get("label_mi_bits")}
    values.update({name: entry.get("label_mi_bits") for name, entry in record["attacks"].items()})
    return {key: value for key, value in values.items() if value is not None}


def format_percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def format_bits(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def markdown_table(labels, columns, accuracies, formatter=format_percent) -> str:
    """A markdown table: a row per model (its label, then its accuracy in % per column key).

    accuracies: one dict per label mapping column keys to accuracies in [0, 1] (missing: '-'); formatter
    writes a cell (format_bits: label MI in bits)."""
    header = ["Defense"] + [title for _, title in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for label, values in zip(labels, accuracies):
        cells = [label] + [formatter(values.get(key)) for key, _ in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
