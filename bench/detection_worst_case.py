#!/usr/bin/env python3
"""The worst case of the attacks within epsilon for test_detection.py evaluations written before it computed it.

test_detection.py now reports, per model, the per-example worst case of FGSM, BIM, ILCM and the detector-aware
attack (utils/detection.py worst_case_metrics). Earlier results.json files kept each attack's predictions and
acceptances per example but not the clean image's, so this script recomputes the clean outcome from the
checkpoint and its detectors (the saved fit, or a refit with the evaluation's own settings), checks that it
reproduces the stored clean accuracy and accuracy with rejection exactly, and writes the worst case:

    python bench/detection_worst_case.py EVAL_DIR [EVAL_DIR ...] --data-dir data --out worst_case.json \\
        [--replace /old/prefix /new/prefix]

--replace rewrites the start of the checkpoint paths the results recorded (e.g. a study folder since copied).

With --combine, the evaluations are of the same models with different attacks (e.g. AutoAttack run after the
others): each model's bounded attacks are gathered from every evaluation of its checkpoint on the same test
images, which must agree on the clean outcome (results.json's per-example clean record) and on any attack they
share, and their worst case is written per checkpoint.
"""
import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from defenses.detectors import COMBINED, load_or_fit_detectors, settings_for  # noqa: E402
from utils.data import load_splits  # noqa: E402
from utils.detection import (BOUNDED_ATTACKS, clean_metrics, clean_outcome, outcome_from_record,  # noqa: E402
                             worst_case_metrics)
from utils.errors import UserError, run_main  # noqa: E402
from utils.evaluation import sharded_loader  # noqa: E402
from utils.runtime import git_commit, resolve_device  # noqa: E402
from utils.training import load_model  # noqa: E402


def clean_summary(clean: dict) -> dict:
    """A results.json clean record's accuracy and accuracy with rejection, in one flat dict."""
    return {"accuracy": clean["accuracy"], **clean["accuracy_with_rejection"]}


def worst_case_entry(labels: torch.Tensor, clean, attacks: dict) -> dict:
    """The worst case of `attacks` ({name: results.json attack record}, the bounded ones) beside each one's own
    accuracy with and without rejection."""
    outcomes = {name: outcome_from_record(attacks[name]["per_example"], "adv_") for name in BOUNDED_ATTACKS
                if name in attacks}
    return {**worst_case_metrics(labels, clean, outcomes),
            "per_attack_with_rejection": {name: attacks[name]["accuracy_with_rejection"] for name in outcomes},
            "per_attack_accuracy": {name: attacks[name]["robust_accuracy"] for name in outcomes}}


def summary_line(m: dict) -> str:
    return (f"worst case of {', '.join(m['attacks'])}: accuracy {100 * m['robust_accuracy']:.1f} %, with rejection "
            f"(all three) {100 * m['accuracy_with_rejection'][COMBINED]:.1f} %, (K-density) "
            f"{100 * m['accuracy_with_rejection']['k-density']:.1f} %")


def model_worst_case(results: dict, record: dict, checkpoint_path: Path, data_dir, device) -> dict:
    args = results["args"]
    model, checkpoint = load_model(checkpoint_path, device)
    model.eval()
    settings = settings_for(checkpoint, checkpoint_path, args["kd_kernels"], args["kd_sigma2"], args["fpr"],
                            args["seed"])
    detectors, status = load_or_fit_detectors(model, checkpoint, checkpoint_path, settings, data_dir, device,
                                              args["batch_size"])
    splits = load_splits(results["dataset"], data_dir, val_size=0, train_limit=1, test_limit=args["test_limit"],
                         seed=args["seed"], augment=False)
    if list(splits.test.indices) != results["test_indices"]:
        raise UserError(f"{checkpoint_path}: the test images differ from the evaluation's")
    loader = sharded_loader(splits.test, args["batch_size"])
    labels = torch.tensor(results["test_labels"])
    clean = clean_outcome(model, detectors.to(device), list(zip(loader.batch_indices, loader)), device)
    metrics = clean_metrics(labels, clean)
    recomputed, stored = clean_summary(metrics), clean_summary(record["clean"])
    if recomputed != stored:
        raise UserError(f"{checkpoint_path}: the recomputed clean outcome ({recomputed}) is not the evaluation's "
                        f"({stored}); detectors {status}")
    return {"label": record["label"], "checkpoint": str(checkpoint_path), "detectors": status,
            "clean": stored, **worst_case_entry(labels, clean, record["attacks"])}


def combined_worst_case(evaluations: dict) -> list:
    """{folder: results.json} of evaluations of the same models -> per checkpoint, the worst case of the bounded
    attacks all of them ran (each evaluation's records carry the clean outcome per example)."""
    groups = {}
    for folder, results in evaluations.items():
        for record in results["models"]:
            if "per_example" not in record["clean"]:
                raise UserError(f"{folder}: no per-example clean record (written before 7ce80bc); run without --combine")
            key = (record["checkpoint"], results["seed"], tuple(results["test_indices"]))
            groups.setdefault(key, []).append((folder, results, record))
    models = []
    for (checkpoint, seed, _), members in groups.items():
        _, first_results, first = members[0]
        bounded, sources = {}, {}
        for folder, results, record in members:
            if results["test_labels"] != first_results["test_labels"] or results["epsilon"] != first_results["epsilon"]:
                raise UserError(f"{folder}: {checkpoint} was evaluated at another epsilon or on other labels")
            if record["clean"]["per_example"] != first["clean"]["per_example"]:
                raise UserError(f"{folder}: the clean outcome of {checkpoint} differs from {members[0][0]}'s "
                                "(other detectors?)")
            for name in BOUNDED_ATTACKS:
                if name not in record["attacks"]:
                    continue
                if name in bounded and record["attacks"][name]["per_example"] != bounded[name]["per_example"]:
                    raise UserError(f"{folder}: its {name} on {checkpoint} differs from {sources[name]}'s")
                bounded[name], sources[name] = record["attacks"][name], folder
        clean = outcome_from_record(first["clean"]["per_example"])
        models.append({"label": first["label"], "checkpoint": checkpoint, "seed": seed, "sources": sources,
                       "clean": clean_summary(first["clean"]),
                       **worst_case_entry(torch.tensor(first_results["test_labels"]), clean, bounded)})
    return models


def read_results(folder) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise UserError(f"{folder}: no results.json (a test_detection.py --out-dir is expected)")
    results = json.loads(path.read_text())
    if not results.get("complete"):
        raise UserError(f"{folder}: the evaluation is not complete")
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("evaluations", nargs="+", help="test_detection.py --out-dir folders (their results.json)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--replace", nargs=2, metavar=("OLD", "NEW"), help="rewrite checkpoint paths starting OLD")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--combine", action="store_true",
                        help="join the bounded attacks of several evaluations of the same checkpoints")
    parser.add_argument("--out", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    out = {"command": " ".join(["bench/detection_worst_case.py", *(argv if argv is not None else sys.argv[1:])]),
           "git_commit": git_commit()}
    if args.combine:
        out["models"] = combined_worst_case({folder: read_results(folder) for folder in args.evaluations})
        for m in out["models"]:
            tqdm.write(f"{m['checkpoint']}: {summary_line(m)}")
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
        return 0
    out["evaluations"] = {}
    for folder in tqdm(args.evaluations, desc="evaluations"):
        results = read_results(folder)
        models = []
        for record in results["models"]:
            path = record["checkpoint"]
            if args.replace and path.startswith(args.replace[0]):
                path = args.replace[1] + path[len(args.replace[0]):]
            models.append(model_worst_case(results, record, Path(path), args.data_dir, device))
        out["evaluations"][folder] = {"seed": results["seed"], "epsilon": results["epsilon"], "models": models}
        for m in models:
            tqdm.write(f"{folder} {m['label']}: {summary_line(m)}")
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    run_main(main)
