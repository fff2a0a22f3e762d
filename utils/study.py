"""What reproduce.py writes at the end of a study: the comparison table in the layout of the paper's
Table 1 with mean and standard deviation over seeds per cell (results.md, .csv, .json; with the preset's
eval_variants, one column per variant and attack), the preset's published reference table for orientation,
and the figures (training curves, stage 2's MI distributions, robust accuracy against epsilon)."""
import csv
import io
import json
import statistics
from pathlib import Path

import numpy

from utils.checkpoint import atomic_write_json, atomic_write_text
from utils.cli import number
from utils.estimator_training import ESTIMATOR_FILE, MI_VALUES_FILE, read_informativeness, verdict_line
from utils.evaluation import row_accuracies
from utils.evaluators import DEFAULT_EVAL_SCRIPT, evaluator
from utils.paired import mcnemar_p, paired_counts, per_example_flags
from utils.pipeline import DEFENSES, ESTIMATOR_RUNS, MARKER, eval_script, variant_column
from utils.plots import plot_mi_distributions, plot_robustness_curves, plot_training_curves
from utils.run_warnings import read_warnings

# docs/method.md section 7: the paper's Table 1 on CIFAR-10 with ResNet-18 (clean, PGD-40, AutoAttack),
# for orientation.
PAPER_TABLE1 = {"Standard AT": (83.39, 42.38, 39.01), "NAMID": (83.41, 44.79, 39.26), "TRADES": (80.70, 46.29, 42.71),
                "NAMID-T": (80.67, 47.53, 43.39), "MART": (78.21, 50.23, 43.96), "NAMID-M": (78.38, 51.69, 44.42)}
_OTHER_SETTING = ("The authors' numbers, on other architectures, datasets and scales than this study's: for orientation "
                  "only, not comparable cell for cell.")
# The RCE paper's AUC table (Pang, Du, Dong, Zhu, NeurIPS 2018; the seed talk), ROC AUC x10^-2 per attack: on MNIST
# and on CIFAR-10 (ResNet-32), each CE (confidence, non-ME, K-density) then RCE (the same).
RCE_AUC_COLUMNS = ["CE conf.", "CE non-ME", "CE K-dens.", "RCE conf.", "RCE non-ME", "RCE K-dens."]
RCE_AUC = {  # attack: (MNIST, CIFAR-10)
    "FGSM": (["79.7", "66.8", "98.8", "98.8", "98.6", "99.4"], ["71.5", "66.9", "99.7", "92.6", "91.4", "98.0"]),
    "BIM": (["88.9", "70.5", "90.0", "91.7", "90.6", "91.8"], ["0.0", "64.6", "100.0", "0.7", "70.2", "100.0"]),
    "ILCM": (["98.4", "50.4", "96.2", "100.0", "97.0", "98.6"], ["16.4", "37.1", "84.2", "64.1", "77.8", "93.9"]),
    "JSMA": (["98.6", "60.1", "97.7", "100.0", "99.4", "99.0"], ["99.2", "27.3", "85.8", "99.5", "91.9", "95.4"]),
    "C&W": (["98.6", "64.1", "99.4", "100.0", "99.5", "99.8"], ["99.5", "50.2", "95.3", "99.6", "94.7", "98.2"]),
    "C&W-hc": (["0.0", "40.0", "91.1", "0.1", "93.4", "99.6"], ["0.0", "28.8", "75.4", "0.2", "53.6", "91.8"]),
}
_RCE_NOTE = (_OTHER_SETTING + " ROC AUC x10^-2 of each score, clean test images classified correctly against their "
             "successful adversarials, as this study's AUC columns; the authors' attacks ran longer than this study's "
             "CPU-sized ones (e.g. C&W-hc 10 000 iterations).")
# The published tables results.md shows for orientation, one per preset (its "reference" key): a title, the
# first column's name, the value columns, rows of (name, values as published; None: not reported) and a note.
REFERENCE_TABLES = {
    "namid-table1": {
        "title": "The paper's Table 1 (CIFAR-10, ResNet-18), for orientation",
        "first": "Defense", "columns": ["None", "PGD-40", "AA"],
        "rows": [(label, [f"{value:.2f}" for value in values]) for label, values in PAPER_TABLE1.items()],
        "note": None},
    # the seed talk's MMC table (ICLR 2020, Table 1: ResNet-32, untargeted PGD at 8/255)
    "mmc-iclr2020": {
        "title": "The MMC paper's CIFAR-10 table (ICLR 2020, ResNet-32; the seed talk), for orientation",
        "first": "Defense", "columns": ["Clean", "PGD-10 un. 8/255", "PGD-50 un. 8/255", "AA 8/255"],
        "rows": [("SCE", ["92.9", "3.7", "3.6", None]),
                 ("MMC-10", ["92.7", "36.0", "24.8", None]),
                 ("AT^un_10 (SCE)", ["80.9", "55.4", "53.9", None]),
                 ("AT^un_10 (MMC-10)", ["81.8", "56.3", "55.0", None]),
                 ("MM-LDA", ["92.4", "16.5", "9.7", None]),
                 ("MMC-10, independent PyTorch port (ResNet-32)", ["90.18", None, None, "0.00"])],
        "note": _OTHER_SETTING + " The first five rows are the authors' (their PGD: cross-entropy on the MMC logits, "
                "which is saturated); the last is an independent re-implementation under AutoAttack, which breaks "
                "MMC without adversarial training."},
    # the seed talk's ADP table (ICML 2019, Table 2, MNIST: ensembles of three ResNet-20)
    "adp-icml2019-mnist": {
        "title": "The ADP paper's MNIST Table 2 (ICML 2019, ensembles of three ResNet-20; the seed talk), for orientation",
        "first": "Attack", "columns": ["Baseline", "ADP_{2,0}", "ADP_{2,0.5}"],
        "rows": [("FGSM, eps 0.1", ["78.3", "95.5", "96.3"]),
                 ("FGSM, eps 0.2", ["21.5", "50.6", "52.8"]),
                 ("BIM, eps 0.1", ["52.3", "86.4", "88.5"]),
                 ("BIM, eps 0.15", ["12.2", "69.5", "73.6"]),
                 ("PGD, eps 0.1", ["50.7", "73.4", "82.8"]),
                 ("PGD, eps 0.15", ["6.3", "36.2", "41.0"]),
                 ("MIM, eps 0.1", ["58.3", "89.7", "92.0"]),
                 ("MIM, eps 0.15", ["16.1", "73.3", "77.5"])],
        "note": _OTHER_SETTING + " They were measured with cross-entropy on the ensemble's averaged probabilities "
                "treated as logits (the authors' attacks), the protocol of this study's -p columns; the columns "
                "without -p attack the log of those probabilities. Their FGSM's second budget is eps 0.2 (not "
                "evaluated here); BIM, PGD and MIM are 10 steps of eps/10."},
    # the talk's mixup inference paper: its numbers are not at hand offline, so no table, only where to look
    "mixup-inference-iclr2020": {
        "title": "The mixup inference paper (Pang, Xu and Zhu, ICLR 2020)",
        "first": "Defense", "columns": [], "rows": [],
        "note": "Its tables (CIFAR-10 and CIFAR-100) are not reproduced here: their numbers were not available "
                "offline, and none are copied from memory. See the paper, and "
                "Tramer et al. 2020 (NeurIPS) for the adaptive attacks that broke it."},
    # the RCE paper's AUC table: its MNIST column for rce-mnist-cpu; both datasets for rce-fashion-mnist-cpu
    # (Fashion-MNIST is in neither; MNIST's rows are the nearer setting)
    "rce-nips2018-mnist": {
        "title": "The RCE paper's MNIST AUC table (NeurIPS 2018; the seed talk), for orientation",
        "first": "Attack", "columns": RCE_AUC_COLUMNS,
        "rows": [(attack, mnist) for attack, (mnist, _) in RCE_AUC.items()],
        "note": _RCE_NOTE},
    "rce-nips2018": {
        "title": "The RCE paper's AUC table (NeurIPS 2018, MNIST and CIFAR-10; the seed talk), for orientation",
        "first": "Attack", "columns": RCE_AUC_COLUMNS,
        "rows": [(f"{attack} ({dataset})", values[index]) for index, dataset in enumerate(("MNIST", "CIFAR-10"))
                 for attack, values in RCE_AUC.items()],
        "note": _RCE_NOTE + " Fashion-MNIST is in neither; MNIST's rows are the nearer setting."},
}
DEFAULT_REFERENCE = "namid-table1"
FIGURES = {"training_curves.png": "clean and PGD accuracy per epoch of every defense (mean over seeds, band: +- 1 std)",
           "mi_distributions.png": "stage 2's per-sample MI estimates on the selected test samples (seeds pooled)",
           "robust_vs_epsilon.png": "PGD accuracy against the L-inf budget for every defense (mean +- 1 std over seeds)"}


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def cell_stats(values: list) -> dict:
    """Mean and sample standard deviation (n - 1) over seeds, in [0, 1]."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values), "values": values}


def format_cell(stats) -> str:
    if stats is None:
        return "-"
    if stats["std"] is None:
        return f"{100 * stats['mean']:.2f}"
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def row_key(defense: str, predictor) -> str:
    """A table row's key: the defense's own row is the defense; a predictor around it (e.g. mixup inference) is
    <defense>/<predictor>."""
    return defense if predictor is None else f"{defense}/{predictor}"


def comparison(config: dict, tasks: list) -> dict:
    """Per table row and column, the statistics over seeds of the evaluations' accuracies. Rows: each defense's
    own, then the rows its evaluation script adds around it (utils/evaluators.py: e.g. "Mixup + mixup inference
    (OL)"), whose per-seed value may itself be a mean over repeated randomized evaluations."""
    variants = list(config.get("eval_variants") or {}) or [None]
    evals = [task for variant in variants for task in tasks if task.kind == "eval" and task.variant == variant]
    columns, per_row, test_images = [], {}, set()
    predictors = {defense: [] for defense in config["defenses"]}  # (key, label) of the added rows, in order
    for task in evals:  # variant by variant: the columns of the first variant, then the next's
        results = _read_json(task.run_dir / "results.json")
        for column in results["columns"]:
            entry = (variant_column(task.variant, column["key"]),
                     column["header"] if task.variant is None else f"{task.variant}: {column['header']}")
            if entry not in columns:
                columns.append(entry)
        for predictor, label, values in evaluator(task.script).rows(results):
            if predictor is not None and (predictor, label) not in predictors.setdefault(task.defense, []):
                predictors[task.defense].append((predictor, label))
            accuracies = {variant_column(task.variant, key): value for key, value in values.items()}
            per_row.setdefault(row_key(task.defense, predictor), {}).setdefault(task.seed, {}).update(accuracies)
        test_images.add(results["test_images"])
    rows, cells = [], {}
    for defense in config["defenses"]:
        own = DEFENSES[defense].label
        for predictor, label in [(None, None)] + predictors.get(defense, []):
            key = row_key(defense, predictor)
            rows.append({"key": key, "defense": defense, "predictor": predictor,
                         "label": own if predictor is None else f"{own} + {label}"})
            seeds = per_row.get(key, {})
            cells[key] = {column: cell_stats([seeds[s][column] for s in sorted(seeds) if column in seeds[s]])
                          for column, _ in columns if any(column in row for row in seeds.values())}
    return {"columns": columns, "rows": rows, "cells": cells, "test_images": sorted(test_images)}


def paired_comparisons(config: dict, tasks: list, columns: list) -> list:
    """Each row against its baseline (Defense.baseline: the stage-1 defense it modifies), when the preset trains
    both and test_comparison.py evaluates them: per table column and seed, the difference of accuracy on the same
    test images and McNemar's p (utils/paired.py); over seeds, the mean and std of the differences and the test on
    every seed's images pooled."""
    if eval_script(config) != DEFAULT_EVAL_SCRIPT:  # the other evaluation scripts keep no per-example flags
        return []
    evals = {(task.defense, task.variant, task.seed): task for task in tasks if task.kind == "eval"}
    pairs = []
    for defense in config["defenses"]:
        baseline = DEFENSES[defense].baseline
        if baseline not in config["defenses"]:
            continue
        per_column = {}
        for (name, variant, seed), task in evals.items():
            other = evals.get((baseline, variant, seed))
            if name != defense or other is None:
                continue
            try:
                mine, theirs = (_read_json(t.run_dir / "results.json") for t in (task, other))
            except (OSError, ValueError):  # not evaluated yet
                continue
            if mine.get("test_indices") is None or mine["test_indices"] != theirs.get("test_indices"):
                continue  # other images (or a record that does not say which): nothing to pair
            first, second = mine["models"][0], theirs["models"][0]
            for key in row_accuracies(first).keys() & row_accuracies(second).keys():
                try:
                    counts = paired_counts(per_example_flags(first, key), per_example_flags(second, key))
                except KeyError:  # a column without per-example flags
                    continue
                per_column.setdefault(variant_column(variant, key), {})[seed] = counts
        if per_column:
            pairs.append({"defense": defense, "baseline": baseline,
                          "label": f"{DEFENSES[defense].label} − {DEFENSES[baseline].label}",
                          "columns": {column: paired_summary(per_column[column])
                                      for column, _ in columns if column in per_column}})
    return pairs


def paired_summary(per_seed: dict) -> dict:
    differences = [per_seed[seed]["difference"] for seed in sorted(per_seed)]
    only_first = sum(counts["only_first"] for counts in per_seed.values())
    only_second = sum(counts["only_second"] for counts in per_seed.values())
    return {"seeds": {str(seed): per_seed[seed] for seed in sorted(per_seed)}, "mean": statistics.fmean(differences),
            "std": statistics.stdev(differences) if len(differences) > 1 else None,
            "pooled": {"only_first": only_first, "only_second": only_second, "p": mcnemar_p(only_first, only_second)}}


def paired_markdown(tables: list) -> list:
    """results.md's section: a heading, what the numbers are, and the pairs' tables (paired_tables's lines)."""
    if not tables:
        return []
    return ["## Each row against its baseline, on the same test images", "",
            "Difference of accuracy in points (the row's minus its baseline's) per seed, with the exact McNemar "
            "p-value on the images where exactly one of the two is right (utils/paired.py); then the mean ± std of "
            "the seeds' differences (the training noise) and McNemar's test on every seed's images pooled (the "
            "test set's noise). An effect is established only if it clears both.", "", *tables]


def paired_tables(pairs: list, columns: list) -> list:
    """A markdown table per pair (rows: each seed, the mean ± std over seeds, the pooled test), as lines."""
    lines = []
    for pair in pairs:
        shown = [(key, header) for key, header in columns if key in pair["columns"]]
        cells = pair["columns"]
        seeds = sorted({seed for cell in cells.values() for seed in cell["seeds"]}, key=int)
        lines += [f"| {pair['label']} | " + " | ".join(header for _, header in shown) + " |",
                  "|" + "|".join(["---"] + ["---:"] * len(shown)) + "|"]
        for seed in seeds:
            lines.append(f"| seed {seed} | " + " | ".join(
                f"{100 * c['difference']:+.2f} (p {c['p']:.2g})" if (c := cells[key]["seeds"].get(seed)) else "-"
                for key, _ in shown) + " |")
        lines.append("| mean ± std over seeds | " + " | ".join(
            f"{100 * cells[key]['mean']:+.2f}" + ("" if cells[key]["std"] is None else f" ± {100 * cells[key]['std']:.2f}")
            for key, _ in shown) + " |")
        lines.append("| pooled: right for the row only / the baseline only | " + " | ".join(
            f"{cells[key]['pooled']['only_first']} / {cells[key]['pooled']['only_second']} "
            f"(p {cells[key]['pooled']['p']:.2g})" for key, _ in shown) + " |")
        lines.append("")
    return lines


def stage_warnings(tasks: list) -> list:
    """Every stage's warnings (training, estimators, evaluation), in plan order, with the stage that raised them."""
    return [{"stage": task.name, "message": message} for task in tasks for message in read_warnings(task.run_dir)]


def stage_commits(tasks: list) -> dict:
    """{stage: the commits that made its outputs}: a training's config.json (and each resumption's), an
    evaluation's results.json; a study continued after an update of the code says which stages each commit ran."""
    commits = {}
    for task in tasks:
        found = []
        for name in ("config.json", "results.json"):
            try:
                record = _read_json(task.run_dir / name)
            except (OSError, ValueError):
                continue
            found += [record.get("git_commit")] + [resume.get("git_commit") for resume in record.get("resumes", [])]
        commits[task.name] = list(dict.fromkeys(commit for commit in found if commit))
    return commits


def copied_stages(tasks: list) -> dict:
    """{stage: the study folder's stage it was copied from} (reproduce.py --reuse)."""
    copied = {}
    for task in tasks:
        try:
            source = _read_json(task.run_dir / MARKER).get("copied_from")
        except (OSError, ValueError):
            continue
        if source:
            copied[task.name] = source
    return copied


def copied_line(copied: dict) -> list:
    if not copied:
        return []
    return ["Stages copied from earlier study folders (reproduce.py --reuse; same command line and inputs): "
            + "; ".join(f"{stage} from {source}" for stage, source in copied.items()) + ".", ""]


def commits_line(commits: dict) -> str:
    by_commit = {}
    for stage, made_by in commits.items():
        for commit in made_by:
            by_commit.setdefault(commit, []).append(stage)
    if len(by_commit) <= 1:
        return f"Code: every stage ran at commit {next(iter(by_commit), 'unknown')}."
    return "Code: stages ran at several commits: " + "; ".join(
        f"{commit} ran {', '.join(stages)}" for commit, stages in by_commit.items()) + "."


def comparison_markdown(config: dict, table: dict) -> str:
    columns = table["columns"]
    lines = ["| Defense | " + " | ".join(header for _, header in columns) + " |",
             "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    for row in table["rows"]:
        cells = table["cells"][row["key"]]
        lines.append(f"| {row['label']} | " + " | ".join(format_cell(cells.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines) + "\n"


def comparison_csv(config: dict, table: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["defense", "label", "column", "header", "mean", "std", "seeds", "per_seed"])
    for row in table["rows"]:
        for key, header in table["columns"]:
            stats = table["cells"][row["key"]].get(key)
            if stats:
                writer.writerow([row["defense"], row["label"], key, header, f"{stats['mean']:.6f}",
                                 "" if stats["std"] is None else f"{stats['std']:.6f}", stats["n"],
                                 " ".join(f"{v:.6f}" for v in stats["values"])])
    return buffer.getvalue()


def _metrics_columns(path: Path) -> dict:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {key: [float(row[key]) if row.get(key) not in (None, "") else float("nan") for row in rows]
            for key in (rows[0] if rows else {})}


def training_curves(config: dict, tasks: list) -> dict:
    """Per defense, per-seed per-epoch clean and PGD accuracy (test split if evaluated, else validation)."""
    curves = {}
    for task in tasks:
        if task.kind not in ("standard", "namid") or task.defense not in config["defenses"]:
            continue
        metrics = _metrics_columns(task.run_dir / "metrics.csv")
        split = "test" if not all(numpy.isnan(metrics.get("test_pgd_acc", [float("nan")]))) else "val"
        entry = curves.setdefault(DEFENSES[task.defense].label, {"clean": [], "robust": [], "split": split})
        entry["clean"].append(metrics[f"{split}_clean_acc"])
        nan = [float("nan")] * len(metrics[f"{split}_clean_acc"])
        entry["robust"].append(metrics.get(f"{split}_pgd_acc", nan))  # a natural training may log no PGD accuracy
    order = [DEFENSES[d].label for d in config["defenses"]]
    return {label: curves[label] for label in order if label in curves}


def robustness_curves(config: dict, tasks: list):
    """Epsilons (0 first: clean accuracy) and per defense the per-seed accuracies at each of them."""
    epsilons = sorted({number(str(e)) for e in config.get("epsilons") or ()})
    if not epsilons:
        return [], {}
    by_seed = {}
    for task in tasks:
        if task.kind == "curve":
            results = _read_json(task.run_dir / "results.json")
            epsilon = float(results["epsilon_linf"])
            for record in results["models"]:
                by_seed.setdefault(task.seed, {}).setdefault(record["label"], {})[epsilon] = record["attacks"]["pgd"]["accuracy"]
                by_seed[task.seed][record["label"]][0.0] = record["clean"]["accuracy"]
    grid = [0.0] + epsilons
    curves = {}
    for defense in config["defenses"]:
        label = DEFENSES[defense].label
        series = [[by_seed[s][label].get(_closest(by_seed[s][label], e)) for e in grid] for s in sorted(by_seed)
                  if label in by_seed[s]]
        if series:
            curves[label] = series
    return grid, curves


def _closest(values: dict, epsilon: float) -> float:
    return min(values, key=lambda key: abs(key - epsilon))


def mi_runs(tasks: list) -> dict:
    """Per stage-2 run (its folder's name: estimators, only-max, only-max-at-mmc...), the per-sample MI values of
    every seed pooled."""
    pooled = {}
    for task in tasks:
        path = task.run_dir / MI_VALUES_FILE
        if task.kind in ESTIMATOR_RUNS and path.is_file():
            with numpy.load(path) as data:
                for name in data.files:
                    pooled.setdefault(task.run_dir.name, {}).setdefault(name, []).append(data[name])
    return {kind: {name: numpy.concatenate(parts) for name, parts in values.items()} for kind, values in pooled.items()}


def estimator_verdicts(tasks: list) -> list:
    """Per stage-2 run, the test split's informativeness verdicts (mi_report.json), as markdown lines."""
    lines = []
    for task in tasks:
        if task.kind not in ESTIMATOR_RUNS:
            continue
        verdicts = read_informativeness(task.run_dir / ESTIMATOR_FILE)
        if verdicts is None:
            lines.append(f"- `{task.name}`: no verdict (no mi_report.json)")
            continue
        lines.append(f"- `{task.name}`: {'informative' if verdicts['informative'] else '**not informative**'}: "
                     f"{verdict_line(verdicts)}")
    return lines


def reference_table(config: dict) -> dict:
    """The published table the preset names (its "reference" key), NAMID's Table 1 by default."""
    return REFERENCE_TABLES[config.get("reference") or DEFAULT_REFERENCE]


def paper_markdown(reference: dict = None) -> str:
    """A reference table (default: NAMID's Table 1) in markdown, its note below it."""
    reference = reference or REFERENCE_TABLES[DEFAULT_REFERENCE]
    if not reference["rows"]:  # no published numbers at hand: only the note
        return reference["note"] + "\n"
    columns = reference["columns"]
    lines = [f"| {reference['first']} | " + " | ".join(columns) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    lines += [f"| {name} | " + " | ".join("-" if value is None else value for value in values) + " |"
              for name, values in reference["rows"]]
    if reference["note"]:
        lines += ["", reference["note"]]
    return "\n".join(lines) + "\n"


def write_study(config: dict, tasks: list, out: Path, stage_seconds: dict, invocation: dict) -> dict:
    """results.md/.csv/.json and the figures in `out`; returns what the closing summary prints: the caption,
    the markdown table, each row against its baseline and every stage's warnings."""
    table = comparison(config, tasks)
    pairs = paired_comparisons(config, tasks, table["columns"])
    pair_tables = paired_tables(pairs, table["columns"])
    warnings = stage_warnings(tasks)
    commits = stage_commits(tasks)
    copied = copied_stages(tasks)
    dataset = config["standard"].get("dataset")  # test_comparison.py reads it from the checkpoints
    seeds = ("seed " if len(config["seeds"]) == 1 else "seeds ") + ", ".join(map(str, config["seeds"]))
    markdown_table = comparison_markdown(config, table)
    written = []
    curves = training_curves(config, tasks)
    if curves:
        plot_training_curves(curves, out / "training_curves.png", f"{config['preset']}: training curves ({seeds})")
        written.append("training_curves.png")
    runs = mi_runs(tasks)
    if runs:
        plot_mi_distributions(runs, out / "mi_distributions.png",
                              f"{config['preset']}: stage-2 MI estimates on the test set's selected samples ({seeds} pooled)")
        written.append("mi_distributions.png")
    grid, robustness = robustness_curves(config, tasks)
    if robustness:
        plot_robustness_curves(robustness, grid, out / "robust_vs_epsilon.png",
                               f"{config['preset']}: PGD-{config['curve_steps']} accuracy ({seeds})")
        written.append("robust_vs_epsilon.png")
    images = " / ".join(map(str, table["test_images"]))
    total = sum(value or 0 for value in stage_seconds.values())
    caption = (f"{config['preset']}: robust accuracy (%) on {dataset or 'the test set'}, "
               + (f"mean ± std over {len(config['seeds'])} seeds ({seeds})" if len(config["seeds"]) > 1
                  else f"a single run ({seeds}; no spread across seeds)") + f", {images} test images per seed")
    lines = [f"# {caption}", "", markdown_table,
             f"{seeds.capitalize()}: each seed trains every stage anew and is evaluated on its own {images} test images "
             f"(class-balanced subset when eval.test-limit is set). "
             + ("A cell is the mean ± the sample standard deviation over seeds of the per-seed accuracy"
                if len(config["seeds"]) > 1 else "A cell is that one run's accuracy, with no spread to show")
             + f"; {evaluator(eval_script(config)).note}.",
             "", f"Command: `{invocation['command']}` (this table's configuration: results.json; the study's: "
             f"config.json). Every stage's command is in its run folder "
             f"(config.json, reproduce_stage.json); logs in logs/. Stage wall time, summed: {total:.0f} s "
             f"over {len(stage_seconds)} stage runs (a resumed stage counts from its resumption); this invocation: {invocation['seconds']:.0f} s on "
             f"{invocation['machine']}.", "", commits_line(commits), "", *copied_line(copied), *paired_markdown(pair_tables),
             "## The MI estimators (stage 2, test split)", "",
             *(estimator_verdicts(tasks) or ["none"]), "",
             f"## {reference_table(config)['title']}", "", paper_markdown(reference_table(config)),
             "## Figures", ""]
    lines += [f"- `{name}`: {FIGURES[name]}" for name in written] or ["none"]
    lines += ["", "## Warnings (every stage)", ""]
    lines += [f"- `{w['stage']}`: {w['message']}" for w in warnings] or ["none"]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    atomic_write_text(out / "results.csv", comparison_csv(config, table))
    atomic_write_json(out / "results.json", {
        "preset": config["preset"], "config": config, "columns": [{"key": k, "header": h} for k, h in table["columns"]],
        "rows": table["rows"], "cells": table["cells"], "test_images": table["test_images"], "warnings": warnings,
        "robust_vs_epsilon": {"epsilons": grid, "accuracy": robustness},
        "training_curves": curves, "figures": written, "stage_seconds": stage_seconds,
        "stage_commits": commits, "copied_stages": copied, "paired": pairs, "invocation": invocation})
    return {"caption": caption, "table": markdown_table, "warnings": warnings,
            "paired": "\n".join(pair_tables)}
