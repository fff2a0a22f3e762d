"""The table of a control run against the study's Standard AT and AT-MMC-10 under AutoAttack, per seed and pooled
(paired on the same test images with utils.paired). From the repository root:

    python3 bench/results/seed-talk-fashion-mnist-cpu/control_table.py control-standard-at-cw eval-standard-at-cw
"""
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from utils.paired import mcnemar_p, paired_counts, per_example_flags  # noqa: E402

STUDY = Path(__file__).resolve().parent
BASELINES = {"Standard AT": "eval-standard-at", "AT-MMC-10": "eval-at-mmc"}


def only_model(path: Path) -> tuple:
    results = json.loads(path.read_text())
    assert len(results["models"]) == 1, path
    return results, results["models"][0]


def main(control: str, evaluation: str):
    accuracies = {key: [] for key in ("clean", "pgd", "aa")}
    differences = {name: [] for name in BASELINES}
    pooled = {name: [0, 0] for name in BASELINES}
    print("| seed | clean | PGD-40 | AutoAttack | " + " | ".join(f"AutoAttack − {n}" for n in BASELINES) + " |")
    print("|---:|---:|---:|---:|" + "---:|" * len(BASELINES))
    for seed in (0, 1, 2):
        results, model = only_model(STUDY / control / f"seed{seed}" / evaluation / "results.json")
        cells = []
        for key in accuracies:
            accuracies[key].append(100 * sum(per_example_flags(model, key)) / len(results["test_indices"]))
            cells.append(f"{accuracies[key][-1]:.1f}")
        for name, stage in BASELINES.items():
            theirs, baseline = only_model(STUDY / f"seed{seed}" / stage / "results.json")
            assert theirs["test_indices"] == results["test_indices"], f"seed {seed}: not the same test images as {name}"
            counts = paired_counts(per_example_flags(model, "aa"), per_example_flags(baseline, "aa"))
            differences[name].append(100 * counts["difference"])
            pooled[name][0] += counts["only_first"]
            pooled[name][1] += counts["only_second"]
            cells.append(f"{differences[name][-1]:+.1f} ({counts['only_first']} / {counts['only_second']}, p {counts['p']:.1g})")
        print(f"| {seed} | " + " | ".join(cells) + " |")

    def spread(values):
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"

    cells = [spread(accuracies[key]) for key in accuracies]
    cells += [f"{spread(differences[n])} ({pooled[n][0]} / {pooled[n][1]}, p {mcnemar_p(*pooled[n]):.1g})" for n in BASELINES]
    print("| mean ± std (pooled McNemar) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(*sys.argv[1:])
