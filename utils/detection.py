"""test_detection.py's attacks and per-model evaluation (docs/method.md section 14).

Every attack works on the model's logits h (an RCE model's -Z), so "predicted" is argmax h throughout.
The RCE authors' attacks (their test_adv.py), on the model's own prediction where they take a label:
    fgsm     one signed-gradient step of epsilon on CE(h, predicted label), no random start
    bim      steps x epsilon/steps of the same
    ilcm     iterative least-likely class: steps x epsilon/steps descending CE(h, argmin h) (a targeted BIM)
    jsma     advertorch's JacobianSaliencyMapAttack towards a random wrong class (L0, unbounded)
    cw       advertorch's CarliniWagnerL2Attack towards a random wrong class, confidence 0 (L2, unbounded)
    cw-hc    the same with confidence 10 (high confidence) and more iterations
and the detector-aware attack (aware): multi-targeted L-inf PGD at epsilon, towards each of the k wrong classes
with the highest clean logits, ascending
    min(margin_t, kappa) + c [min(0, log KD_t(x') - log tau_KD) + min(0, nonME(x') - tau_nonME)
                              + min(0, log conf(x') - log tau_conf)]
(Carlini & Wagner 2017's density term, extended to the other two scores), keeping per example the first iterate
that is misclassified and accepted by all three detectors, else the one accepted by the most of them; and
AutoAttack (aa: the reference code, version standard, on h and the true label, within epsilon), which ignores the
detectors but is the strongest attack on the classifier: the worst case of the attacks within epsilon is then at
most AutoAttack's robust accuracy, and its adversarials still have to get past the detectors.
advertorch's CW and JSMA read the logits as logits (argmax; CW masks the target with -1e4, right while |h| < 1e4);
torchattacks' CW and margin PGD are not used (they mask with (1 - one_hot), wrong on all-negative logits).
"""
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from defenses.detectors import COMBINED, DETECTORS, Detectors, model_scores, non_maximal_entropy, rank_auc
from defenses.rce import logits_and_features
from utils.advertorch_compat import advertorch_attacks
from utils.attacks import PGDConfig, ascend, frozen_eval, pgd_attack, random_start, targeted_margin
from utils.eval_journal import JournalCodec
from utils.evaluation import autoattack_craft, autoattack_module, batch_seed, isolated_rng

JSMA_CHUNK = 16
AUTHORS_ATTACKS = ("fgsm", "bim", "ilcm", "jsma", "cw", "cw-hc")
DETECTION_ATTACKS = AUTHORS_ATTACKS + ("aware", "aa")
# the attacks within the L-inf epsilon; JSMA, C&W and C&W-hc are minimum-norm attacks without a budget
BOUNDED_ATTACKS = ("fgsm", "bim", "ilcm", "aware", "aa")
# The attacker picks, per image, whichever attack within the budget works: an example survives the worst case
# only if it survives every one of them (AutoAttack's worst case, here with rejection).
WORST_CASE = "worst"
ATTACK_LABELS = {"fgsm": "FGSM", "bim": "BIM", "ilcm": "ILCM", "jsma": "JSMA", "cw": "C&W", "cw-hc": "C&W-hc",
                 "aware": "detector-aware PGD", "aa": "AutoAttack", "clean": "Clean",
                 WORST_CASE: "Worst case within epsilon"}


def bounded_attacks(attacks) -> list:
    return [name for name in attacks if name in BOUNDED_ATTACKS]


@dataclass
class DetectionAttack:
    """craft(model, detectors, x, y, generator) -> (x_adv, target per example or None)."""
    name: str
    settings: dict
    craft: Callable

    @property
    def bounded(self) -> bool:
        return self.name in BOUNDED_ATTACKS


def random_wrong_class(y: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    shift = torch.randint(1, num_classes, y.shape, generator=generator, device=generator.device).to(y.device)
    return (y + shift) % num_classes


def _predicted(model, x):
    with torch.no_grad(), frozen_eval(model):
        return model(x).float()


def _sign_attack(config: PGDConfig, least_likely: bool):
    def craft(model, detectors, x, y, generator):
        logits = _predicted(model, x)
        if least_likely:
            target = logits.argmin(dim=1)
            return pgd_attack(model, x, y, config, generator, target=target), target
        return pgd_attack(model, x, logits.argmax(dim=1), config, generator), None
    return craft


def _two_gradient_jsma():
    """advertorch's JSMA with its forward derivative from two backward passes instead of one per class: the
    gradients of h_target and of sum_j h_j, whose difference is the sum of the other classes' (exactly what
    advertorch computes from the full Jacobian)."""
    base = advertorch_attacks().JacobianSaliencyMapAttack

    class TwoGradientJSMA(base):
        def _compute_forward_derivative(self, xadv, y):
            xvar = xadv.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = self.predict(xvar)
                target, = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), xvar, retain_graph=True)
                total, = torch.autograd.grad(logits.sum(), xvar)
            return target.flatten(1), (total - target).flatten(1)
    return TwoGradientJSMA


def _jsma(num_classes, theta, gamma):
    def craft(model, detectors, x, y, generator):
        target = random_wrong_class(y, num_classes, generator)
        with frozen_eval(model):
            attack = _two_gradient_jsma()(model, num_classes, clip_min=0.0, clip_max=1.0, theta=theta, gamma=gamma)
            # advertorch scores every pixel pair: a (B, d, d) matrix, 2.4 GB for 250 28x28 images; in chunks
            return torch.cat([attack.perturb(xs, ts).detach()
                              for xs, ts in zip(x.split(JSMA_CHUNK), target.split(JSMA_CHUNK))]), target
    return craft


def _cw(num_classes, confidence, steps, search_steps, lr, initial_const):
    def craft(model, detectors, x, y, generator):
        target = random_wrong_class(y, num_classes, generator)
        with frozen_eval(model):
            attack = advertorch_attacks().CarliniWagnerL2Attack(
                model, num_classes, confidence=confidence, targeted=True, learning_rate=lr,
                binary_search_steps=search_steps, max_iterations=steps, abort_early=True, initial_const=initial_const,
                clip_min=0.0, clip_max=1.0)
            return attack.perturb(x, target).detach(), target
    return craft


def aware_objective(logits, features, target, detectors: Detectors, kappa: float, c: float):
    """(B,) the detector-aware attack's objective (module docstring) at x' towards `target`."""
    thresholds = detectors.thresholds
    margin = targeted_margin(logits, target).clamp(max=kappa)
    log_kd = detectors.density.log_density(features, target).clamp_min(-1e30)
    log_conf = F.log_softmax(logits, dim=1).amax(dim=1)
    log_tau_conf = torch.log(torch.tensor(max(thresholds["confidence"], 1e-30)))
    penalty = ((log_kd - thresholds["k-density"]).clamp(max=0) + (non_maximal_entropy(logits) - thresholds["non-me"])
               .clamp(max=0) + (log_conf - log_tau_conf).clamp(max=0))
    return margin + c * penalty


def _evasion_level(logits, y, detectors: Detectors, features) -> torch.Tensor:
    """0 when classified correctly, else 1 + the number of detectors (of 3) that accept it."""
    accepted = detectors.accepted(detectors.scores(logits, features))
    count = sum(accepted[name].long() for name in DETECTORS)
    return torch.where(logits.argmax(dim=1) != y, 1 + count, torch.zeros_like(count))


def detector_aware_attack(model, detectors: Detectors, x, y, config: PGDConfig, targets: int, kappa: float, c: float,
                          generator):
    """The detector-aware attack (module docstring); returns the adversarials and the target each came from."""
    x = x.detach()
    best, best_level = x.clone(), torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    best_target = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    with frozen_eval(model):
        logits = _predicted(model, x)
        wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        ranked = wrong.sort(dim=1, descending=True, stable=True).indices[:, :min(targets, logits.shape[1] - 1)]
        for rank in range(ranked.shape[1]):
            target = ranked[:, rank]
            delta = (x + random_start(x, config, generator).clamp(-config.epsilon, config.epsilon)).clamp(0, 1) - x
            for step in range(config.num_steps + 1):
                delta.requires_grad_(True)
                with torch.enable_grad():
                    logits, features = logits_and_features(model, x + delta)
                    logits = logits.float()
                    objective = aware_objective(logits, features, target, detectors, kappa, c).sum()
                    grad, = torch.autograd.grad(objective, delta) if step < config.num_steps else (None,)
                with torch.no_grad():
                    level = _evasion_level(logits.detach(), y, detectors, features.detach())
                    better = level > best_level
                    best[better] = (x + delta.detach())[better]
                    best_level[better], best_target[better] = level[better], target[better]
                    if grad is not None:
                        delta = ascend(x, delta.detach(), grad, "linf", config.step_size, config.epsilon)
    return best.detach(), best_target


def _autoattack_on_logits(epsilon: float):
    """AutoAttack (standard) as test_comparison.py runs it, seeded from the batch's generator; detector-oblivious."""
    def craft(model, detectors, x, y, generator):
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator, device=generator.device))
        return autoattack_craft(epsilon, "standard", seed)(model, x, y, generator).x_adv, None
    return craft


def _aware(config: PGDConfig, targets: int, kappa: float, c: float):
    def craft(model, detectors, x, y, generator):
        return detector_aware_attack(model, detectors, x, y, config, targets, kappa, c, generator)
    return craft


def build_detection_attacks(names, args, num_classes: int) -> list:
    """DetectionAttack objects from test_detection.py's resolved settings (--aware-targets None: every wrong class)."""
    eps = args.epsilon
    targets = min(args.aware_targets or num_classes - 1, num_classes - 1)
    make = {
        "fgsm": lambda: DetectionAttack("fgsm", {"epsilon": eps, "steps": 1, "step_size": eps, "label": "predicted",
                                                 "random_start": "none"},
                                        _sign_attack(PGDConfig("linf", eps, eps, 1, random_start="none"), False)),
        "bim": lambda: DetectionAttack("bim", {"epsilon": eps, "steps": args.bim_steps, "step_size": eps / args.bim_steps,
                                               "label": "predicted", "random_start": "none"},
                                       _sign_attack(PGDConfig("linf", eps, eps / args.bim_steps, args.bim_steps,
                                                              random_start="none"), False)),
        "ilcm": lambda: DetectionAttack("ilcm", {"epsilon": eps, "steps": args.bim_steps, "step_size": eps / args.bim_steps,
                                                 "target": "least likely class, argmin h", "random_start": "none",
                                                 "loss": "-CE(h, target)"},
                                        _sign_attack(PGDConfig("linf", eps, eps / args.bim_steps, args.bim_steps,
                                                               loss="targeted-ce", random_start="none"), True)),
        "jsma": lambda: DetectionAttack("jsma", {"theta": args.jsma_theta, "gamma": args.jsma_gamma,
                                                 "target": "random wrong class",
                                                 "implementation": "advertorch.attacks.JacobianSaliencyMapAttack"},
                                        _jsma(num_classes, args.jsma_theta, args.jsma_gamma)),
        "cw": lambda: DetectionAttack("cw", {"confidence": 0.0, "steps": args.cw_steps,
                                             "binary_search_steps": args.cw_search_steps, "lr": args.cw_lr,
                                             "initial_const": args.cw_initial_const, "target": "random wrong class",
                                             "implementation": "advertorch.attacks.CarliniWagnerL2Attack"},
                                      _cw(num_classes, 0.0, args.cw_steps, args.cw_search_steps, args.cw_lr,
                                          args.cw_initial_const)),
        "cw-hc": lambda: DetectionAttack("cw-hc", {"confidence": args.cw_hc_confidence, "steps": args.cw_hc_steps,
                                                   "binary_search_steps": args.cw_search_steps, "lr": args.cw_lr,
                                                   "initial_const": args.cw_initial_const, "target": "random wrong class",
                                                   "implementation": "advertorch.attacks.CarliniWagnerL2Attack"},
                                         _cw(num_classes, args.cw_hc_confidence, args.cw_hc_steps, args.cw_search_steps,
                                             args.cw_lr, args.cw_initial_const)),
        "aware": lambda: DetectionAttack("aware", {"epsilon": eps, "steps": args.aware_steps,
                                                   "step_size": args.aware_step_size, "targets": targets,
                                                   "kappa": args.aware_kappa, "c": args.aware_c, "random_start": "uniform",
                                                   "keeps": "per example the first iterate misclassified and accepted by "
                                                            "all three detectors, else the one accepted by most"},
                                         _aware(PGDConfig("linf", eps, args.aware_step_size, args.aware_steps),
                                                targets, args.aware_kappa, args.aware_c)),
        "aa": lambda: DetectionAttack("aa", {"epsilon": eps, "version": "standard", "label": "true",
                                             "detectors": "ignored", "implementation": autoattack_module()},
                                      _autoattack_on_logits(eps)),
    }
    return [make[name]() for name in names]


# ----------------------------------------------------------------------------------------------
# Evaluation of one model


@dataclass
class Outcome:
    """Per example (on the CPU): the prediction, the three scores and the acceptances of a set of inputs."""
    predicted: torch.Tensor
    scores: dict
    accepted: dict
    target: torch.Tensor = None
    l2: torch.Tensor = None
    l0: torch.Tensor = None
    linf: torch.Tensor = None
    seconds: float = 0.0
    notes: list = field(default_factory=list)


def _outcome(parts: list, seconds: float = 0.0) -> Outcome:
    cat = lambda key: torch.cat([p[key] for p in parts]) if parts and parts[0].get(key) is not None else None  # noqa
    return Outcome(cat("predicted"), {n: torch.cat([p["scores"][n] for p in parts]) for n in DETECTORS},
                   {n: torch.cat([p["accepted"][n] for p in parts]) for n in DETECTORS + (COMBINED,)},
                   cat("target"), cat("l2"), cat("l0"), cat("linf"), seconds)


def _describe(model, detectors, x) -> dict:
    logits, scores = model_scores(model, detectors, x)
    return {"predicted": logits.argmax(dim=1).cpu(), "scores": {n: s.cpu() for n, s in scores.items()},
            "accepted": {n: a.cpu() for n, a in detectors.accepted(scores).items()}}


def clean_outcome(model, detectors: Detectors, batches, device) -> Outcome:
    started = time.perf_counter()
    parts = [_describe(model, detectors, x.to(device)) for _, (x, _) in batches]
    return _outcome(parts, time.perf_counter() - started)


# A journalled batch of test_detection.py --resume (utils/eval_journal.py): its index, seconds and part.
DETECTION_BATCHES = JournalCodec(lambda item, seconds: {"index": item[0], "seconds": float(seconds), "part": item[1]},
                                 lambda entry: entry["part"])


def attack_outcome(model, detectors: Detectors, attack: DetectionAttack, batches, device, seed: int,
                   journal=None) -> Outcome:
    """Each batch attacked with its own seed (batch_seed) and the global RNG isolated, so that a batch's part is
    the same in any run: one the journal (an AttackJournal with DETECTION_BATCHES) holds is taken from it, each
    other is added to it. seconds: this run's plus the journalled batches'."""
    started = time.perf_counter()
    generator = torch.Generator(device=device)
    parts, journalled_seconds = [], 0.0
    with isolated_rng(seed, torch.device(device)):
        for index, (x, y) in batches:
            if journal is not None and index in journal.done:
                part, seconds = journal.done[index]
                parts.append(part)
                journalled_seconds += seconds
                continue
            batch_started = time.perf_counter()
            x, y = x.to(device), y.to(device)
            generator.manual_seed(batch_seed(seed, index))
            torch.manual_seed(batch_seed(seed, index))
            x_adv, target = attack.craft(model, detectors, x, y, generator)
            part = _describe(model, detectors, x_adv)
            difference = (x_adv - x).flatten(1).float()
            part.update(target=None if target is None else target.cpu(), l2=difference.norm(dim=1).cpu(),
                        linf=difference.abs().amax(dim=1).cpu(), l0=(difference.abs() > 1e-6).sum(dim=1).cpu())
            parts.append(part)
            if journal is not None:
                journal.record((int(index), part), time.perf_counter() - batch_started)
    return _outcome(parts, time.perf_counter() - started + journalled_seconds)


# C&W has no budget: given enough iterations it fools nearly every correctly classified image. Below this
# success rate it has stopped early on the hard ones, and its AUC covers only the easier images.
MINIMUM_NORM_ATTACKS = ("cw", "cw-hc")
MIN_MINIMUM_NORM_SUCCESS = 0.9


def weak_minimum_norm_attack(name: str, success_rate: float) -> str | None:
    """The warning for a C&W run that fooled too few of the correctly classified images, else None."""
    if name not in MINIMUM_NORM_ATTACKS or not success_rate < MIN_MINIMUM_NORM_SUCCESS or success_rate == 0:
        return None  # success 0 (no pair at all) has its own warning; nan (no correct image) says nothing
    return (f"{ATTACK_LABELS[name]} fooled only {success_rate:.1%} of the correctly classified images (a "
            f"minimum-norm attack should reach nearly all): its AUC covers the easier ones; raise "
            f"--cw-steps / --cw-hc-steps, --cw-lr or --cw-search-steps")


def attack_metrics(labels: torch.Tensor, clean: Outcome, adv: Outcome) -> dict:
    """The authors' protocol (AUC over the pairs of a correctly classified clean image and a misclassified
    adversarial) and the reviewers' (accuracy with rejection, per detector and for all three)."""
    clean_correct = clean.predicted == labels
    adv_correct = adv.predicted == labels
    pairs = clean_correct & ~adv_correct
    survival = worst_case_metrics(labels, clean, {"attack": adv})  # one attack's worst case is its own
    record = {"pairs": int(pairs.sum()), "success_rate": float((~adv_correct)[clean_correct].float().mean())
              if clean_correct.any() else float("nan"),
              "auc": {name: rank_auc(clean.scores[name][pairs], adv.scores[name][pairs]) for name in DETECTORS},
              "robust_accuracy": survival["robust_accuracy"],
              "accuracy_with_rejection": survival["accuracy_with_rejection"],
              "adversarial_accepted": {}, "seconds": round(adv.seconds, 3),
              "median_l2": float(adv.l2[pairs].median()) if pairs.any() else float("nan"),
              "median_l0": float(adv.l0[pairs].float().median()) if pairs.any() else float("nan"),
              "max_linf": float(adv.linf.max()) if len(adv.linf) else float("nan")}
    if adv.target is not None:
        record["target_reached"] = float((adv.predicted == adv.target)[clean_correct].float().mean()) \
            if clean_correct.any() else float("nan")
    for name in DETECTORS + (COMBINED,):
        fooled = pairs & adv.accepted[name]
        record["adversarial_accepted"][name] = float(fooled.sum() / pairs.sum()) if pairs.any() else float("nan")
    record["per_example"] = per_example_record(adv, "adv_")
    return record


def per_example_record(outcome: Outcome, prefix: str = "") -> dict:
    """What a results.json keeps of an Outcome per example: predictions and acceptances (as strings of 0/1)."""
    return {f"{prefix}predicted": outcome.predicted.tolist(),
            f"{prefix}accepted": {name: "".join("1" if f else "0" for f in outcome.accepted[name].tolist())
                                  for name in DETECTORS + (COMBINED,)}}


def outcome_from_record(per_example: dict, prefix: str = "") -> Outcome:
    """The Outcome (predictions and acceptances only) of a per_example_record."""
    return Outcome(torch.tensor(per_example[f"{prefix}predicted"]), {},
                   {name: torch.tensor([flag == "1" for flag in flags])
                    for name, flags in per_example[f"{prefix}accepted"].items()})


def clean_metrics(labels: torch.Tensor, clean: Outcome) -> dict:
    """Clean accuracy, each detector's (and all three's) false-positive rate, and accuracy with rejection: an
    example counts when it is classified correctly and accepted."""
    correct = clean.predicted == labels
    return {"accuracy": float(correct.float().mean()),
            "fpr": {name: 1.0 - float(accepted.float().mean()) for name, accepted in clean.accepted.items()},
            "accuracy_with_rejection": {name: float((correct & accepted).float().mean())
                                        for name, accepted in clean.accepted.items()}}


def worst_case_metrics(labels: torch.Tensor, clean: Outcome, outcomes: dict) -> dict:
    """Accuracy without and with rejection (per detector and for all three) over the per-example worst case of
    `outcomes` ({attack name: Outcome}, the attacks within the L-inf budget): an example counts when its clean
    image is classified correctly (and accepted) and, under every attack, its adversarial is classified correctly
    (or rejected)."""
    clean_correct = clean.predicted == labels
    robust = clean_correct.clone()
    for adv in outcomes.values():
        robust &= adv.predicted == labels
    record = {"attacks": list(outcomes), "robust_accuracy": float(robust.float().mean()),
              "accuracy_with_rejection": {}}
    for name in DETECTORS + (COMBINED,):
        survives = clean_correct & clean.accepted[name]
        for adv in outcomes.values():
            survives &= (adv.predicted == labels) | ~adv.accepted[name]
        record["accuracy_with_rejection"][name] = float(survives.float().mean())
    return record


# ----------------------------------------------------------------------------------------------
# reproduce.py's study table (utils/evaluators.py): a model's record as {column key: value in [0, 1]}

SCORE_SHORT = {"confidence": "conf.", "non-me": "non-ME", "k-density": "K-dens.", COMBINED: "all three"}
# The detectors whose accuracy with rejection the study's table shows (every detector's is in the values and in
# each evaluation's results): K-density, the authors' detector, and all three together.
STUDY_REJECTION = ("k-density", COMBINED)


def auc_key(attack: str, score: str) -> str:
    return f"{attack}:auc:{score}"


def rejection_key(attack: str, detector: str) -> str:
    """Accuracy with rejection by `detector` (a score or COMBINED) under `attack` ("clean": on the clean images)."""
    return f"{attack}:rejection:{detector}"


def study_values(record: dict) -> dict:
    """One model's record of test_detection.py's results.json as the study's values, each in [0, 1]: clean accuracy
    ("clean"), every ROC AUC of the authors' protocol (auc_key) and every accuracy with rejection (rejection_key,
    clean and per attack, per detector and for all three), and per attack the accuracy without rejection
    ("<attack>:accuracy"). An undefined AUC (no pair: the attack succeeded on no correctly classified image) is
    left out, so that the study's cell averages the seeds where it is defined."""
    values = {"clean": record["clean"]["accuracy"]}
    for name, value in record["clean"]["accuracy_with_rejection"].items():
        values[rejection_key("clean", name)] = value
    for attack, metrics in record["attacks"].items():
        values[f"{attack}:accuracy"] = metrics["robust_accuracy"]
        if attack in AUTHORS_ATTACKS:
            for score, value in metrics["auc"].items():
                if value is not None and value == value:  # NaN: no pair
                    values[auc_key(attack, score)] = value
        for name, value in metrics["accuracy_with_rejection"].items():
            values[rejection_key(attack, name)] = value
    if "worst_case" in record:
        values[f"{WORST_CASE}:accuracy"] = record["worst_case"]["robust_accuracy"]
        for name, value in record["worst_case"]["accuracy_with_rejection"].items():
            values[rejection_key(WORST_CASE, name)] = value
    return values


def study_columns(attacks) -> list:
    """The study table's columns ([{key, header}], test_detection.py's results.json "columns") for the evaluated
    attacks: clean accuracy, then the authors' AUC table (every attack of theirs x every score; a cell is the AUC
    x 100, the talk's x10^-2), then accuracy (%) with rejection by K-density and by all three, clean and under
    every attack (the detector-aware one included). The other values of study_values stay in the evaluation's
    own results (per seed)."""
    columns = [{"key": "clean", "header": "Clean"}]
    columns += [{"key": auc_key(attack, score), "header": f"{ATTACK_LABELS[attack]} AUC {SCORE_SHORT[score]} (×10⁻²)"}
                for attack in attacks if attack in AUTHORS_ATTACKS for score in DETECTORS]
    rows = ("clean", *attacks, *([WORST_CASE] if len(bounded_attacks(attacks)) > 1 else []))
    columns += [{"key": rejection_key(attack, detector), "header": f"{ATTACK_LABELS[attack]}, rej. {SCORE_SHORT[detector]}"}
                for attack in rows for detector in STUDY_REJECTION]
    return columns
