"""The evaluation scripts reproduce.py can run as stage 4, and how the study table reads their results.

A preset chooses one with its "eval_script" key (default test_comparison.py); its eval section then holds that
script's flags (checked against its parser, as --set eval.FLAG=VALUE is) and every defense's evaluation runs it.
Each evaluation script writes results.json with "columns" ([{key, header}]), "test_images" and "models" (one
record: the evaluated checkpoint); its Evaluator says how that record becomes the study's rows:

    rows(results) -> [(predictor key or None, predictor label or None, {column key: accuracy in [0, 1]})]

None names the defense's own row (the table's "Standard AT"); another key adds a row under the defense,
labelled "<defense label> + <predictor label>" (e.g. "Mixup + mixup inference (OL)"). A value that is itself
a mean over repeated randomized evaluations (test_mixup_inference.py --repeats) enters the study as that
per-seed mean; the study's cell is then the mean +- std across seeds of those means.

test_detection.py's values are not all accuracies: its ROC AUC columns hold the AUC in [0, 1], which the study's
cells show x 100 as accuracies are (the RCE paper's x10^-2, said in their headers).

Adding an evaluation script: an EVALUATORS entry with its rows() reader and the note results.md prints under the
table; its results.json needs "columns", "test_images" and "models" as above."""
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

DEFAULT_EVAL_SCRIPT = "test_comparison.py"


def script_module(script: str):
    """The evaluation script's module (its parser and its defaults)."""
    return importlib.import_module(Path(script).stem)


def comparison_rows(results: dict) -> list:
    """test_comparison.py: one row, the defense's own (clean, every attack, the worst case per threat model)."""
    from utils.evaluation import row_accuracies
    return [(None, None, row_accuracies(results["models"][0]))]


MODE_LABELS = {"pl": "PL", "ol": "OL", "combined": "combined"}


def mixup_inference_rows(results: dict) -> list:
    """test_mixup_inference.py: the base model's row (the defense's own) and one per mixup inference mode, each
    column the mean over that evaluation's --repeats."""
    rows = []
    for row in results["models"][0]["rows"]:
        values = {key: summary["mean"] for key, summary in row["metrics"].items()}
        mode = row.get("mode")
        if mode is None:
            rows.append((None, None, values))
        else:
            rows.append((f"mi-{mode}", f"mixup inference ({MODE_LABELS.get(mode, mode)})", values))
    return rows


def detection_rows(results: dict) -> list:
    """test_detection.py: one row, the defense's own: clean accuracy, the authors' ROC AUC per (attack, score) and
    accuracy with rejection per (attack, detector), clean too (utils/detection.py study_values); its results.json's
    "columns" pick the table's subset."""
    from utils.detection import study_values
    return [(None, None, study_values(results["models"][0]))]


@dataclass(frozen=True)
class Evaluator:
    script: str                          # the stage-4 script
    rows: Callable[[dict], list]         # results.json -> the study's rows (see the module's docstring)
    note: str                            # what results.md says about the cells, after the spread across seeds
    curve: bool = False                  # whether the robust-accuracy-against-epsilon curve can run on its flags
    journal: bool = False                # whether it keeps a per-batch journal that --resume continues

    @property
    def module(self):
        return script_module(self.script)


EVALUATORS = {
    "test_comparison.py": Evaluator(
        "test_comparison.py", comparison_rows, curve=True, journal=True,
        note="the worst-case columns count an example only if it is correct when clean and survives every attack "
             "of its threat model (test_comparison.py)"),
    "test_mixup_inference.py": Evaluator(
        "test_mixup_inference.py", mixup_inference_rows, journal=True,
        note="a defense's own row is its checkpoint's logits, the rows \"+ mixup inference (...)\" the randomized "
             "predictor around it; a mixup inference cell's per-seed value is the mean over that evaluation's "
             "repeated partner draws, whose within-seed standard deviation is in each evaluation's results "
             "(seed<s>/eval-<defense>/results.md, .json); the worst-case column counts an example only if it is "
             "correct when clean and under every attack of the table in the same repeat (test_mixup_inference.py)"),
    "test_detection.py": Evaluator(
        "test_detection.py", detection_rows, journal=True,
        note="the AUC columns are the RCE paper's protocol (Pang et al., NeurIPS 2018): the ROC AUC x 100 (its "
             "x10^-2) of a score (conf.: confidence, non-ME, K-dens.: K-density), clean test images classified "
             "correctly against their adversarials that are misclassified, a seed without such a pair left out of "
             "the cell; the \"rej.\" columns are accuracy (%) with rejection at the clean false-positive rate "
             "eval.fpr (default 5 %, thresholds on each model's validation split) by K-density or by all three "
             "detectors together: an example counts when its clean image is classified correctly and accepted and "
             "its adversarial is classified correctly or rejected (\"Clean, rej.\": the clean image alone; \"Worst case "
             "within epsilon\": only if that holds under every attack within the L-inf budget). Every "
             "number (the other detectors' accuracy with rejection, accuracy without rejection, pairs, thresholds, "
             "ROC curves) is in each seed's evaluation (seed<s>/eval-<defense>/results.md, .json, .csv; "
             "test_detection.py)"),
}


def evaluator(script: str = None) -> Evaluator:
    from utils.errors import UserError
    script = script or DEFAULT_EVAL_SCRIPT
    if script not in EVALUATORS:
        raise UserError(f"eval_script {script!r}: choose one of {', '.join(EVALUATORS)}")
    return EVALUATORS[script]
