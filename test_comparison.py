#!/usr/bin/env python3
"""Stage 4: evaluate checkpoints under the paper's attack suite and write its comparison table.

Every checkpoint (any stage's best.pt or last.pt) is attacked white-box with PGD-40 (L-inf), AutoAttack,
FWA-40 (Wasserstein), TI-DIM, PGD-40 (L2), CW and DDN (thresholded at epsilon), and optionally with
PGD-40 adversarials transferred from a --surrogate checkpoint. Adaptive L-inf attacks for defenses whose
logits are all <= 0 (MMC, ADP) run when named in --attacks: fgsm, bim, mim, pgd-mt (multi-targeted margin
PGD), pgd-restarts, and the ADP authors' protocol fgsm-p, bim-p, pgd-p, mim-p (cross-entropy on the
probabilities taken as logits, beside the honest attack; utils/evaluation.py says why), and pgd-label-mi
(PGD minimising the label MI I(Y; Y^) of each batch). Architecture, dataset and normalisation come from each
checkpoint. Writes results.json, results.csv and results.md (the paper's Table 1 layout, plus the per-example
worst case of each threat model, then the same table of the label MI I(Y; Y^) in bits between the true labels
and the predictions under each attack) into --out-dir.

Under torchrun (torchrun --standalone --nproc_per_node K test_comparison.py ...) the test batches are shared
out over the K processes and their per-example results gathered; rank 0 writes the same files as a single
process would, example for example (every batch is seeded by its index, not by the process that runs it).

An interrupted evaluation is continued with the same command plus --resume: every finished batch of every white-box
attack is kept in <out-dir>/progress (utils/eval_journal.py) and taken from there, so that the results equal an
uninterrupted run's, example for example (reproduce.py adds --resume when it re-runs an interrupted evaluation).

Example (Fashion-MNIST, two stage-1 runs, 1000 test images):
    python test_comparison.py --checkpoints checkpoints/standard_fashion-mnist_small-cnn_at_linf_seed0/best.pt \\
        checkpoints/standard_fashion-mnist_small-cnn_trades_linf_seed0/best.pt --test-limit 1000
"""
import argparse
import csv
import io
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from utils import distributed
from utils.checkpoint import atomic_write_json, atomic_write_text, checkpoint_in
from utils.cli import (ArgumentParser, add_checkpoints_to_evaluate, nonnegative_int, nonnegative_number,
                       parse_evaluation_args, positive_int, positive_number)
from utils.data import dataset_info, load_splits
from utils.errors import UserError, run_main
from utils.eval_journal import checkpoint_identity, fingerprint, open_journals, remove_journal
from utils.evaluation import (ADAPTIVE_ATTACKS, ATTACK_NAMES, LABEL_MI_ATTACKS, PROBABILITY_ATTACKS,
                              WHITE_BOX_ATTACKS, WORST_CASE_GROUPS, attack_seed, build_attacks,
                              clean_predictions, format_bits, fwa_default_radius, markdown_table, run_attack,
                              row_accuracies, row_label_mi, run_transfer, sanity_warnings, sharded_loader,
                              table_columns, tidim_default_kernel, worst_case)
from utils.label_mi import hard_label_mi
from utils.run_warnings import RunWarnings
from utils.runtime import default_channels_last, git_commit, package_versions
from utils.training import load_model

BASE_LOSS_LABELS = {"at": "Standard AT", "trades": "TRADES", "mart": "MART", "mixup": "mixup", "iat": "IAT",
                    "natural": "natural"}
NAMID_LABELS = {"at": "NAMID", "trades": "NAMID-T", "mart": "NAMID-M"}
HEAD_LABELS = {"mm-lda": "MM-LDA", "mmc": "MMC", "adp": "ADP", "rce": "RCE"}


def build_parser():
    parser = ArgumentParser(description="Stage 4: robust accuracy of checkpoints under the paper's attacks "
                                        "(Table 1 layout), written to results.json / .csv / .md.")
    group = add_checkpoints_to_evaluate(
        parser, "best.pt / last.pt files of any stage, or run folders (their best.pt), all of one "
             "dataset; a row each",
        "row labels, one per checkpoint (default: the defense, e.g. 'Standard AT', 'NAMID-T')")
    group.add_argument("--attacks", nargs="+", choices=ATTACK_NAMES, default=None, metavar="ATTACK",
                       help=f"any of: {', '.join(ATTACK_NAMES)} (default: the paper's white-box attacks, "
                            f"{' '.join(WHITE_BOX_ATTACKS)}, plus transfer when --surrogate is given; the adaptive "
                            f"attacks {' '.join(ADAPTIVE_ATTACKS)}, the ADP authors' protocol "
                            f"{' '.join(PROBABILITY_ATTACKS)} and the label-MI attack {' '.join(LABEL_MI_ATTACKS)} run "
                            f"only when named)")
    group.add_argument("--surrogate", default=None, metavar="CHECKPOINT",
                       help="checkpoint (or run folder) the transfer attack crafts its adversarials on (paper: VGG-19 "
                            "with Standard AT; default: none, no transfer attack)")
    group.add_argument("--out-dir", default=None, help="where the results go (default checkpoints/comparison_<dataset>_seed<seed>)")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default="data", help="where datasets live, in torchvision's layout")
    group.add_argument("--test-limit", type=positive_int, default=None,
                       help="class-balanced test subset (chosen with --seed); default: the whole test set")
    group.add_argument("--batch-size", type=positive_int, default=256)
    group.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader worker processes")

    group = parser.add_argument_group("threat models (default: the dataset's budgets)")
    group.add_argument("--epsilon", type=positive_number, default=None,
                       help="L-inf budget, fractions accepted (default 8/255 colour, 0.3 mnist, 0.1 fashion-mnist)")
    group.add_argument("--epsilon-l2", type=positive_number, default=None,
                       help="L2 budget (default 0.5 colour, 2.0 mnist, 1.5 fashion-mnist)")

    group = parser.add_argument_group("pgd, pgd-p, pgd-l2 and transfer (paper: 40 steps, step eps/4, random start)")
    group.add_argument("--pgd-steps", type=positive_int, default=40)
    group.add_argument("--pgd-step-size", type=positive_number, default=None, help="default epsilon / 4")
    group.add_argument("--pgd-l2-steps", type=positive_int, default=40)
    group.add_argument("--pgd-l2-step-size", type=positive_number, default=None, help="default epsilon-l2 / 4")

    group = parser.add_argument_group("aa (AutoAttack's reference code; iterations and queries are its own: 100 and 5000)")
    group.add_argument("--aa-version", choices=("standard", "plus"), default="standard")

    group = parser.add_argument_group("fwa (Frank-Wolfe Wasserstein attack, Wu et al. 2020)")
    group.add_argument("--fwa-radius", type=positive_number, default=None,
                       help="Wasserstein radius relative to the image's mass (default 0.005 on colour data and 0.5 on "
                            "mnist, Wu et al.'s CIFAR-10 and MNIST radii; 0.1 on fashion-mnist)")
    group.add_argument("--fwa-steps", type=positive_int, default=40)
    group.add_argument("--fwa-kernel-size", type=positive_int, default=5, help="local transport window (odd)")
    group.add_argument("--fwa-entropy", type=positive_number, default=1e-3, help="entropic regularisation of the LMO")
    group.add_argument("--fwa-dual-steps", type=positive_int, default=20, help="bisection steps of the LMO's dual")

    group = parser.add_argument_group("tidim (torchattacks' TIFGSM: momentum, input diversity, Gaussian TI kernel)")
    group.add_argument("--tidim-steps", type=positive_int, default=40)
    group.add_argument("--tidim-step-size", type=positive_number, default=None, help="default epsilon / 4, as pgd")
    group.add_argument("--tidim-kernel-size", type=positive_int, default=None,
                       help="TI kernel (default 15 on 32x32 and larger images, 7 on 28x28)")
    group.add_argument("--tidim-decay", type=nonnegative_number, default=1.0, help="momentum")
    group.add_argument("--tidim-diversity-prob", type=nonnegative_number, default=0.5)
    group.add_argument("--tidim-resize-rate", type=positive_number, default=0.9)

    group = parser.add_argument_group("cw and ddn (advertorch 0.2.3; thresholded at --epsilon-l2)")
    group.add_argument("--cw-steps", type=positive_int, default=20)
    group.add_argument("--cw-lr", type=positive_number, default=0.01)
    group.add_argument("--cw-search-steps", type=positive_int, default=4,
                       help="binary search steps over the constant (4 and initial constant 1: the published code's)")
    group.add_argument("--cw-initial-const", type=positive_number, default=1.0)
    group.add_argument("--cw-confidence", type=nonnegative_number, default=0.0)
    group.add_argument("--ddn-steps", type=positive_int, default=20)
    group.add_argument("--ddn-gamma", type=positive_number, default=0.05)
    group.add_argument("--ddn-init-norm", type=positive_number, default=1.0)
    group.add_argument("--ddn-levels", type=nonnegative_int, default=256,
                       help="quantisation levels, 256 for 8-bit images (0: none; the published code used 16)")

    group = parser.add_argument_group("fgsm, bim, mim and their -p variants (the ADP authors' attacks: no random "
                                      "start; fgsm is one step of size epsilon)")
    group.add_argument("--bim-steps", type=positive_int, default=10, help="iterative FGSM (the ADP authors' 10)")
    group.add_argument("--bim-step-size", type=positive_number, default=None, help="default epsilon / 10")
    group.add_argument("--mim-steps", type=positive_int, default=10,
                       help="momentum iterative FGSM (Dong et al. 2018; the ADP authors' 10)")
    group.add_argument("--mim-step-size", type=positive_number, default=None, help="default epsilon / 10")
    group.add_argument("--mim-decay", type=nonnegative_number, default=1.0, help="momentum")

    group = parser.add_argument_group("pgd-mt (multi-targeted PGD on the targeted margin h_t - max_{j != t} h_j, "
                                      "Gowal et al. 2019; uniform random start)")
    group.add_argument("--mt-steps", type=positive_int, default=40,
                       help="steps per target (as pgd's 40, so the column differs from PGD-40 by its loss and targets)")
    group.add_argument("--mt-step-size", type=positive_number, default=None, help="default epsilon / 4")
    group.add_argument("--mt-targets", type=positive_int, default=None,
                       help="wrong classes attacked, highest clean logit first (default: every wrong class, the "
                            "number of classes - 1)")

    group = parser.add_argument_group("pgd-restarts (long cross-entropy PGD with random restarts; per example the "
                                      "first restart that fools the model)")
    group.add_argument("--restarts", type=positive_int, default=5, help="random starts per example")
    group.add_argument("--restarts-steps", type=positive_int, default=100, help="steps per restart")
    group.add_argument("--restarts-step-size", type=positive_number, default=None, help="default epsilon / 10")

    group = parser.add_argument_group("pgd-label-mi (PGD minimising the plug-in label MI I(Y; Y^) of each batch's soft "
                                      "confusion matrix, jointly over the batch: an example's adversarial depends on "
                                      "its batch, so on --batch-size; uniform random start)")
    group.add_argument("--label-mi-steps", type=positive_int, default=40, help="as pgd's 40")
    group.add_argument("--label-mi-step-size", type=positive_number, default=None, help="default epsilon / 4")

    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=nonnegative_int, default=0, help="seeds every attack and the --test-limit subset")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored elsewhere)")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="the models in channels_last memory format (float rounding only). Default: on with CUDA, "
                            "and on the CPU for small-cnn (forward 1.9x, forward+input gradient 1.1x faster on one core: bench/results/"
                            "eval_speed_cpu.json); off otherwise")
    group.add_argument("--tensorboard", action="store_true",
                       help="also write the table to <out-dir>/tensorboard (a run per model, a scalar per column)")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted evaluation of the same --out-dir: every white-box attack takes "
                            "the batches that <out-dir>/progress (a per-batch journal, written by every run) holds "
                            "instead of attacking them again, when the journal was made with the same checkpoint "
                            "(SHA-256), label, attack settings and seed, test images, batch size, amp, channels_last, "
                            "device type and package versions (any number of processes); a journal made otherwise "
                            "is ignored with a warning and removed. The results equal an uninterrupted run's, "
                            "example for example. Clean predictions are recomputed, and the transfer attack is not "
                            "journalled (redone whole). The journal is deleted once the evaluation completes; "
                            "without --resume an earlier journal is deleted at the start")
    return parser


def defense_label(checkpoint: dict, path) -> str:
    """The defense a checkpoint was trained with, as the paper's tables name it."""
    stage, config = checkpoint.get("stage"), checkpoint.get("config", {})
    suffix = " (L2)" if config.get("norm") == "l2" else ""
    head = checkpoint.get("model_spec", {}).get("head", "softmax")
    if head in HEAD_LABELS:  # e.g. "natural, RCE head", "Standard AT, MMC head", "NAMID, MMC head"
        suffix = f", {HEAD_LABELS[head]} head" + suffix
    if stage == "standard":
        loss = config.get("loss", "at")
        return BASE_LOSS_LABELS.get(loss, f"standard {loss}") + suffix
    if stage == "namid":
        base = config.get("base_loss", "at")
        if config.get("mi_mode") == "wmim":
            return ("WMIM" if base == "at" else f"WMIM ({BASE_LOSS_LABELS.get(base, base)})") + suffix
        return NAMID_LABELS.get(base, f"NAMID ({base})") + suffix
    return f"{stage or 'model'} ({Path(path).parent.name})"


def unique_labels(labels, paths) -> list:
    """Labels made distinct by the run folder's name where two checkpoints share a defense."""
    result = list(labels)
    for index, label in enumerate(labels):
        if labels.count(label) > 1:
            result[index] = f"{label} [{Path(paths[index]).parent.name}/{Path(paths[index]).name}]"
    return result


def load_models(paths, device, channels_last=None) -> list:
    """(model, checkpoint) per path, in eval mode; in channels_last memory format as --channels-last says (unset:
    the device's default for the checkpoint's architecture), which checkpoint["channels_last"] records."""
    loaded = []
    for path in paths:
        model, checkpoint = load_model(path, device)
        arch = checkpoint["model_spec"]["arch"]
        checkpoint["channels_last"] = default_channels_last(device, arch) if channels_last is None else channels_last
        if checkpoint["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
        model.eval()
        loaded.append((model, checkpoint))
    return loaded


def check_one_dataset(named_checkpoints) -> str:
    datasets = {}
    for path, checkpoint in named_checkpoints:
        datasets.setdefault(checkpoint["model_spec"]["dataset"], []).append(str(path))
    if len(datasets) > 1:
        listing = "; ".join(f"{name}: {', '.join(paths)}" for name, paths in datasets.items())
        raise UserError(f"checkpoints of different datasets cannot share one table ({listing})")
    return next(iter(datasets))


def resolve_settings(args, info):
    """Fill every setting left unset from the dataset; check the combination of attacks and --surrogate."""
    args.epsilon = args.epsilon if args.epsilon is not None else info.epsilon_linf
    args.epsilon_l2 = args.epsilon_l2 if args.epsilon_l2 is not None else info.epsilon_l2
    if args.epsilon >= 1:
        raise UserError(f"--epsilon {args.epsilon} is not an L-inf budget in [0, 1] pixel units (try 8/255)")
    args.pgd_step_size = args.pgd_step_size or args.epsilon / 4
    args.pgd_l2_step_size = args.pgd_l2_step_size or args.epsilon_l2 / 4
    args.tidim_step_size = args.tidim_step_size or args.epsilon / 4
    args.bim_step_size = args.bim_step_size or args.epsilon / 10
    args.mim_step_size = args.mim_step_size or args.epsilon / 10
    args.mt_step_size = args.mt_step_size or args.epsilon / 4
    args.restarts_step_size = args.restarts_step_size or args.epsilon / 10
    args.label_mi_step_size = args.label_mi_step_size or args.epsilon / 4
    args.mt_targets = args.mt_targets or info.num_classes - 1
    if args.mt_targets > info.num_classes - 1:
        raise UserError(f"--mt-targets {args.mt_targets}: {info.name} has only {info.num_classes - 1} wrong classes")
    args.tidim_kernel_size = args.tidim_kernel_size or tidim_default_kernel(info.image_size)
    args.fwa_radius = args.fwa_radius or fwa_default_radius(info.name)
    if args.fwa_kernel_size % 2 == 0 or args.fwa_kernel_size < 3:
        raise UserError(f"--fwa-kernel-size must be odd and at least 3, got {args.fwa_kernel_size}")
    if args.tidim_diversity_prob > 1:
        raise UserError(f"--tidim-diversity-prob must be in [0, 1], got {args.tidim_diversity_prob}")
    if args.ddn_levels == 1:
        raise UserError("--ddn-levels must be 0 (no quantisation) or at least 2")
    if args.attacks is None:
        args.attacks = list(WHITE_BOX_ATTACKS) + (["transfer"] if args.surrogate else [])
    args.attacks = [name for name in ATTACK_NAMES if name in args.attacks]  # table order, duplicates dropped
    if "transfer" in args.attacks and not args.surrogate:
        raise UserError("the transfer attack needs --surrogate CHECKPOINT (the model its adversarials are crafted on)")
    if args.surrogate and "transfer" not in args.attacks:
        raise UserError("--surrogate is used only by the transfer attack: add transfer to --attacks")
    if args.out_dir is None:
        args.out_dir = f"checkpoints/comparison_{info.name}_seed{args.seed}"
    return args


def prepare_out_dir(path) -> Path:
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --out-dir {path}: {error.strerror or error}") from None
    if not path.is_dir():
        raise UserError(f"--out-dir {path} is not a folder")
    return path


# ----------------------------------------------------------------------------------------------
# Results


def label_mi_fields(result) -> dict:
    """The label MI I(Y; Y^) in bits of a result and the predicted class per example it comes from."""
    if result.predicted is None:
        return {}
    return {"label_mi_bits": result.label_mi_bits, "predictions": result.predicted.tolist()}


def attack_record(attack, result) -> dict:
    record = {"column": attack.column, "accuracy": result.accuracy, "robust": int(result.robust.sum()),
              "seconds": round(result.seconds, 3), "nan_batches": result.nan_batches,
              "per_example": "".join("1" if flag else "0" for flag in result.robust.tolist()),
              **label_mi_fields(result)}
    if result.budget is not None:
        record.update(max_perturbation=result.budget.max_value, budget=result.budget.limit,
                      budget_measure=result.budget.measure, batches_outside_budget=result.budget.violating_batches,
                      pixel_range=[result.budget.min_pixel, result.budget.max_pixel])
    if result.unthresholded_robust is not None:
        # What the published code reported: a minimum-norm attack's result counted at any distance.
        record["unthresholded_accuracy"] = result.unthresholded_robust.float().mean().item()
    if result.side_effects:
        record["side_effects"] = result.side_effects
    if result.journalled_batches:  # continued (--resume): seconds counts the journalled batches' seconds too
        record["resumed"] = {"journalled_batches": result.journalled_batches,
                             "seconds_this_run": round(result.seconds_this_run, 3)}
    return record


def model_record(label, path, checkpoint, clean, results, attacks) -> dict:
    config = checkpoint.get("config", {})
    trained = {key: config[key] for key in ("loss", "base_loss", "mi_mode", "norm", "epsilon", "epochs", "seed")
               if key in config}
    if "estimators_informative" in checkpoint:  # stage 3: were its MI estimators judged informative in stage 2?
        trained["estimators_informative"] = checkpoint["estimators_informative"]
    worst = worst_case(clean.robust, {name: r.robust for name, r in results.items()})
    return {
        "label": label, "defense": defense_label(checkpoint, path), "checkpoint": str(path),
        "stage": checkpoint.get("stage"), "epoch": checkpoint.get("epoch"), "arch": checkpoint["model_spec"]["arch"],
        "channels_last": checkpoint.get("channels_last", False), "trained_with": trained,
        "clean": {"accuracy": clean.accuracy, "correct": int(clean.robust.sum()), "seconds": round(clean.seconds, 3),
                  "per_example": "".join("1" if flag else "0" for flag in clean.robust.tolist()),
                  **label_mi_fields(clean)},
        "attacks": {name: attack_record(attacks[name], result) for name, result in results.items()},
        "worst_case": {threat: {"accuracy": robust.float().mean().item(), "robust": int(robust.sum()), "attacks": names}
                       for threat, (robust, names) in worst.items()},
    }


def results_csv(records, columns) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    """Per row: the accuracies (fractions), then the label MI in bits (label_mi_bits:<column>, the worst cases empty)."""
    label_mi_columns = [key for key, _ in columns if not key.startswith("worst_")]
    writer.writerow(["label", "defense", "checkpoint", "test_images"] + [key for key, _ in columns]
                    + [f"label_mi_bits:{key}" for key in label_mi_columns])
    for record in records:
        values, bits = row_accuracies(record), row_label_mi(record)
        count = len(record["clean"]["per_example"])
        writer.writerow([record["label"], record["defense"], record["checkpoint"], count]
                        + [f"{values[key]:.6f}" if key in values else "" for key, _ in columns]
                        + [f"{bits[key]:.6f}" if key in bits else "" for key in label_mi_columns])
    return buffer.getvalue()


def label_mi_markdown(summary: dict, records, columns) -> list:
    """The label-MI table: the accuracy table's rows and columns, I(Y; Y^) in bits per cell."""
    labels = summary.get("test_labels")
    entropy = f"H(Y) = {hard_label_mi(labels, labels):.3f} bits" if labels else "H(Y)"
    table = markdown_table([record["label"] for record in records], columns,
                           [row_label_mi(record) for record in records], formatter=format_bits)
    return ["", "## Label MI I(Y; Y^) (bits)", "", table,
            f"I(Y; Y^) between the true labels and the predicted classes, clean and under each attack, plug-in from "
            f"the confusion matrix over the evaluated images (results.json keeps each example's prediction). "
            f"{entropy} for predictions that determine the label, 0 for predictions independent of it; unlike "
            f"accuracy, a relabelling of the predicted classes keeps it. The worst-case columns keep no single "
            f"prediction per example: -."]


def describe_settings(settings: dict) -> str:
    return ", ".join(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in settings.items())


def results_markdown(summary: dict, records, columns, attacks) -> str:
    labels = [record["label"] for record in records]
    table = markdown_table(labels, columns, [row_accuracies(record) for record in records])
    subset = (f"a class-balanced subset of {summary['test_images']} test images (seed {summary['seed']})"
              if summary["test_limit"] else f"the whole test set ({summary['test_images']} images)")
    lines = [f"# Robust accuracy (%) on {summary['dataset']}", "", table,
             f"Evaluated on {subset}. Threat models: L-inf epsilon {summary['epsilon_linf']:.6g}, "
             f"L2 epsilon {summary['epsilon_l2']:.6g}, Wasserstein radius {summary['fwa_radius']:.6g} "
             f"(relative to the image's mass, local transport). Columns follow the paper's Table 1."]
    for threat, group in WORST_CASE_GROUPS.items():
        ran = [name for name in group if name in attacks]
        if ran:
            lines.append(f"{'Worst L-inf' if threat == 'linf' else 'Worst L2'}: per example, correct when clean and "
                         f"robust to every one of {', '.join(ran)}.")
    uninformed = [record["label"] for record in records if record["trained_with"].get("estimators_informative") is False]
    if uninformed:
        lines.append(f"**Trained on MI estimators that stage 2 did not judge informative** (--allow-uninformative-"
                     f"estimators): {', '.join(uninformed)}. Their MI terms compared noise; these rows say nothing "
                     f"about the method.")
    if "cw" in attacks or "ddn" in attacks:
        lines.append("CW and DDN are minimum-norm attacks: an adversarial counts only within the L2 epsilon.")
    ran_on_p = [attacks[name].column for name in PROBABILITY_ATTACKS if name in attacks]
    if ran_on_p:
        lines.append(f"{', '.join(ran_on_p)}: the ADP authors' protocol (cleverhans 2.1.0), the attack's "
                     f"cross-entropy on softmax(logits) taken as logits (on an ADP ensemble, on its averaged "
                     f"probabilities); accuracy is the model's own. Shown beside the honest attack to measure whether "
                     f"and by how much the protocol overstates robustness.")
    if "transfer" in attacks:
        lines.append(f"transfer: PGD adversarials crafted on {summary['surrogate']['checkpoint']} "
                     f"({summary['surrogate']['label']}), black-box for every row.")
    if "pgd-label-mi" in attacks:
        lines.append(f"{attacks['pgd-label-mi'].column}: PGD minimising the label MI I(Y; Y^) of each batch's soft "
                     f"confusion matrix (our formulation of the problem posed in Yi et al. 2020), jointly over the "
                     f"batch (batches of {attacks['pgd-label-mi'].settings['batch_size']}): it targets the label MI, "
                     f"not the accuracy, so read it in the label-MI table.")
    lines += label_mi_markdown(summary, records, columns)
    lines += ["", "## Attacks", ""]
    for name, attack in attacks.items():
        seconds = sum(record["attacks"][name]["seconds"] for record in records if name in record["attacks"])
        lines.append(f"- `{name}` ({attack.column}): {describe_settings(attack.settings)}; {seconds:.1f} s in all")
    lines += ["", "## Warnings", ""]
    lines += [f"- {line}" for line in summary["warnings"]] or ["none"]
    return "\n".join(lines) + "\n"


def write_outputs(out_dir: Path, summary: dict, records, columns, attacks, final: bool):
    atomic_write_json(out_dir / "results.json", {**summary, "complete": final, "models": records})
    if final:
        atomic_write_text(out_dir / "results.csv", results_csv(records, columns))
        atomic_write_text(out_dir / "results.md", results_markdown(summary, records, columns, attacks))


def write_tensorboard(out_dir: Path, records, columns, markdown: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    for record in records:
        values = row_accuracies(record)
        with SummaryWriter(str(out_dir / "tensorboard" / record["label"].replace("/", "_"))) as writer:
            for key, header in columns:
                if key in values:
                    writer.add_scalar(f"accuracy/{header}", values[key], 0)
            for key, header in columns:
                if key in row_label_mi(record):
                    writer.add_scalar(f"label_mi_bits/{header}", row_label_mi(record)[key], 0)
            writer.add_text("results", markdown, 0)


# ----------------------------------------------------------------------------------------------


def run_summary(args, argv, info, splits, attacks, columns, surrogate_label, device) -> dict:
    """Everything results.json records besides the per-model numbers."""
    return {
        "dataset": info.name, "test_images": len(splits.test), "test_limit": args.test_limit,
        "test_indices": list(splits.test.indices), "seed": args.seed, "device": str(device), "amp": args.amp,
        "processes": distributed.world_size(), "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "epsilon_linf": args.epsilon, "epsilon_l2": args.epsilon_l2, "fwa_radius": args.fwa_radius,
        "attacks": {name: {"column": a.column, "threat": a.threat, "white_box": a.white_box, "budget": a.bound,
                           "seed": attack_seed(args.seed, name), "settings": a.settings} for name, a in attacks.items()},
        "columns": [{"key": key, "header": header} for key, header in columns],
        "surrogate": {"checkpoint": args.surrogate, "label": surrogate_label} if args.surrogate else None,
        "command": shlex.join([Path(__file__).name, *argv]), "args": vars(args),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(), "git_commit": git_commit(), "warnings": [],
    }


def report(line: str):
    """A line of progress on the terminal, from rank 0 only."""
    if distributed.is_main():
        tqdm.write(line)


def evaluate_white_box(label, model, attacks, loader, device, args, after_each_attack, journals=None):
    """Clean predictions and every white-box attack on one model; after_each_attack(clean, results). journals:
    {attack name: AttackJournal} of this model (utils/eval_journal.py), or None."""
    clean = clean_predictions(model, loader, device, args.amp, desc=f"{label}: clean")
    report(f"{label}: clean {clean.accuracy:.2%}, label MI {clean.label_mi_bits:.3f} bits")
    results = {}
    for name, attack in attacks.items():
        if not attack.white_box:
            continue
        journal = journals.get(name) if journals else None
        if journal is not None and journal.done:
            report(f"{label}: {attack.column}: {len(journal.done)} batches from the journal (--resume)")
        results[name] = run_attack(model, attack, loader, device, args.amp, attack_seed(args.seed, name),
                                   desc=f"{label}: {attack.column}", journal=journal)
        report(f"{label}: {attack.column} {results[name].accuracy:.2%}, label MI {results[name].label_mi_bits:.3f} "
               f"bits ({results[name].seconds:.1f} s)")
        after_each_attack(clean, results)
    return clean, results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    script = Path(__file__).name
    args = parse_evaluation_args(build_parser(), argv, script)
    started = time.perf_counter()
    if args.surrogate:
        args.surrogate = checkpoint_in(args.surrogate, "best.pt", script)
    # Every input is checked before the processes join their group, so that bad input stops them all alike.
    device = distributed.process_device(args.device)

    loaded = load_models(args.checkpoints, device, args.channels_last)
    surrogate = load_models([args.surrogate], device, args.channels_last)[0] if args.surrogate else None
    named = list(zip(args.checkpoints, [checkpoint for _, checkpoint in loaded]))
    if surrogate is not None:
        named.append((args.surrogate, surrogate[1]))
    info = dataset_info(check_one_dataset(named))
    args = resolve_settings(args, info)
    labels = unique_labels(args.labels or [defense_label(c, p) for p, (_, c) in zip(args.checkpoints, loaded)],
                           args.checkpoints)
    attacks = {attack.name: attack for attack in build_attacks(args.attacks, args, info.num_classes)}
    surrogate_label = defense_label(surrogate[1], args.surrogate) if surrogate else None
    columns = table_columns(args.attacks, attacks, f"transfer (from {surrogate_label})" if surrogate else None)
    out_dir = prepare_out_dir(args.out_dir)

    device = distributed.setup(args.device)
    try:
        splits = distributed.main_process_first(lambda: load_splits(
            info.name, args.data_dir, val_size=0, train_limit=1, test_limit=args.test_limit, seed=args.seed,
            augment=False))
        if len(splits.test) == 0:
            raise UserError("the test split is empty")
        loader = sharded_loader(splits.test, args.batch_size, workers=args.workers, device=device,
                                rank=distributed.rank(), world_size=distributed.world_size())
        summary = run_summary(args, argv, info, splits, attacks, columns, surrogate_label, device)
        run = Evaluation(out_dir, summary, columns, attacks, labels)
        run.journals = open_journals(out_dir, journal_fingerprints(args, info, splits, attacks, labels, loaded, device),
                                     args.resume, run.warnings.warn)
        summary["journalled_batches"] = {}  # "<model index>/<attack>": batches taken from the journal (--resume)
        run.evaluate(loaded, surrogate, loader, device, args)
        summary["wall_seconds"] = round(time.perf_counter() - started, 2)  # this run's, journalled batches aside
        run.finish(args.tensorboard)
        remove_journal(out_dir)  # the evaluation is complete: nothing left to resume
    finally:
        distributed.cleanup()
    return 0


def journal_fingerprints(args, info, splits, attacks, labels, loaded, device) -> dict:
    """{(model index, attack name): the journal fingerprint} of every white-box attack on every model (the
    transfer attack keeps no journal)."""
    result, versions = {}, package_versions()
    for index, (path, label, (_, checkpoint)) in enumerate(zip(args.checkpoints, labels, loaded)):
        identity = checkpoint_identity(path)
        for name, attack in attacks.items():
            if attack.white_box:
                result[(index, name)] = fingerprint(
                    checkpoint_sha256=identity, label=label, model_index=index, attack=attack,
                    attack_seed=attack_seed(args.seed, name), dataset=info.name, test_indices=splits.test.indices,
                    batch_size=args.batch_size, amp=args.amp, channels_last=checkpoint.get("channels_last", False),
                    device=device, versions=versions)
    return result


class Evaluation:
    """The rows of the table as they are evaluated; only rank 0 writes them, warns and prints. Every
    process holds the same rows (the results are gathered after each attack)."""

    def __init__(self, out_dir: Path, summary: dict, columns, attacks: dict, labels):
        self.out_dir, self.summary, self.columns, self.attacks, self.labels = out_dir, summary, columns, attacks, labels
        self.records, self.cleans, self.results_by_model = [], [], []
        self.journals = {}  # {(model index, attack name): AttackJournal}
        self.warnings = RunWarnings()
        if distributed.is_main():
            self.warnings.keep_in(out_dir, fresh=True)  # this evaluation's warnings replace an earlier one's

    def write(self, records, final: bool):
        if distributed.is_main():
            write_outputs(self.out_dir, self.summary, records, self.columns, self.attacks, final)

    def evaluate(self, loaded, surrogate, loader, device, args):
        paths = args.checkpoints
        for index, (label, path, (model, checkpoint)) in enumerate(zip(self.labels, paths, loaded)):
            def save_progress(clean, results):  # an interrupted run keeps every finished attack
                self.keep_test_labels(clean)
                self.write(self.records + [model_record(label, path, checkpoint, clean, results, self.attacks)],
                           final=False)
            journals = {name: journal for (model_index, name), journal in self.journals.items() if model_index == index}
            clean, results = evaluate_white_box(label, model, self.attacks, loader, device, args, save_progress,
                                                journals)
            self.keep_test_labels(clean)
            self.summary.setdefault("journalled_batches", {}).update(
                {f"{index}/{name}": result.journalled_batches for name, result in results.items()
                 if result.journalled_batches})
            self.records.append(model_record(label, path, checkpoint, clean, results, self.attacks))
            self.cleans.append(clean)
            self.results_by_model.append(results)

        if surrogate is not None:
            transferred = run_transfer(surrogate[0], [model for model, _ in loaded], self.attacks["transfer"], loader,
                                       device, args.amp, attack_seed(args.seed, "transfer"))
            for index, result in enumerate(transferred):
                self.results_by_model[index]["transfer"] = result
                self.records[index] = model_record(self.labels[index], paths[index], loaded[index][1],
                                                   self.cleans[index], self.results_by_model[index], self.attacks)
                report(f"{self.labels[index]}: {self.columns[-1][1]} {result.accuracy:.2%}, label MI "
                       f"{result.label_mi_bits:.3f} bits")

    def keep_test_labels(self, clean):
        """results.json's test_labels: the true class of each evaluated example, in the order of the per-example
        results and predictions (gathered with them, so also under torchrun)."""
        if clean.labels is not None and "test_labels" not in self.summary:
            self.summary["test_labels"] = clean.labels.tolist()

    def finish(self, tensorboard: bool):
        """The warnings, the final results.json, .csv and .md (and TensorBoard run), and the table on the terminal."""
        if not distributed.is_main():
            return
        for label, clean, results in zip(self.labels, self.cleans, self.results_by_model):
            for line in sanity_warnings(label, clean, results, self.attacks):
                self.warnings.warn(line)
                self.summary["warnings"].append(line)
        self.write(self.records, final=True)
        if tensorboard:
            write_tensorboard(self.out_dir, self.records, self.columns, (self.out_dir / "results.md").read_text())
        print(markdown_table(self.labels, self.columns, [row_accuracies(record) for record in self.records]), end="")
        print("label MI I(Y; Y^) (bits):")
        print(markdown_table(self.labels, self.columns, [row_label_mi(record) for record in self.records],
                             formatter=format_bits), end="")
        print(f"results in {self.out_dir}/results.json, results.csv, results.md")


def _main_interruptible(argv=None):
    try:
        return main(argv)
    except KeyboardInterrupt:
        print(f"{Path(sys.argv[0]).name}: interrupted; results.json in --out-dir holds the attacks finished so far, "
              f"and its progress/ folder every batch finished: run the same command with --resume to continue",
              file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_main(_main_interruptible)
