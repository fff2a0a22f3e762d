#!/usr/bin/env python3
"""Detection evaluation of RCE (Pang et al., NeurIPS 2018) and cross-entropy models (docs/method.md section 14).

For each checkpoint (a softmax or rce head) the detectors -- confidence, non-ME and K-density -- are fitted once on
the checkpoint's own training split (kernels) and validation split (thresholds at --fpr), kept next to it as
<checkpoint>.detectors.pt and reused while their settings match. Then two protocols, side by side:

  the authors': ROC AUC of each score, clean images (positives) against their adversarials (negatives), over the
      pairs where the clean image is classified correctly and the attack succeeded, under FGSM, BIM, ILCM, JSMA,
      C&W and C&W-hc (the talk's AUC table);
  the reviewers': accuracy with rejection at the clean false-positive rate --fpr, per detector and for all three
      together: an example counts when its clean image is classified correctly and accepted and its adversarial
      is classified correctly or rejected; under the same attacks, under a detector-aware PGD attack, and in the
      per-example worst case of the attacks within epsilon (FGSM, BIM, ILCM, detector-aware PGD, AutoAttack).

Writes results.json, results.csv, results.md and roc_<model>_<attack>.png into --out-dir. An interrupted run is
continued with the same command plus --resume: every finished batch of every attack is kept in <out-dir>/progress
(utils/eval_journal.py) and taken from there, so the results equal an uninterrupted run's.

Example (Fashion-MNIST: a CE and an RCE SmallCNN, 1000 test images):
    python test_detection.py --checkpoints checkpoints/standard_fashion-mnist_small-cnn_natural_linf_seed0 \\
        checkpoints/standard_fashion-mnist_small-cnn_rce_natural_linf_seed0 --labels CE RCE --test-limit 1000
"""
import csv
import hashlib
import io
import json
import re
import shlex
import sys
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from defenses.detectors import (COMBINED, DEFAULT_SIGMA2, DETECTOR_LABELS, DETECTORS, detectors_path,
                                load_or_fit_detectors, roc_points, settings_for)
from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.cli import (ArgumentParser, add_checkpoints_to_evaluate, nonnegative_int, nonnegative_number,
                       parse_evaluation_args, positive_int, positive_number)
from utils.data import dataset_info, load_splits
from utils.detection import (ATTACK_LABELS, AUTHORS_ATTACKS, DETECTION_ATTACKS, DETECTION_BATCHES, WORST_CASE,
                             attack_metrics, attack_outcome, build_detection_attacks, clean_metrics, clean_outcome,
                             per_example_record, study_columns, weak_minimum_norm_attack, worst_case_metrics)
from utils.eval_journal import open_journals, remove_journal
from utils.errors import UserError, run_main
from utils.evaluation import attack_seed, sharded_loader
from utils.run_warnings import RunWarnings
from utils.runtime import git_commit, package_versions, resolve_device
from utils.training import load_model


def build_parser():
    parser = ArgumentParser(description="Detection (confidence, non-ME, K-density) of CE and RCE models: the RCE "
                                        "authors' AUC table and accuracy with rejection at a fixed clean FPR, under "
                                        "their attacks and a detector-aware attack; results.json / .csv / .md and "
                                        "ROC curves in --out-dir.")
    group = add_checkpoints_to_evaluate(
        parser, "best.pt / last.pt of softmax or rce models (or run folders: their best.pt), one dataset",
        "one label per checkpoint (default: CE or RCE and the run folder's name)")
    group.add_argument("--attacks", nargs="+", choices=DETECTION_ATTACKS, default=list(DETECTION_ATTACKS),
                       metavar="ATTACK", help=f"any of: {', '.join(DETECTION_ATTACKS)}")
    group.add_argument("--out-dir", default=None, help="default checkpoints/detection_<dataset>_seed<seed>")

    group = parser.add_argument_group("data")
    group.add_argument("--data-dir", default="data", help="where datasets live (also for refitting the detectors)")
    group.add_argument("--test-limit", type=positive_int, default=1000,
                       help="class-balanced test subset chosen with --seed (the authors: 1000 random test images)")
    group.add_argument("--batch-size", type=positive_int, default=250)

    group = parser.add_argument_group("detectors (fitted per checkpoint, kept as <checkpoint>.detectors.pt)")
    group.add_argument("--fpr", type=positive_number, default=0.05,
                       help="clean false-positive rate of each threshold, on the checkpoint's validation split")
    group.add_argument("--kd-kernels", type=positive_int, default=1000,
                       help="K-density kernels: training features per class, at random (the authors' 1000)")
    group.add_argument("--kd-sigma2", type=positive_number, default=None,
                       help=f"kernel width sigma^2 of exp(-||z - z_i||^2 / sigma^2) for every model (default: the "
                            f"authors', {DEFAULT_SIGMA2['rce']:.4g} = 0.1/0.26 for rce models and "
                            f"{DEFAULT_SIGMA2['softmax']:.4g} = 1/0.26 for CE models)")
    group.add_argument("--refit", action="store_true", help="fit the detectors again even if a matching fit is saved")

    group = parser.add_argument_group("fgsm, bim, ilcm (the authors': on the model's predicted label, no random start; "
                                      "their epsilon sweep 0.02-0.20)")
    group.add_argument("--epsilon", type=positive_number, default=None,
                       help="L-inf budget of fgsm, bim, ilcm and aware (default: the dataset's, 0.1 fashion-mnist, "
                            "0.3 mnist, 8/255 colour)")
    group.add_argument("--bim-steps", type=positive_int, default=10, help="bim and ilcm: steps of epsilon/steps (authors: 10)")

    group = parser.add_argument_group("jsma (advertorch, towards a random wrong class)")
    group.add_argument("--jsma-theta", type=number_in_unit, default=1.0, help="perturbation per pixel (authors: 1)")
    group.add_argument("--jsma-gamma", type=number_in_unit, default=0.1, help="largest fraction of pixels changed (authors: 0.1)")

    group = parser.add_argument_group("cw and cw-hc (advertorch's C&W-L2, towards a random wrong class; the authors: "
                                      "9 binary steps, initial constant 1; cw 10 iterations, cw-hc 10000). CPU-sized "
                                      "defaults: on a natural CE SmallCNN (Fashion-MNIST, 100 images) lr 0.01 with 50 "
                                      "iterations fooled 37 %, lr 0.1 with 100 (cw) or 200 (cw-hc) iterations 100 %")
    group.add_argument("--cw-steps", type=positive_int, default=100, help="cw: iterations per binary step")
    group.add_argument("--cw-hc-steps", type=positive_int, default=200, help="cw-hc: iterations per binary step")
    group.add_argument("--cw-hc-confidence", type=nonnegative_number, default=10.0, help="cw-hc's confidence (authors: 10)")
    group.add_argument("--cw-search-steps", type=positive_int, default=5, help="binary search steps of the constant")
    group.add_argument("--cw-lr", type=positive_number, default=0.1, help="Adam's step in tanh space")
    group.add_argument("--cw-initial-const", type=positive_number, default=1.0)

    group = parser.add_argument_group("aware (multi-targeted L-inf PGD on min(margin_t, kappa) + c x the three "
                                      "detectors' shortfalls below their thresholds; Carlini & Wagner 2017 extended)")
    group.add_argument("--aware-steps", type=positive_int, default=50, help="steps per target")
    group.add_argument("--aware-step-size", type=positive_number, default=None, help="default epsilon / 4")
    group.add_argument("--aware-targets", type=positive_int, default=None,
                       help="wrong classes attacked, highest clean logit first (default: all of them; on an RCE "
                            "SmallCNN the 3 highest left 8 points more accuracy with rejection than all 9)")
    group.add_argument("--aware-kappa", type=nonnegative_number, default=2.0, help="margin cap kappa (logit units)")
    group.add_argument("--aware-c", type=positive_number, default=1.0, help="weight c of the detector terms")

    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=nonnegative_int, default=0, help="seeds the test subset and every attack")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run with the same command: take the batches that <out-dir>/progress "
                            "(a per-batch journal, written by every run) holds, when it was made with the same "
                            "checkpoint, detector settings, attack settings and seed, test images, batch size, device "
                            "type and package versions (else they are computed anew, with a warning). The journal is "
                            "deleted once the evaluation completes; without --resume an earlier one is deleted at the "
                            "start")
    return parser


def number_in_unit(text: str) -> float:
    value = positive_number(text)
    if value > 1:
        import argparse
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def default_label(checkpoint: dict, path) -> str:
    head = checkpoint["model_spec"].get("head", "softmax")
    loss = checkpoint.get("config", {}).get("loss", "")
    kind = "RCE" if head == "rce" else "CE"
    return f"{'AT-' if loss == 'at' else ''}{kind} ({Path(path).parent.name})"


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


# ----------------------------------------------------------------------------------------------
# Tables


def fmt(value, scale=100.0, digits=1) -> str:
    return "-" if value is None or value != value else f"{scale * value:.{digits}f}"


def auc_table(records, attacks) -> list:
    header = "| Attack | " + " | ".join(f"{r['label']}: {DETECTOR_LABELS[d]}" for r in records for d in DETECTORS) + \
             " | " + " | ".join(f"{r['label']}: pairs" for r in records) + " |"
    lines = [header, "|---|" + "---:|" * (len(records) * (len(DETECTORS) + 1))]
    for name in attacks:
        if name not in AUTHORS_ATTACKS:
            continue
        cells = [fmt(r["attacks"][name]["auc"][d]) for r in records for d in DETECTORS]
        cells += [str(r["attacks"][name]["pairs"]) for r in records]
        lines.append(f"| {ATTACK_LABELS[name]} | " + " | ".join(cells) + " |")
    return lines


def rejection_table(records, attacks) -> list:
    columns = DETECTORS + (COMBINED,)
    header = "| Attack | " + " | ".join(f"{r['label']}: {c}" for r in records
                                        for c in ["no rejection"] + [DETECTOR_LABELS[d] for d in columns]) + " |"
    lines = [header, "|---|" + "---:|" * (len(records) * (len(columns) + 1))]
    for row, metrics in rejection_rows(records, attacks):
        cells = [fmt(value) for m in metrics for value in accuracies(m)]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def rejection_rows(records, attacks):
    """(row label, each record's metrics) of the accuracy-with-rejection table: clean, each attack and, when every
    record has it, the worst case of the attacks within epsilon."""
    yield "clean", [r["clean"] for r in records]
    for name in attacks:
        yield ATTACK_LABELS[name], [r["attacks"][name] for r in records]
    if all("worst_case" in r for r in records):
        yield worst_case_label(records[0]["worst_case"]["attacks"]), [r["worst_case"] for r in records]


def accuracies(metrics) -> list:
    """Accuracy without rejection, then with rejection per detector and by all three (a clean, attack or worst-case
    record)."""
    return [metrics["accuracy"] if "accuracy" in metrics else metrics["robust_accuracy"]] + [
        metrics["accuracy_with_rejection"][d] for d in DETECTORS + (COMBINED,)]


def worst_case_label(attacks) -> str:
    return f"worst case ({', '.join(ATTACK_LABELS[name] for name in attacks)})"


def results_markdown(summary, records, attacks) -> str:
    lines = [f"# Detection on {summary['dataset']} ({summary['test_images']} test images, seed {summary['seed']})", "",
             "## The authors' protocol: ROC AUC (%)", "",
             *auc_table(records, summary["attacks"]), "",
             "Positives: clean test images classified correctly; negatives: their adversarials that the model "
             "misclassifies (pairs: how many). Rank-sum AUC of each score (high = normal). The pair set changes with "
             "the attack's strength (a stronger attack adds harder pairs), so the columns of different attacks are not "
             "on the same images.", "",
             f"## The reviewers' protocol: accuracy (%) with rejection at a clean FPR of {summary['fpr']:.3g}", "",
             *rejection_table(records, summary["attacks"]), "",
             "An example counts when its clean image is classified correctly and accepted, and its adversarial is "
             "classified correctly or rejected. \"no rejection\": clean correct and adversarial correct. \"all three\": "
             "rejected when any score is below its threshold. JSMA, C&W and C&W-hc are minimum-norm attacks without a "
             "budget, so there the columns measure detection alone; FGSM, BIM, ILCM, the detector-aware attack and "
             f"AutoAttack are within L-inf epsilon {summary['epsilon']:.4g}, and their worst case counts an example "
             "only if it survives every one of them (an attacker takes, per image, whichever works).", "",
             "## Thresholds and clean false-positive rates", "",
             "| Model | head | sigma^2 | detectors | " + " | ".join(
                 f"tau {DETECTOR_LABELS[d]}" for d in DETECTORS) + " | " + " | ".join(
                 f"FPR val / test: {DETECTOR_LABELS[d]}" for d in DETECTORS + (COMBINED,)) + " |",
             "|---|---|---:|---|" + "---:|" * (2 * len(DETECTORS) + 1)]
    for r in records:
        d = r["detectors"]
        lines.append(f"| {r['label']} | {r['head']} | {d['settings']['sigma2']:.4g} | {d['status']} | "
                     + " | ".join(f"{d['thresholds'][n]:.4g}" for n in DETECTORS) + " | "
                     + " | ".join(f"{fmt(d['val_fpr'][n])} / {fmt(r['clean']['fpr'][n])}"
                                  for n in DETECTORS + (COMBINED,)) + " |")
    combined = "; ".join(f"{r['label']}: " + ", ".join(f"{DETECTOR_LABELS[n]} {r['detectors']['combined_thresholds'][n]:.4g}"
                                                         for n in DETECTORS) for r in records)
    lines += ["", "K-density's score is log KD (natural log); confidence is max softmax(h), non-ME in nats. "
              "Thresholds are the FPR-quantile of the clean validation scores of the checkpoint's own split; \"all "
              "three\" rejects when any score is below its own lower threshold, set so that the three together reject "
              f"the same rate of clean validation images: {combined}.", "",
              "## Attacks", ""]
    for name in summary["attacks"]:
        seconds = ", ".join(f"{r['label']} {r['attacks'][name]['seconds']:.1f} s" for r in records)
        settings = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                             for k, v in summary["attack_settings"][name].items())
        extra = "; ".join(f"{r['label']}: success {fmt(r['attacks'][name]['success_rate'])} %, median L2 "
                          f"{r['attacks'][name]['median_l2']:.3g}, median L0 {r['attacks'][name]['median_l0']:.0f}"
                          + (f", target reached {fmt(r['attacks'][name]['target_reached'])} %"
                             if 'target_reached' in r['attacks'][name] else "") for r in records)
        lines.append(f"- `{name}` ({ATTACK_LABELS[name]}): {settings}. Wall time: {seconds}. {extra}.")
    lines += ["", "ROC curves: " + ", ".join(f"`{p}`" for r in records for p in r["roc_files"]), "",
              f"Command: `{summary['command']}`", "", f"Git commit: {summary['git_commit']}; "
              f"device {summary['device']}; wall time {summary.get('wall_seconds', 0):.1f} s.", "", "## Warnings", ""]
    lines += [f"- {w}" for w in summary["warnings"]] or ["none"]
    return "\n".join(lines) + "\n"


def results_csv(records) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    columns = DETECTORS + (COMBINED,)
    writer.writerow(["label", "checkpoint", "head", "attack", "pairs"] + [f"auc:{d}" for d in DETECTORS]
                    + ["accuracy:no_rejection"] + [f"accuracy_with_rejection:{d}" for d in columns] + ["seconds"])
    for r in records:
        rows = [("clean", r["clean"]), *r["attacks"].items()] + ([(WORST_CASE, r["worst_case"])]
                                                                 if "worst_case" in r else [])
        for name, m in rows:
            auc = [f"{m['auc'][d]:.6f}" for d in DETECTORS] if "auc" in m else [""] * len(DETECTORS)
            writer.writerow([r["label"], r["checkpoint"], r["head"], name, m.get("pairs", "")] + auc
                            + [f"{value:.6f}" for value in accuracies(m)]
                            + [f"{m['seconds']:.3f}" if "seconds" in m else ""])
    return buffer.getvalue()


def plot_roc(path, title, clean, adv, pairs):
    from utils.plots import _pyplot
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(4.8, 4.5))
    for name in DETECTORS:
        fpr, tpr = roc_points(clean.scores[name][pairs], adv.scores[name][pairs])
        axis.plot(fpr, tpr, label=DETECTOR_LABELS[name])
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    axis.set_xlabel("adversarials accepted (false-positive rate)")
    axis.set_ylabel("clean images accepted (true-positive rate)")
    axis.set_title(f"{title}\n{int(pairs.sum())} pairs", fontsize=9)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def journal_fingerprints(labels, settings, attacks, args, test_indices, device) -> dict:
    """{(model index, attack name): everything that attack's batches on that model depend on, as JSON text}."""
    indices = hashlib.sha256(json.dumps([int(i) for i in test_indices]).encode()).hexdigest()
    return {(index, attack.name): json.dumps({
        "evaluation": "test_detection.py", "version": 1, "label": label, "model_index": index,
        "detectors": asdict(setting), "attack": attack.name, "settings": attack.settings,
        "attack_seed": attack_seed(args.seed, attack.name), "test_images": len(indices), "test_indices_sha256": indices,
        "batch_size": args.batch_size, "device": torch.device(device).type, "versions": package_versions()},
        sort_keys=True, default=str)
        for index, (label, setting) in enumerate(zip(labels, settings)) for attack in attacks}


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    script = Path(__file__).name
    args = parse_evaluation_args(build_parser(), argv, script)
    if args.fpr >= 1:
        raise UserError(f"--fpr {args.fpr} is not a rate in (0, 1)")
    started = time.perf_counter()
    device = resolve_device(args.device)
    loaded = [load_model(path, device) for path in args.checkpoints]
    datasets = {checkpoint["model_spec"]["dataset"] for _, checkpoint in loaded}
    if len(datasets) > 1:
        raise UserError(f"checkpoints of different datasets cannot share one table ({', '.join(sorted(datasets))})")
    info = dataset_info(datasets.pop())
    settings = [settings_for(checkpoint, path, args.kd_kernels, args.kd_sigma2, args.fpr, args.seed)
                for path, (_, checkpoint) in zip(args.checkpoints, loaded)]
    args.epsilon = args.epsilon if args.epsilon is not None else info.epsilon_linf
    if args.epsilon >= 1:
        raise UserError(f"--epsilon {args.epsilon} is not an L-inf budget in [0, 1] pixel units")
    args.aware_step_size = args.aware_step_size or args.epsilon / 4
    args.attacks = [name for name in DETECTION_ATTACKS if name in args.attacks]
    labels = args.labels or [default_label(c, p) for p, (_, c) in zip(args.checkpoints, loaded)]
    if len(set(labels)) < len(labels):
        labels = [f"{label} [{index}]" for index, label in enumerate(labels)]
    out_dir = Path(args.out_dir or f"checkpoints/detection_{info.name}_seed{args.seed}")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create --out-dir {out_dir}: {error.strerror or error}") from None
    attacks = build_detection_attacks(args.attacks, args, info.num_classes)
    warnings = RunWarnings()
    warnings.keep_in(out_dir, fresh=True)

    splits = load_splits(info.name, args.data_dir, val_size=0, train_limit=1, test_limit=args.test_limit,
                         seed=args.seed, augment=False)
    loader = sharded_loader(splits.test, args.batch_size)
    batches = lambda: tqdm(list(zip(loader.batch_indices, loader)), leave=False, dynamic_ncols=True)  # noqa: E731
    test_labels = torch.cat([y for _, y in loader])
    # "columns": the columns reproduce.py's study table takes from this file (utils/evaluators.py)
    summary = {"dataset": info.name, "test_images": len(splits.test), "seed": args.seed, "fpr": args.fpr,
               "columns": study_columns(args.attacks),
               "epsilon": args.epsilon, "attacks": args.attacks, "device": str(device),
               "attack_settings": {a.name: a.settings for a in attacks},
               "command": shlex.join([script, *argv]), "args": vars(args), "git_commit": git_commit(),
               "versions": package_versions(), "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "test_indices": list(splits.test.indices), "warnings": []}
    journals = open_journals(out_dir, journal_fingerprints(labels, settings, attacks, args, splits.test.indices, device),
                             args.resume, warnings.warn, DETECTION_BATCHES)
    records = []
    for index, (label, path, (model, checkpoint), setting) in enumerate(zip(labels, args.checkpoints, loaded, settings)):
        model.eval()
        progress = lambda loader, what: tqdm(loader, desc=f"{label}: {what}", leave=False, dynamic_ncols=True)  # noqa
        detectors, status = load_or_fit_detectors(model, checkpoint, path, setting, args.data_dir, device,
                                                  args.batch_size, args.refit, progress, warnings.warn)
        tqdm.write(f"{label}: detectors {status} ({detectors_path(path)}); thresholds "
                   + ", ".join(f"{n} {v:.4g}" for n, v in detectors.thresholds.items()))
        detectors = detectors.to(device)
        clean = clean_outcome(model, detectors, batches(), device)
        clean_correct = clean.predicted == test_labels
        record = {"label": label, "checkpoint": str(path), "head": checkpoint["model_spec"].get("head", "softmax"),
                  "trained_with": {k: checkpoint.get("config", {}).get(k) for k in ("loss", "epochs", "epsilon")},
                  "detectors": {"file": str(detectors_path(path)), "status": status,
                                "settings": asdict(detectors.settings),
                                "thresholds": detectors.thresholds, "combined_thresholds": detectors.combined,
                                "val_fpr": detectors.val_fpr,
                                "kernels_per_class": detectors.density.counts()},
                  "clean": {**clean_metrics(test_labels, clean), "per_example": per_example_record(clean)},
                  "attacks": {}, "roc_files": []}
        bounded = {}  # the outcomes of the attacks within epsilon, for their worst case
        tqdm.write(f"{label}: clean {record['clean']['accuracy']:.2%}, test FPR "
                   + ", ".join(f"{n} {v:.3f}" for n, v in record["clean"]["fpr"].items()))
        for attack in attacks:
            journal = journals[(index, attack.name)]
            if journal.done:
                tqdm.write(f"{label}: {ATTACK_LABELS[attack.name]}: {len(journal.done)} batches from the journal (--resume)")
            adv = attack_outcome(model, detectors, attack, batches(), device, attack_seed(args.seed, attack.name), journal)
            record["attacks"][attack.name] = metrics = attack_metrics(test_labels, clean, adv)
            if attack.bounded:
                bounded[attack.name] = adv
            pairs = clean_correct & (adv.predicted != test_labels)
            png = f"roc_{slug(label)}_{attack.name}.png"
            plot_roc(out_dir / png, f"{label}: {ATTACK_LABELS[attack.name]}", clean, adv, pairs)
            record["roc_files"].append(png)
            tqdm.write(f"{label}: {ATTACK_LABELS[attack.name]} pairs {metrics['pairs']}, AUC "
                       + ", ".join(f"{DETECTOR_LABELS[n]} {fmt(v)}" for n, v in metrics["auc"].items())
                       + f"; accuracy {fmt(metrics['robust_accuracy'])} %, with rejection (all three) "
                         f"{fmt(metrics['accuracy_with_rejection'][COMBINED])} % ({metrics['seconds']:.1f} s)")
            if metrics["pairs"] == 0:
                warnings.warn(f"{label}: {ATTACK_LABELS[attack.name]} succeeded on no correctly classified image; "
                              f"its AUC is undefined")
            weak = weak_minimum_norm_attack(attack.name, metrics["success_rate"])
            if weak:
                warnings.warn(f"{label}: {weak}")
            atomic_write_json(out_dir / "results.json", {**summary, "complete": False, "models": records + [record],
                                                         "test_labels": test_labels.tolist()})
        if len(bounded) > 1:
            record["worst_case"] = worst = worst_case_metrics(test_labels, clean, bounded)
            tqdm.write(f"{label}: worst case of {', '.join(ATTACK_LABELS[n] for n in bounded)}: accuracy "
                       f"{fmt(worst['robust_accuracy'])} %, with rejection (all three) "
                       f"{fmt(worst['accuracy_with_rejection'][COMBINED])} %")
        records.append(record)
    summary["warnings"] = list(warnings.messages)
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    atomic_write_json(out_dir / "results.json", {**summary, "complete": True, "models": records,
                                                 "test_labels": test_labels.tolist()})
    remove_journal(out_dir)  # complete: nothing left to resume
    atomic_write_text(out_dir / "results.csv", results_csv(records))
    markdown = results_markdown(summary, records, attacks)
    atomic_write_text(out_dir / "results.md", markdown)
    print(markdown.split("## Thresholds")[0], end="")
    print(f"results in {out_dir}/results.json, results.csv, results.md and roc_*.png")
    return 0


if __name__ == "__main__":
    run_main(main)
