#!/usr/bin/env python3
"""Evaluate mixup inference (Pang, Xu and Zhu, ICLR 2020; docs/method.md section 15), a randomized predictor,
around checkpoints of the repository: the authors' oblivious attack and the adaptive attacks that broke it.

For each checkpoint (best.pt / last.pt of any stage, or a run folder) two kinds of rows: "base model" (the
checkpoint's own logits) and "mixup inference (<mode>)" for each --modes entry (defenses/mixup_inference.py).
Columns, L-inf at --epsilon (default: the dataset's budget, as test_comparison.py):
    clean      accuracy on the test images
    oblivious  PGD crafted on the base model f, classified by the wrapper: what the authors mostly reported
    eot-pgd    PGD through the whole wrapper, its gradient averaged over --eot-samples fresh partner draws per
               step (torchattacks' EOTPGD, which works with a stochastic module: it calls the model afresh for
               every sample); the adaptive attack of Tramer et al. 2020 (section 14) in spirit
    aa-rand    AutoAttack version 'rand' (its reference code, pyautoattack): APGD-CE and APGD-DLR with EOT
    worst      per repeat, an example counts only if it is correct clean and under every attack run in that repeat
               (the same partner draws for the final predictions); then mean +- std over repeats. A randomized
               predictor's robustness is this minimum over the attacks: EOT-PGD can be weaker than the oblivious
               attack for PL, whose partners are picked by the predicted class, which is not differentiated
The wrapper's accuracies are mean +- std (sample standard deviation) over --repeats evaluations, each with its
own partner seed; the attacks that depend on the wrapper are re-run per repeat, the oblivious adversarials
(crafted on f) are crafted once and classified anew. Partners come from the checkpoint's validation split
(rebuilt from its saved --val-size / --train-limit / --seed), never from the test set. Writes results.json,
results.csv and results.md into --out-dir. An interrupted run is continued with the same command plus --resume:
every finished pass (one repeat of one metric on one row) is kept in <out-dir>/progress (utils/eval_journal.py)
and taken from there, so the results equal an uninterrupted run's.

Example (Fashion-MNIST, a mixup-trained SmallCNN, 100 test images, CPU-sized attacks):
    python test_mixup_inference.py --checkpoints checkpoints/standard_fashion-mnist_small-cnn_mixup_linf_seed0 \\
        --modes pl ol combined --test-limit 100
"""
import argparse
import csv
import hashlib
import io
import json
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from defenses.mixup_inference import (DEFAULT_PARTNERS, MODES, POOL_SOURCES, MixupInference, MixupInferenceConfig,
                                      pool_from_splits)
from test_comparison import check_one_dataset, defense_label, load_models, prepare_out_dir, unique_labels
from utils.attacks import PGDConfig, frozen_eval, perturbation_norms, pgd_attack
from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.cli import (ArgumentParser, add_checkpoints_to_evaluate, mixing_lambda, nonnegative_int, nonnegative_number,
                       parse_evaluation_args, positive_int, positive_number)
from utils.data import dataset_info, load_splits
from utils.errors import UserError, run_main
from utils.eval_journal import JournalCodec, checkpoint_identity, open_journals, remove_journal
from utils.evaluation import (attack_seed, autoattack_class, autoattack_log, autoattack_module, batch_seed,
                              isolated_rng, seed_batch)
from utils.losses import MIXUP_LOSSES
from utils.run_warnings import RunWarnings
from utils.runtime import git_commit, package_versions, resolve_device
from utils.training import freeze

ATTACKS = ("oblivious", "eot-pgd", "aa-rand")
BASE_ROW = "base model"


def build_parser():
    parser = ArgumentParser(description="Mixup inference (pl / ol / combined) around checkpoints: clean accuracy and "
                                        "robust accuracy under the oblivious PGD, EOT-PGD through the wrapper and "
                                        "AutoAttack 'rand', mean +- std over repeated evaluations.")
    group = add_checkpoints_to_evaluate(
        parser, "best.pt / last.pt files of any stage (mixup, IAT, Standard AT, NAMID...), or run folders "
             "(their best.pt), all of one dataset",
        "one label per checkpoint (default: the defense it was trained with)")
    group.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS), metavar="ATTACK",
                       help=f"any of {', '.join(ATTACKS)} (default: all)")
    group.add_argument("--out-dir", default=None,
                       help="where the results go (default checkpoints/mixup_inference_<dataset>_seed<seed>)")

    group = parser.add_argument_group("mixup inference (the authors': lambda 0.5 for mixup-trained models; for "
                                      "IAT-trained models MI-OL with lambda 0.6)")
    group.add_argument("--modes", nargs="+", choices=MODES, default=["ol"],
                       help="pl: partners of the predicted class; ol: of other classes; combined: PL or OL by the "
                            "confidence gap (a row each)")
    group.add_argument("--partners", type=positive_int, default=None,
                       help=f"pl / ol: partners N per prediction (default: the authors' {DEFAULT_PARTNERS['pl']} for "
                            f"pl, {DEFAULT_PARTNERS['ol']} for ol)")
    group.add_argument("--mixup-lambda", type=mixing_lambda, default=0.5,
                       help="pl / ol: weight of the input, in (0, 1] (1: the base model); the authors use 0.6 for OL "
                            "on IAT-trained models")
    group.add_argument("--threshold", type=nonnegative_number, default=0.2,
                       help="combined: PL where max softmax f(x) - max F_PL(x) is below this, else OL")
    group.add_argument("--combined-pl-partners", type=positive_int, default=5)
    group.add_argument("--combined-pl-lambda", type=mixing_lambda, default=0.5)
    group.add_argument("--combined-ol-partners", type=positive_int, default=15)
    group.add_argument("--combined-ol-lambda", type=mixing_lambda, default=0.4)

    group = parser.add_argument_group("partner pool (held out from the test set; the authors drew theirs from it)")
    group.add_argument("--pool", choices=POOL_SOURCES, default="val",
                       help="val: the checkpoint's validation images (never trained on); train: its training images")
    group.add_argument("--pool-size", type=positive_int, default=None,
                       help="class-balanced subset of the pool, chosen with --seed (default: all of it)")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default="data", help="where datasets live, in torchvision's layout")
    group.add_argument("--test-limit", type=positive_int, default=200,
                       help="class-balanced test subset, chosen with --seed (CPU-sized default; the authors: the whole "
                            "test set, which any number at least its size selects)")
    group.add_argument("--batch-size", type=positive_int, default=50,
                       help="test images per batch (the wrapper forwards batch x partners images at once)")

    group = parser.add_argument_group("threat model")
    group.add_argument("--epsilon", type=positive_number, default=None,
                       help="L-inf budget, fractions accepted (default 8/255 colour, 0.3 mnist, 0.1 fashion-mnist)")

    group = parser.add_argument_group("oblivious (the authors: PGD-10, step eps/4, random start, crafted on f)")
    group.add_argument("--pgd-steps", type=positive_int, default=10)
    group.add_argument("--pgd-step-size", type=positive_number, default=None, help="default epsilon / 4")

    group = parser.add_argument_group("eot-pgd (Tramer et al. 2020: 50 steps, step eps/16, 15 fresh partners per "
                                      "forward; CPU-sized defaults)")
    group.add_argument("--eot-steps", type=positive_int, default=20)
    group.add_argument("--eot-step-size", type=positive_number, default=None, help="default epsilon / 4")
    group.add_argument("--eot-samples", type=positive_int, default=5,
                       help="fresh partner draws whose gradients are averaged per step")

    group = parser.add_argument_group("aa-rand (AutoAttack 'rand': APGD-CE + APGD-DLR, reference 100 iterations x EOT "
                                      "20; with 30 partners that is 60 000 forwards per image and attack, hence "
                                      "CPU-sized defaults)")
    group.add_argument("--aa-iterations", type=positive_int, default=20, help="APGD iterations (reference: 100)")
    group.add_argument("--aa-eot-iter", type=positive_int, default=5, help="EOT samples per APGD step (reference: 20)")

    group = parser.add_argument_group("runtime")
    group.add_argument("--repeats", type=positive_int, default=5,
                       help="evaluations of each randomized row, each with its own partner seed (mean +- std)")
    group.add_argument("--seed", type=nonnegative_int, default=0,
                       help="seeds the --test-limit subset, the attacks and the partner draws")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="the models in channels_last memory format (float rounding only). Default: as "
                            "test_comparison.py, on with CUDA and on the CPU for small-cnn, off otherwise")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run with the same command: take every finished pass (one repeat "
                            "of one metric on one row) that <out-dir>/progress holds, when it was made with the same "
                            "checkpoint and settings, test images, device type and package versions (else it is "
                            "evaluated anew, with a warning). The journal is deleted once the evaluation completes; "
                            "without --resume an earlier one is deleted at the start")
    return parser


def resolve_settings(args, info):
    args.epsilon = args.epsilon if args.epsilon is not None else info.epsilon_linf
    if args.epsilon >= 1:
        raise UserError(f"--epsilon {args.epsilon} is not an L-inf budget in [0, 1] pixel units (try 8/255)")
    args.pgd_step_size = args.pgd_step_size or args.epsilon / 4
    args.eot_step_size = args.eot_step_size or args.epsilon / 4
    args.attacks = [name for name in ATTACKS if name in args.attacks]
    args.modes = list(dict.fromkeys(args.modes))
    if args.out_dir is None:
        args.out_dir = f"checkpoints/mixup_inference_{info.name}_seed{args.seed}"
    return args


def config_for(mode: str, args) -> MixupInferenceConfig:
    return MixupInferenceConfig(mode=mode, partners=args.partners, lam=args.mixup_lambda, threshold=args.threshold,
                                combined_pl_partners=args.combined_pl_partners,
                                combined_pl_lambda=args.combined_pl_lambda,
                                combined_ol_partners=args.combined_ol_partners,
                                combined_ol_lambda=args.combined_ol_lambda)


def partner_pool(checkpoint: dict, path, args, info, device):
    """The checkpoint's held-out images (its validation split, rebuilt from the data flags it was trained with)."""
    config = checkpoint.get("config") or {}
    missing = [flag for flag in ("val_size", "seed") if flag not in config]
    if missing:
        raise UserError(f"{path} records no {' / '.join('--' + m.replace('_', '-') for m in missing)} in its config: "
                        f"its held-out validation images cannot be rebuilt for the partner pool")
    if args.pool == "val" and config["val_size"] == 0:
        raise UserError(f"{path} was trained with --val-size 0: it has no held-out validation images for the partner "
                        f"pool; use --pool train (its training images)")
    splits = load_splits(info.name, args.data_dir, val_size=config["val_size"], train_limit=config.get("train_limit"),
                         test_limit=1, seed=config["seed"], augment=False)
    try:
        return pool_from_splits(splits, args.pool, args.pool_size, seed=args.seed, device=device)
    except ValueError as error:
        raise UserError(f"{path}: {error}") from None


# ----------------------------------------------------------------------------------------------
# Attacks: craft(predictor, x, y, generator) -> adversarials; the predictor is the base model or the wrapper


def oblivious_craft(base, config: PGDConfig):
    def craft(predictor, x, y, generator):
        return pgd_attack(base, x, y, config, generator)  # on f, whatever classifies the result
    return craft


def eot_pgd_craft(epsilon: float, step_size: float, steps: int, samples: int):
    import torchattacks

    def craft(predictor, x, y, generator):
        # torchattacks' EOTPGD: per step the cross-entropy gradient of `samples` fresh forwards, summed (sign step),
        # from a uniform random start drawn from the global RNG (seeded per batch by evaluate_rows).
        attack = torchattacks.EOTPGD(predictor, eps=epsilon, alpha=step_size, steps=steps, eot_iter=samples)
        return attack(x, y).detach()
    return craft


def set_apgd_iterations(apgd, iterations: int):
    """APGD's iterations and the checkpoints its step-size schedule derives from them (as its constructor)."""
    apgd.n_iter = iterations
    apgd.n_iter_2 = max(int(0.22 * iterations), 1)
    apgd.n_iter_min = max(int(0.06 * iterations), 1)
    apgd.size_decr = max(int(0.03 * iterations), 1)


def aa_rand_craft(epsilon: float, iterations: int, eot_iter: int, seed: int, notes: list):
    """AutoAttack 'rand' (APGD-CE, APGD-DLR with EOT) from its reference code, at the given iterations and EOT."""
    def craft(predictor, x, y, generator):
        cls, _ = autoattack_class()
        with autoattack_log() as report:
            adversary = cls(predictor, norm="Linf", eps=epsilon, version="rand", seed=seed, device=x.device)
            set_apgd_iterations(adversary.apgd, iterations)
            adversary.apgd.eot_iter = eot_iter
            adversary.verbose = False
            result = adversary.run_standard_evaluation(x, y, batch_size=len(x))
        notes.extend(note for note in report.warnings if note not in notes)
        return (result[0] if isinstance(result, tuple) else result).detach()
    return craft


# ----------------------------------------------------------------------------------------------
# Evaluation


def evaluate_once(predictor, craft, batches, device, seed: int, wrapper=None, wrapper_seed: int = 0, cache=None,
                  desc="", budget=None):
    """Per test image, whether `predictor` classifies the adversarial of `craft` (None: the clean image) correctly
    (a bool tensor on the CPU, in the test set's order). Every batch is seeded by
    (seed, batch index) for the attack and, for a wrapper, by (wrapper_seed, batch index) for the partners the
    attack sees and, on a separate stream, for those of the final prediction (the same for every attack of one
    repeat). cache: a list of per-batch adversarials filled on first use and reused after (oblivious attack)."""
    generator = torch.Generator(device=device)
    correct = []
    with isolated_rng(seed, device):
        for index, (x, y) in enumerate(tqdm(batches, desc=desc, leave=False, dynamic_ncols=True)):
            x, y = x.to(device), y.to(device)
            seed_batch(seed, index, generator)
            if craft is None:
                x_adv = x
            elif cache is not None and index < len(cache):
                x_adv = cache[index].to(device)
            else:
                if wrapper is not None:
                    wrapper.reseed(batch_seed(wrapper_seed, index))
                x_adv = craft(predictor, x, y, generator)
                if cache is not None:
                    cache.append(x_adv.cpu())
            if budget is not None:
                budget["max_linf"] = max(budget["max_linf"], float(perturbation_norms(x_adv, x, "linf").max()))
                budget["min_pixel"] = min(budget["min_pixel"], float(x_adv.min()))
                budget["max_pixel"] = max(budget["max_pixel"], float(x_adv.max()))
            if wrapper is not None:
                wrapper.reseed(batch_seed(wrapper_seed + 1, index))
            with torch.no_grad(), frozen_eval(predictor):
                correct.append((predictor(x_adv).argmax(dim=1) == y).cpu())
    return torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)


def accuracy(correct: torch.Tensor) -> float:
    return int(correct.sum()) / max(len(correct), 1)


def worst_case(correct: dict) -> list:
    """Per repeat, the fraction of examples correct under every entry of `correct` ({metric: [per-repeat bool
    tensor]}: clean and each attack): an example counts only if nothing of that repeat fooled it."""
    repeats = {len(values) for values in correct.values()}
    assert len(repeats) == 1, "every metric has one result per repeat"
    return [accuracy(torch.stack([values[r] for values in correct.values()]).all(dim=0)) for r in range(repeats.pop())]


def summarise(values: list) -> dict:
    return {"values": values, "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "repeats": len(values)}


def pass_key(mode, metric: str) -> str:
    """A journal's name for one evaluation pass (every repeat of a metric on a row): e.g. base-clean, ol-eot-pgd."""
    return f"{mode or 'base'}-{metric}"


# A journalled pass of --resume (utils/eval_journal.py): its repeat, per-image correctness, the budget extremes its
# adversarials reached, AutoAttack's notes and its seconds.
MIXUP_PASSES = JournalCodec(
    lambda item, seconds: {"index": item[0], "correct": item[1], "budget": item[2], "notes": list(item[3]),
                           "seconds": float(seconds)},
    lambda entry: (entry["correct"], entry["budget"], list(entry["notes"])))


def evaluate_rows(base, pool, args, batches, device, notes: list, label: str, journals=None) -> list:
    """The base model's row and one row per mode: {metric: summary} with each attack's seconds. journals: {pass
    key: AttackJournal} of this model (--resume), whose passes are taken instead of evaluated again."""
    pgd = PGDConfig("linf", args.epsilon, args.pgd_step_size, args.pgd_steps)
    crafts = {"oblivious": oblivious_craft(base, pgd),
              "eot-pgd": lambda samples: eot_pgd_craft(args.epsilon, args.eot_step_size, args.eot_steps, samples),
              "aa-rand": lambda eot, seed: aa_rand_craft(args.epsilon, args.aa_iterations, eot, seed, notes)}
    budget = {"max_linf": 0.0, "min_pixel": 0.0, "max_pixel": 1.0}
    oblivious_cache = []


    def run(row_label, predictor, wrapper, repeats, mode=None):
        metrics, seconds, correct = {}, {}, {}

        def take_pass(name, flags, pass_budget, pass_notes):
            """One repeat of a metric, evaluated now or taken from the journal."""
            correct.setdefault(name, []).append(flags)
            if pass_budget is not None:
                budget["max_linf"] = max(budget["max_linf"], pass_budget["max_linf"])
                budget["min_pixel"] = min(budget["min_pixel"], pass_budget["min_pixel"])
                budget["max_pixel"] = max(budget["max_pixel"], pass_budget["max_pixel"])
            notes.extend(note for note in pass_notes if note not in notes)

        for name in ["clean"] + args.attacks:
            values, started, journalled_seconds = [], time.perf_counter(), 0.0
            journal = (journals or {}).get(pass_key(mode, name))
            for repeat in range(repeats):
                if journal is not None and repeat in journal.done:
                    (flags, pass_budget, pass_notes), pass_seconds = journal.done[repeat]
                    journalled_seconds += pass_seconds
                    take_pass(name, flags, pass_budget, pass_notes)
                    values.append(accuracy(flags))
                    continue
                pass_started = time.perf_counter()
                seed = attack_seed(args.seed, name if wrapper is None else f"{name}/repeat{repeat}")
                wrapper_seed = attack_seed(args.seed, f"mixup-inference/repeat{repeat}")
                desc = f"{label}: {row_label}: {name} ({repeat + 1}/{repeats})"
                # The base model is deterministic: EOT over one draw is plain PGD, so one sample suffices there.
                craft = {"clean": None, "oblivious": crafts["oblivious"],
                         "eot-pgd": crafts["eot-pgd"](args.eot_samples if wrapper is not None else 1),
                         "aa-rand": crafts["aa-rand"](args.aa_eot_iter if wrapper is not None else 1, seed % 2 ** 31)
                         }[name]
                if name == "oblivious":
                    seed = attack_seed(args.seed, "oblivious")  # crafted on f once, classified per repeat
                pass_budget = None if craft is None else {"max_linf": 0.0, "min_pixel": 0.0, "max_pixel": 1.0}
                noted = len(notes)
                flags = evaluate_once(predictor, craft, batches, device, seed, wrapper, wrapper_seed,
                                      cache=oblivious_cache if name == "oblivious" else None, desc=desc,
                                      budget=pass_budget)
                pass_notes = notes[noted:]
                if journal is not None:
                    journal.record((repeat, flags, pass_budget, pass_notes), time.perf_counter() - pass_started)
                take_pass(name, flags, pass_budget, pass_notes)
                values.append(accuracy(flags))
            metrics[name] = summarise(values)
            seconds[name] = round(time.perf_counter() - started + journalled_seconds, 2)
        metrics["worst"] = summarise(worst_case(correct))
        for name in metrics:
            shown = f"{metrics[name]['mean']:.2%}" + (f" +- {metrics[name]['std']:.2%}" if repeats > 1 else "")
            tqdm.write(f"{label}: {row_label}: {name} {shown}" + (f" ({seconds[name]:.1f} s)" if name in seconds else ""))
        return {"label": row_label, "metrics": metrics, "seconds": seconds}

    rows = [dict(run(BASE_ROW, base, None, 1), mode=None, settings=None)]
    for mode in args.modes:
        config = config_for(mode, args)
        wrapper = MixupInference(base, pool, config).eval()
        rows.append(dict(run(f"mixup inference ({mode})", wrapper, wrapper, args.repeats, mode), mode=mode,
                         settings=config.describe()))
    for row in rows:
        row["budget"] = dict(budget)
    return rows


# ----------------------------------------------------------------------------------------------
# Results


def column_headers(args) -> list:
    return [("clean", "Clean"), ("oblivious", f"Oblivious PGD-{args.pgd_steps}"),
            ("eot-pgd", f"EOT-PGD-{args.eot_steps} (x{args.eot_samples})"),
            ("aa-rand", f"AutoAttack rand ({args.aa_iterations} it. x EOT {args.aa_eot_iter})"),
            ("worst", "Worst case")]


def format_cell(summary: dict) -> str:
    if summary is None:
        return "-"
    if summary["repeats"] == 1:
        return f"{100 * summary['mean']:.1f}"
    return f"{100 * summary['mean']:.1f} ± {100 * summary['std']:.1f}"


def results_csv(records, columns) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = [key for key, _ in columns]
    writer.writerow(["model", "row", "mode", "repeats"] + [f"{key}_{part}" for key in keys for part in ("mean", "std")])
    for record in records:
        for row in record["rows"]:
            metrics = row["metrics"]
            repeats = max(summary["repeats"] for summary in metrics.values())
            cells = []
            for key in keys:
                cells += ([f"{metrics[key]['mean']:.6g}", f"{metrics[key]['std']:.6g}"] if key in metrics else ["", ""])
            writer.writerow([record["label"], row["label"], row["mode"] or "", repeats] + cells)
    return buffer.getvalue()


def results_markdown(summary: dict, records, columns) -> str:
    header = "| Model | Predictor | " + " | ".join(title for _, title in columns) + " |"
    lines = [f"# Mixup inference: accuracy (%) on {summary['dataset']}", "", header,
             "|" + "---|" * (len(columns) + 2)]
    for record in records:
        for row in record["rows"]:
            cells = [format_cell(row["metrics"].get(key)) for key, _ in columns]
            lines.append(f"| {record['label']} | {row['label']} | " + " | ".join(cells) + " |")
    settings = summary["settings"]
    lines += ["", f"{summary['test_images']} class-balanced test images (seed {summary['seed']}), L-inf epsilon "
                  f"{summary['epsilon']:.6g}. Mixup inference rows: mean ± sample standard deviation over "
                  f"{summary['repeats']} evaluations, each with its own partner seed; base model rows: one evaluation.",
              "", "- Oblivious: PGD crafted on the base model f (the authors' protocol), classified by each row's "
                  "predictor; for the base model it is white-box PGD.",
              f"- EOT-PGD: torchattacks' EOTPGD through the whole predictor, {settings['eot-pgd']['steps']} steps of "
              f"{settings['eot-pgd']['step_size']:.6g}, gradient of {settings['eot-pgd']['samples']} fresh partner draws "
              f"per step (1 on the deterministic base model).",
              f"- AutoAttack rand: {settings['aa-rand']['implementation']}, APGD-CE and APGD-DLR, "
              f"{settings['aa-rand']['iterations']} iterations x EOT {settings['aa-rand']['eot_iter']} (reference: 100 x "
              f"20; EOT 1 on the base model).",
              "- Worst case: per repeat, an example counts only if it is correct clean and under every attack of the "
              "table in that repeat (the robustness of a randomized predictor is the minimum over the attacks); "
              "mean ± std over the repeats.", "", "## Partner pools", ""]
    for record in records:
        pool = record["pool"]
        lines.append(f"- {record['label']}: {pool['size']} images of the checkpoint's {pool['source']} split "
                     f"(training file; its --val-size {pool['val_size']}, --seed {pool['seed']}), never the test set")
    lines += ["", "## Mixup inference settings", ""]
    for mode in summary["modes"]:
        lines.append(f"- {mode}: {settings['modes'][mode]}")
    lines += ["", "## Warnings", ""]
    lines += [f"- {line}" for line in summary["warnings"]] or ["none"]
    lines += ["", f"Command: `{summary['command']}`; git commit {summary['git_commit']}; "
                  f"{summary.get('wall_seconds', 0):.1f} s in all."]
    return "\n".join(lines) + "\n"


def sanity_warnings(label: str, checkpoint: dict, rows: list, epsilon: float) -> list:
    found = []
    loss = (checkpoint.get("config") or {}).get("loss")
    if checkpoint.get("stage") != "standard" or loss not in MIXUP_LOSSES:
        found.append(f"{label}: not trained with --loss mixup or iat; mixup inference presupposes the global linearity "
                     f"that mixup training induces")
    base = rows[0]["metrics"]
    for row in rows[1:]:
        metrics = row["metrics"]
        if metrics["clean"]["mean"] < base["clean"]["mean"] - 0.1:
            found.append(f"{label}: {row['label']} loses {100 * (base['clean']['mean'] - metrics['clean']['mean']):.1f} "
                         f"points of clean accuracy: lambda may not fit this model (the authors: 0.6 for IAT models)")
        if "eot-pgd" in metrics and "oblivious" in metrics:
            eot, oblivious = metrics["eot-pgd"], metrics["oblivious"]
            if eot["mean"] > oblivious["mean"] + max(eot["std"], oblivious["std"], 0.01):
                found.append(f"{label}: {row['label']}: EOT-PGD left more correct ({100 * eot['mean']:.1f} %) than the "
                             f"oblivious attack ({100 * oblivious['mean']:.1f} %): raise --eot-steps / --eot-samples")
    budget = rows[0]["budget"]
    if budget["max_linf"] > epsilon * (1 + 1e-5) + 1e-6 or budget["min_pixel"] < -1e-6 or budget["max_pixel"] > 1 + 1e-6:
        found.append(f"{label}: an attack left the L-inf ball or [0, 1] (max perturbation {budget['max_linf']:.6g})")
    return found


# Flags a journalled pass does not depend on: a pass is one repeat of one metric on one row, seeded by its repeat
JOURNAL_FREE_FLAGS = {"resume", "out_dir", "device", "checkpoints", "labels", "repeats", "modes", "attacks"}


def journal_fingerprints(labels, paths, loaded, args, test_indices, device) -> dict:
    """{(model index, pass key): what that pass depends on, as JSON text}."""
    settings = {key: value for key, value in sorted(vars(args).items()) if key not in JOURNAL_FREE_FLAGS}
    indices = hashlib.sha256(json.dumps([int(i) for i in test_indices]).encode()).hexdigest()
    fingerprints = {}
    for index, (label, path, (_, checkpoint)) in enumerate(zip(labels, paths, loaded)):
        for mode in [None] + args.modes:
            for metric in ["clean"] + args.attacks:
                fingerprints[(index, pass_key(mode, metric))] = json.dumps({
                    "evaluation": "test_mixup_inference.py", "version": 1, "checkpoint_sha256": checkpoint_identity(path),
                    "label": label, "model_index": index, "pass": pass_key(mode, metric), "settings": settings,
                    "channels_last": bool(checkpoint["channels_last"]), "test_indices_sha256": indices,
                    "device": torch.device(device).type, "versions": package_versions()}, sort_keys=True, default=str)
    return fingerprints


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    script = Path(__file__).name
    args = parse_evaluation_args(build_parser(), argv, script)
    started = time.perf_counter()
    device = resolve_device(args.device)
    loaded = [(freeze(model), checkpoint) for model, checkpoint in load_models(args.checkpoints, device,
                                                                               args.channels_last)]
    info = dataset_info(check_one_dataset(list(zip(args.checkpoints, [c for _, c in loaded]))))
    args = resolve_settings(args, info)
    for mode in args.modes:
        try:
            config_for(mode, args)
        except ValueError as error:
            raise UserError(str(error)) from None
    labels = unique_labels(args.labels or [defense_label(c, p) for p, (_, c) in zip(args.checkpoints, loaded)],
                           args.checkpoints)
    pools = [partner_pool(checkpoint, path, args, info, device) for path, (_, checkpoint) in zip(args.checkpoints, loaded)]
    splits = load_splits(info.name, args.data_dir, val_size=0, train_limit=1, test_limit=args.test_limit,
                         seed=args.seed, augment=False)
    batches = torch.utils.data.DataLoader(splits.test, batch_size=args.batch_size, shuffle=False)
    out_dir = prepare_out_dir(args.out_dir)
    warnings = RunWarnings()
    warnings.keep_in(out_dir, fresh=True)
    aa_implementation = f"{autoattack_module()}.AutoAttack(version='rand')" if "aa-rand" in args.attacks else None
    summary = {
        "dataset": info.name, "test_images": len(splits.test), "test_limit": args.test_limit,
        "test_indices": list(splits.test.indices), "seed": args.seed, "repeats": args.repeats, "epsilon": args.epsilon,
        "device": str(device), "modes": args.modes, "attacks": args.attacks,
        "settings": {
            "oblivious": {"steps": args.pgd_steps, "step_size": args.pgd_step_size, "random_start": "uniform",
                          "crafted_on": "base model", "seed": attack_seed(args.seed, "oblivious")},
            "eot-pgd": {"steps": args.eot_steps, "step_size": args.eot_step_size, "samples": args.eot_samples,
                        "implementation": "torchattacks.EOTPGD", "random_start": "uniform"},
            "aa-rand": {"iterations": args.aa_iterations, "eot_iter": args.aa_eot_iter,
                        "implementation": aa_implementation, "attacks": ["apgd-ce", "apgd-dlr"]},
            "modes": {mode: config_for(mode, args).describe() for mode in args.modes},
            "seeds": {"attacks": "attack_seed(--seed, '<attack>/repeat<r>') per repeat, then per batch",
                      "partners": {r: attack_seed(args.seed, f"mixup-inference/repeat{r}") for r in range(args.repeats)}},
        },
        "command": shlex.join([script, *argv]), "args": vars(args),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": package_versions(), "git_commit": git_commit(), "warnings": [],
    }
    records, notes = [], []
    columns = [(key, title) for key, title in column_headers(args) if key in ("clean", "worst") or key in args.attacks]
    summary["columns"] = [{"key": key, "header": title} for key, title in columns]
    journals = open_journals(out_dir, journal_fingerprints(labels, args.checkpoints, loaded, args, splits.test.indices,
                                                          device), args.resume, warnings.warn, MIXUP_PASSES)
    for index, (label, path, (model, checkpoint), pool) in enumerate(zip(labels, args.checkpoints, loaded, pools)):
        config = checkpoint.get("config") or {}
        rows = evaluate_rows(model, pool, args, batches, device, notes, label,
                             {key: journal for (model_index, key), journal in journals.items() if model_index == index})
        records.append({"label": label, "checkpoint": str(path), "defense": defense_label(checkpoint, path),
                        "stage": checkpoint.get("stage"), "epoch": checkpoint.get("epoch"),
                        "channels_last": checkpoint["channels_last"],
                        "pool": {"source": pool.source, "size": len(pool), "val_size": config.get("val_size"),
                                 "seed": config.get("seed"), "train_limit": config.get("train_limit"),
                                 "indices": pool.indices},
                        "rows": rows})
        for line in sanity_warnings(label, checkpoint, rows, args.epsilon):
            warnings.warn(line)
            summary["warnings"].append(line)
        atomic_write_json(out_dir / "results.json", {**summary, "complete": False, "models": records})
    for note in notes:
        warnings.warn(note)
        summary["warnings"].append(note)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out_dir / "results.json", {**summary, "complete": True, "models": records})
    remove_journal(out_dir)  # complete: nothing left to resume
    atomic_write_text(out_dir / "results.csv", results_csv(records, columns))
    markdown = results_markdown(summary, records, columns)
    atomic_write_text(out_dir / "results.md", markdown)
    print(markdown.split("\n\n")[1])
    print(f"results in {out_dir}/results.json, results.csv, results.md")
    return 0


if __name__ == "__main__":
    run_main(main)
