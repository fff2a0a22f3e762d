"""reproduce.py with test_detection.py as the evaluation script: the RCE presets' plans (CE and RCE trainings, their
detection evaluations), the study table's columns read from test_detection.py's results (the RCE paper's AUCs and
accuracy with rejection), aggregated over seeds, and a tiny study end to end."""
import csv
import io
import json
from pathlib import Path

import pytest

from tests.helpers import INVOCATION
from tests.test_reproduce import run_study
from tests.test_reproduce_seed_talk import fake_study, flag_value, flag_values, plan
from utils.errors import UserError
from utils.evaluators import EVALUATORS
from utils.pipeline import DEFENSES, check_command_lines
from utils.presets import PRESETS
from utils.study import REFERENCE_TABLES, comparison, comparison_csv, comparison_markdown, paper_markdown, write_study

FMNIST, MNIST = "rce-fashion-mnist-cpu", "rce-mnist-cpu"
ATTACKS = ["fgsm", "bim", "ilcm", "jsma", "cw", "cw-hc", "aware", "aa"]
SCORES = ["confidence", "non-me", "k-density"]


@pytest.mark.parametrize("preset, dataset, train_limit", [(FMNIST, "fashion-mnist", "10000"), (MNIST, "mnist", "20000")])
def test_the_rce_presets_plan_ce_and_rce_trainings_and_detection_evaluations(preset, dataset, train_limit):
    config, tasks = plan(preset)
    assert config["defenses"] == ["sce", "rce"] and config["seeds"] == [0, 1, 2] and config["jobs"] == 2
    assert config["eval_script"] == "test_detection.py" and not config["epsilons"] and config["surrogate"] is None
    assert list(tasks) == [f"seed{s}/{stage}" for s in (0, 1, 2) for stage in ("sce", "rce", "eval-sce", "eval-rce")]
    for seed in (0, 1, 2):
        for defense, head in (("sce", []), ("rce", ["--head", "rce"])):
            train = tasks[f"seed{seed}/{defense}"]
            assert train.script == "train_standard.py" and train.kind == "standard" and train.deps == []
            # no --lr or --optimizer: CE takes the dataset's (SGD lr 0.05), RCE its head's (SGD lr 0.1)
            assert train.argv == ["--dataset", dataset, "--train-limit", train_limit, "--test-limit", "1000",
                                  "--epochs", "10", "--grad-clip", "10", "--loss", "natural", *head,
                                  "--seed", str(seed), "--model-dir", f"study/seed{seed}/{defense}",
                                  "--device", "cpu", "--data-dir", "data"]
            evaluation = tasks[f"seed{seed}/eval-{defense}"]
            assert evaluation.script == "test_detection.py" and evaluation.kind == "eval"
            assert evaluation.deps == [f"seed{seed}/{defense}"]
            assert evaluation.inputs == [Path(f"study/seed{seed}/{defense}/best.pt")]
            # C&W's and the detector-aware attack's settings written out, so that no record of the earlier
            # defaults (C&W lr 0.01; 3 targets) is reused for these; MNIST's saturated pixels need more C&W iterations
            cw = (["--cw-steps", "100", "--cw-hc-steps", "200"] if preset == FMNIST else
                  ["--cw-steps", "500", "--cw-hc-steps", "500", "--cw-search-steps", "4", "--cw-initial-const", "10"])
            assert evaluation.argv == ["--test-limit", "1000", "--attacks", *ATTACKS, *cw, "--cw-lr", "0.1",
                                       "--aware-targets", "9",
                                       "--checkpoints", f"study/seed{seed}/{defense}/best.pt",
                                       "--labels", {"sce": "SCE", "rce": "RCE"}[defense], "--seed", str(seed),
                                       "--out-dir", f"study/seed{seed}/eval-{defense}", "--device", "cpu",
                                       "--data-dir", "data"]
    check_command_lines(list(tasks.values()))  # every command line parses with its script's parser
    assert config["reference"] == ("rce-nips2018" if preset == FMNIST else "rce-nips2018-mnist")


def test_at_rce_trains_rce_with_adversarial_training():
    assert DEFENSES["rce"].flags == ("--loss", "natural", "--head", "rce") and DEFENSES["rce"].label == "RCE"
    assert DEFENSES["at-rce"].flags == ("--loss", "at", "--head", "rce") and DEFENSES["at-rce"].label == "AT-RCE"
    _, tasks = plan(FMNIST, defenses=["sce", "rce", "at-rce"], seeds=[1])
    argv = tasks["seed1/at-rce"].argv
    assert flag_value(argv, "--loss") == "at" and flag_value(argv, "--head") == "rce"
    assert tasks["seed1/eval-at-rce"].script == "test_detection.py"
    assert flag_value(tasks["seed1/eval-at-rce"].argv, "--labels") == "AT-RCE"
    check_command_lines(list(tasks.values()))


def test_set_on_the_eval_section_is_checked_against_test_detection():
    _, tasks = plan(FMNIST, ["eval.cw-steps=3", "eval.fpr=0.1", "eval.attacks=fgsm aware"], seeds=[0])
    argv = tasks["seed0/eval-rce"].argv
    assert flag_value(argv, "--cw-steps") == "3" and flag_value(argv, "--fpr") == "0.1"
    assert flag_values(argv, "--attacks") == ["fgsm", "aware"]
    with pytest.raises(UserError, match="test_detection.py has no --pgd-steps"):
        plan(FMNIST, ["eval.pgd-steps=3"])
    with pytest.raises(UserError, match="the runner sets --head itself"):
        plan(FMNIST, ["standard.head=softmax"])
    with pytest.raises(UserError, match="curve runs test_comparison.py"):
        plan(MNIST, epsilons=["0.1"])


def test_the_reference_tables_are_the_rce_papers_auc_table():
    mnist = paper_markdown(REFERENCE_TABLES["rce-nips2018-mnist"]).splitlines()
    assert mnist[0] == "| Attack | CE conf. | CE non-ME | CE K-dens. | RCE conf. | RCE non-ME | RCE K-dens. |"
    assert mnist[2:8] == ["| FGSM | 79.7 | 66.8 | 98.8 | 98.8 | 98.6 | 99.4 |",
                          "| BIM | 88.9 | 70.5 | 90.0 | 91.7 | 90.6 | 91.8 |",
                          "| ILCM | 98.4 | 50.4 | 96.2 | 100.0 | 97.0 | 98.6 |",
                          "| JSMA | 98.6 | 60.1 | 97.7 | 100.0 | 99.4 | 99.0 |",
                          "| C&W | 98.6 | 64.1 | 99.4 | 100.0 | 99.5 | 99.8 |",
                          "| C&W-hc | 0.0 | 40.0 | 91.1 | 0.1 | 93.4 | 99.6 |"]
    both = paper_markdown(REFERENCE_TABLES["rce-nips2018"])
    assert "| FGSM (MNIST) | 79.7 | 66.8 | 98.8 | 98.8 | 98.6 | 99.4 |" in both
    assert "| BIM (CIFAR-10) | 0.0 | 64.6 | 100.0 | 0.7 | 70.2 | 100.0 |" in both
    assert "| C&W-hc (CIFAR-10) | 0.0 | 28.8 | 75.4 | 0.2 | 53.6 | 91.8 |" in both
    assert "for orientation only" in both and "Fashion-MNIST is in neither" in both


# ----------------------------------------------------------------------------------------------
# The study's table from test_detection.py's results


def fake_record(base: float, nan_auc=()) -> dict:
    """One model's record as test_detection.py writes it: clean accuracy and accuracy with rejection, per attack the
    AUC per score (NaN for the attacks in nan_auc: no pair) and accuracy with and without rejection."""
    detectors = SCORES + ["all"]
    record = {"label": "x", "clean": {"accuracy": base, "fpr": {d: 0.05 for d in detectors},
                                      "accuracy_with_rejection": {d: base - 0.01 * i for i, d in enumerate(detectors)}},
              "attacks": {}}
    for a, attack in enumerate(ATTACKS):
        auc = {s: (float("nan") if attack in nan_auc else base - 0.1 * i - 0.01 * a) for i, s in enumerate(SCORES)}
        if attack in ("aware", "aa"):  # not in the authors' table: their AUC stays out
            auc = {s: 0.5 for s in SCORES}
        record["attacks"][attack] = {"pairs": 0 if attack in nan_auc else 10, "auc": auc,
                                     "robust_accuracy": base / 2 - 0.01 * a,
                                     "accuracy_with_rejection": {d: base / 2 + 0.02 * i - 0.01 * a
                                                                 for i, d in enumerate(detectors)}}
    record["worst_case"] = {"attacks": ["fgsm", "bim", "ilcm", "aware", "aa"], "robust_accuracy": base / 4,
                            "accuracy_with_rejection": {d: base / 4 + 0.01 * i for i, d in enumerate(detectors)}}
    return record


def fake_detection_results(path: Path, record: dict, images: int = 1000):
    from utils.detection import study_columns
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({"columns": study_columns(ATTACKS), "test_images": images,
                                                   "models": [record], "complete": True}))


def test_the_rows_reader_turns_a_record_into_auc_and_rejection_columns(tmp_path):
    from utils.detection import study_columns
    columns = study_columns(ATTACKS)
    keys = [c["key"] for c in columns]
    assert keys[:4] == ["clean", "fgsm:auc:confidence", "fgsm:auc:non-me", "fgsm:auc:k-density"]
    # clean, 6 attacks of the authors' x 3 scores, then K-density and all three for clean, 8 attacks, worst case
    assert len(keys) == 1 + 6 * 3 + 10 * 2 and len(set(keys)) == len(keys)
    assert keys[-6:] == ["aware:rejection:k-density", "aware:rejection:all", "aa:rejection:k-density",
                         "aa:rejection:all", "worst:rejection:k-density", "worst:rejection:all"]
    assert "aware:auc:confidence" not in keys and "aa:auc:confidence" not in keys and "clean:rejection:all" in keys
    headers = {c["key"]: c["header"] for c in columns}
    assert headers["cw-hc:auc:non-me"] == "C&W-hc AUC non-ME (×10⁻²)"
    assert headers["aware:rejection:all"] == "detector-aware PGD, rej. all three"
    assert headers["clean:rejection:k-density"] == "Clean, rej. K-dens."
    assert [c["key"] for c in study_columns(["fgsm", "aware"])] == [
        "clean", "fgsm:auc:confidence", "fgsm:auc:non-me", "fgsm:auc:k-density", "clean:rejection:k-density",
        "clean:rejection:all", "fgsm:rejection:k-density", "fgsm:rejection:all", "aware:rejection:k-density",
        "aware:rejection:all", "worst:rejection:k-density", "worst:rejection:all"]
    assert "worst:rejection:all" not in [c["key"] for c in study_columns(["fgsm", "jsma"])]  # one attack: no worst case
    assert headers["worst:rejection:all"] == "Worst case within epsilon, rej. all three"
    [(predictor, label, values)] = EVALUATORS["test_detection.py"].rows(
        {"columns": columns, "test_images": 1000, "models": [fake_record(0.9, nan_auc=("cw-hc",))]})
    assert predictor is None and label is None
    assert values["clean"] == 0.9 and values["fgsm:auc:confidence"] == pytest.approx(0.9)
    assert values["bim:auc:k-density"] == pytest.approx(0.69)  # 0.9 - 0.2 (third score) - 0.01 (second attack)
    assert values["clean:rejection:all"] == pytest.approx(0.87)
    assert values["aware:rejection:all"] == pytest.approx(0.45 + 0.06 - 0.06)
    assert values["aware:rejection:non-me"] == pytest.approx(0.45 + 0.02 - 0.06)  # every detector, beyond the table
    assert values["jsma:accuracy"] == pytest.approx(0.42)
    assert values["worst:rejection:all"] == pytest.approx(0.225 + 0.03) and values["worst:accuracy"] == 0.225
    assert not any(key.startswith("cw-hc:auc") for key in values)  # undefined (no pair): left out
    assert not any(key.startswith("aware:auc") for key in values)
    assert all(0 <= value <= 1 for value in values.values())


def test_the_detection_table_averages_each_column_over_seeds(tmp_path):
    config, tasks = plan(FMNIST, seeds=[0, 1], out=tmp_path)

    def evaluate(task):
        base = {"sce": 0.8, "rce": 0.9}[task.defense] + task.seed / 20
        # seed 1's C&W-hc found no pair on RCE: its AUC cells average seed 0 only
        nan = ("cw-hc",) if (task.defense, task.seed) == ("rce", 1) else ()
        fake_detection_results(task.run_dir, fake_record(base, nan_auc=nan))
    fake_study(tasks, evaluate)
    table = comparison(config, list(tasks.values()))
    assert [row["label"] for row in table["rows"]] == ["SCE", "RCE"]
    assert len(table["columns"]) == 39 and table["columns"][1] == ("fgsm:auc:confidence", "FGSM AUC conf. (×10⁻²)")
    rce = table["cells"]["rce"]
    assert rce["fgsm:auc:confidence"]["values"] == pytest.approx([0.9, 0.95])
    assert rce["fgsm:auc:confidence"]["mean"] == pytest.approx(0.925) and rce["clean"]["n"] == 2
    assert rce["cw-hc:auc:k-density"]["values"] == pytest.approx([0.65]) and rce["cw-hc:auc:k-density"]["n"] == 1
    assert table["cells"]["sce"]["cw-hc:auc:k-density"]["n"] == 2
    markdown = comparison_markdown(config, table).splitlines()
    assert markdown[0].startswith("| Defense | Clean | FGSM AUC conf. (×10⁻²) | FGSM AUC non-ME (×10⁻²) |")
    assert markdown[0].endswith("| AutoAttack, rej. all three | Worst case within epsilon, rej. K-dens. | "
                                "Worst case within epsilon, rej. all three |")
    # AUC 0.9 and 0.95 read 92.50 (x10^-2), as the paper writes them; a single defined seed has no spread
    assert markdown[3].startswith("| RCE | 92.50 ± 3.54 | 92.50 ± 3.54 | 82.50 ± 3.54 |")
    assert "| 65.00 |" in markdown[3]
    rows = list(csv.DictReader(io.StringIO(comparison_csv(config, table))))
    assert len(rows) == 2 * 39 and {r["defense"] for r in rows} == {"sce", "rce"}
    write_study(config, list(tasks.values()), tmp_path, {}, INVOCATION)
    text = (tmp_path / "results.md").read_text()
    assert "the AUC columns are the RCE paper's protocol" in text and "every number" in text.lower()
    assert "The RCE paper's AUC table (NeurIPS 2018, MNIST and CIFAR-10" in text
    assert "| FGSM (MNIST) | 79.7 |" in text and "The paper's Table 1" not in text


# ----------------------------------------------------------------------------------------------
# A tiny rce-fashion-mnist-cpu end to end


def tiny_rce_args(out, data_dir, *extra):
    return ["--preset", FMNIST, "--seeds", "0", "1", "--jobs", "1", "--out", str(out), "--data-dir", str(data_dir),
            "--device", "cpu",
            "--set", "train-limit=300", "val-size=100", "standard.test-limit=50", "train.epochs=1",
            "standard.eval-steps=2", "standard.warmup-epochs=0", "eval.test-limit=20", "eval.bim-steps=2",
            "eval.jsma-gamma=0.01", "eval.cw-steps=2", "eval.cw-hc-steps=2", "eval.cw-search-steps=1",
            "eval.aware-steps=2", "eval.aware-targets=1", "eval.kd-kernels=20", *extra]


def test_a_tiny_rce_study_end_to_end(fmnist_dir, tmp_path):
    out = tmp_path / "rce"
    result = run_study(tiny_rce_args(out, fmnist_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    keys = [c["key"] for c in results["columns"]]
    assert len(keys) == 39 and keys[0] == "clean" and keys[-1] == "worst:rejection:all"
    assert [row["label"] for row in results["rows"]] == ["SCE", "RCE"]
    for seed in (0, 1):
        for defense, head in (("sce", "softmax"), ("rce", "rce")):
            evaluation = json.loads((out / f"seed{seed}" / f"eval-{defense}" / "results.json").read_text())
            assert evaluation["complete"] and evaluation["test_images"] == 20 and evaluation["columns"] == \
                results["columns"]
            [record] = evaluation["models"]
            assert record["head"] == head and record["label"] == {"sce": "SCE", "rce": "RCE"}[defense]
            cells = results["cells"][defense]
            assert cells["clean"]["values"][seed] == pytest.approx(record["clean"]["accuracy"])
            assert cells["aware:rejection:all"]["values"][seed] == pytest.approx(
                record["attacks"]["aware"]["accuracy_with_rejection"]["all"])
            assert cells["worst:rejection:all"]["values"][seed] == pytest.approx(
                record["worst_case"]["accuracy_with_rejection"]["all"])
    for key, cells in results["cells"].items():
        assert {"clean", "aware:rejection:all", "clean:rejection:k-density"} <= set(cells) <= set(keys), key
        assert all(1 <= stats["n"] <= 2 and 0 <= stats["mean"] <= 1 for stats in cells.values()), key
    assert results["cells"]["rce"]["clean"]["n"] == 2
    markdown = (out / "results.md").read_text()
    assert markdown.startswith(f"# {FMNIST}: robust accuracy (%) on fashion-mnist, mean ± std over 2 seeds "
                               "(seeds 0, 1), 20 test images per seed")
    assert "| Defense | Clean | FGSM AUC conf. (×10⁻²) |" in markdown and "| RCE |" in markdown
    assert "the AUC columns are the RCE paper's protocol" in markdown and "| FGSM (MNIST) | 79.7 |" in markdown
    assert "| RCE |" in result.stdout  # the table is printed
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert {r["label"] for r in rows} == {"SCE", "RCE"} and {r["column"] for r in rows} <= set(keys)
    assert {r["column"] for r in rows if r["label"] == "RCE"} >= {"clean", "fgsm:rejection:all", "aware:rejection:all"}


def test_help_and_docstring_list_the_rce_presets_and_defenses(monkeypatch):
    import reproduce
    monkeypatch.setenv("COLUMNS", "1000")
    text = reproduce.build_parser().format_help()
    for name in (FMNIST, MNIST, "at-rce"):
        assert name in text and name in reproduce.__doc__, name
    assert set(PRESETS) >= {FMNIST, MNIST}
