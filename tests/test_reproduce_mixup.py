"""reproduce.py with another evaluation script (a preset's eval_script): mixup-fashion-mnist-cpu's plan (Standard
AT, Mixup and IAT evaluated by test_mixup_inference.py), per-defense evaluation flags, the study table's rows per
(defense, predictor) aggregated over seeds, and a tiny study end to end."""
import csv
import io
import json
from pathlib import Path

import pytest

from tests.helpers import INVOCATION, assert_one_line_error, run_script
from tests.test_reproduce import run_study
from tests.test_reproduce_seed_talk import FMNIST_CPU_ARGV, fake_study, flag_value, flag_values, plan
from utils.errors import UserError
from utils.evaluators import EVALUATORS
from utils.pipeline import build_plan, check_command_lines
from utils.presets import PRESETS
from utils.study import comparison, comparison_csv, comparison_markdown, write_study

MIXUP = "mixup-fashion-mnist-cpu"
EVAL_FLAGS = ["--test-limit", "100", "--attacks", "oblivious", "eot-pgd", "aa-rand", "--modes", "ol", "pl",
              "--repeats", "3", "--pgd-steps", "10", "--eot-steps", "50", "--eot-step-size", "0.01", "--eot-samples", "1",
              "--aa-iterations", "10", "--aa-eot-iter", "1"]


def test_the_mixup_preset_plans_its_trainings_and_mixup_inference_evaluations():
    config, tasks = plan(MIXUP)
    assert config["defenses"] == ["standard-at", "mixup", "iat"] and config["seeds"] == [0, 1, 2]
    assert config["jobs"] == 2 and config["eval_script"] == "test_mixup_inference.py" and not config["epsilons"]
    assert list(tasks) == [f"seed{s}/{stage}" for s in (0, 1, 2) for stage in (
        "standard-at", "mixup", "iat", "eval-standard-at", "eval-mixup", "eval-iat")]
    for seed in (0, 1, 2):
        for defense, loss in (("standard-at", "at"), ("mixup", "mixup"), ("iat", "iat")):
            train = tasks[f"seed{seed}/{defense}"]
            assert train.script == "train_standard.py" and train.kind == "standard" and train.deps == []
            assert train.argv == ["--dataset", "fashion-mnist", "--train-limit", "10000", "--test-limit", "1000",
                                  "--epochs", "10", "--grad-clip", "10", "--loss", loss, "--seed", str(seed),
                                  "--model-dir", f"study/seed{seed}/{defense}", "--device", "cpu", "--data-dir", "data"]
            evaluation = tasks[f"seed{seed}/eval-{defense}"]
            assert evaluation.script == "test_mixup_inference.py" and evaluation.kind == "eval"
            assert evaluation.deps == [f"seed{seed}/{defense}"]
            assert evaluation.inputs == [Path(f"study/seed{seed}/{defense}/best.pt")]
            lam = ["--mixup-lambda", "0.6"] if defense == "iat" else []  # the authors' lambda for OL on IAT models
            assert evaluation.argv == EVAL_FLAGS + lam + [
                "--checkpoints", f"study/seed{seed}/{defense}/best.pt", "--labels", config_label(defense),
                "--seed", str(seed), "--out-dir", f"study/seed{seed}/eval-{defense}", "--device", "cpu",
                "--data-dir", "data"]
    # Standard AT trains exactly as in fashion-mnist-cpu (the same flags, another folder)
    assert tasks["seed1/standard-at"].argv == FMNIST_CPU_ARGV["seed1/standard-at"]
    check_command_lines(list(tasks.values()))  # every command line parses with its script's parser


def config_label(defense):
    return {"standard-at": "Standard AT", "mixup": "Mixup", "iat": "IAT"}[defense]


def test_tensorboard_reaches_the_trainings_not_an_evaluation_script_without_it():
    def planned(preset):
        return {task.name: task for task in build_plan(plan(preset)[0], Path("study"), "cpu", "data", tensorboard=True)}
    tasks = planned(MIXUP)
    assert "--tensorboard" in tasks["seed0/mixup"].argv and "--tensorboard" not in tasks["seed0/eval-mixup"].argv
    check_command_lines(list(tasks.values()))
    assert planned("fashion-mnist-cpu")["seed0/eval-namid"].argv[-1] == "--tensorboard"  # test_comparison.py has it


def test_set_on_the_eval_section_is_checked_against_the_chosen_script():
    _, tasks = plan(MIXUP, ["eval.eot-steps=3", "eval.modes=combined", "eval.mixup-lambda=0.7"], seeds=[0])
    for defense in ("standard-at", "mixup", "iat"):
        argv = tasks[f"seed0/eval-{defense}"].argv
        assert flag_value(argv, "--eot-steps") == "3" and flag_values(argv, "--modes") == ["combined"]
        # the preset's per-defense flags come after the section's, as a variant's do
        assert flag_value(argv, "--mixup-lambda") == ("0.6" if defense == "iat" else "0.7")
    for item, fragment in (("eval.pgd-l2-steps=3", "test_mixup_inference.py has no --pgd-l2-steps"),
                           ("eval.labels=x", "the runner sets --labels itself")):
        with pytest.raises(UserError, match=fragment):
            plan(MIXUP, [item])
    # test_comparison.py's presets still check against test_comparison.py
    with pytest.raises(UserError, match="test_comparison.py has no --eot-steps"):
        plan("fashion-mnist-cpu", ["eval.eot-steps=3"])
    with pytest.raises(UserError, match="curve runs test_comparison.py"):
        plan(MIXUP, epsilons=["0.1"])


def test_bad_eval_script_input_is_one_line():
    assert_one_line_error(run_script("reproduce.py", ["--preset", MIXUP, "--set", "eval.pgd-l2-steps=3", "--dry-run"]),
                          "test_mixup_inference.py has no --pgd-l2-steps")
    # a value the script's parser refuses: caught before any work, naming the stage and the script
    assert_one_line_error(run_script("reproduce.py", ["--preset", MIXUP, "--set", "eval.modes=xx", "--dry-run"]),
                          "seed0/eval-standard-at: test_mixup_inference.py: argument --modes: invalid choice")


@pytest.mark.parametrize("per_defense, fragment", [
    ({"nope": {"pgd-steps": 3}}, "unknown defense 'nope'"),
    ({"namid": {"eot-steps": 3}}, "test_comparison.py has no --eot-steps"),
    ({"namid": {"checkpoints": "x"}}, "the runner sets --checkpoints itself"),
])
def test_bad_eval_per_defense_is_refused(monkeypatch, per_defense, fragment):
    monkeypatch.setitem(PRESETS, "test-per-defense", {**PRESETS["fashion-mnist-cpu"], "eval_per_defense": per_defense})
    with pytest.raises(UserError, match=fragment):
        plan("test-per-defense")


def test_eval_per_defense_lands_in_that_defenses_evaluations_only(monkeypatch):
    monkeypatch.setitem(PRESETS, "test-per-defense", {**PRESETS["adp-mnist-cpu"], "eval_per_defense": {
        "adp": {"restarts": 2, "epsilon": "0.2"}}})
    _, tasks = plan("test-per-defense", seeds=[0])
    for variant in ("eps0.1", "eps0.15"):
        adp, ensemble = tasks[f"seed0/eval-adp-{variant}"].argv, tasks[f"seed0/eval-ensemble-{variant}"].argv
        assert flag_value(adp, "--restarts") == "2" and flag_value(ensemble, "--restarts") == "5"
        assert flag_value(adp, "--epsilon") == "0.2"  # over the variant's own
        assert flag_value(ensemble, "--epsilon") == variant[3:]
    assert all("--restarts" not in task.argv for task in tasks.values() if task.kind == "standard")


def test_an_unknown_eval_script_is_refused(monkeypatch):
    monkeypatch.setitem(PRESETS, "test-script", {**PRESETS[MIXUP], "eval_script": "test_nothing.py"})
    with pytest.raises(UserError, match="eval_script 'test_nothing.py': choose one of"):
        plan("test-script")
    assert set(EVALUATORS) >= {"test_comparison.py", "test_mixup_inference.py"}


# ----------------------------------------------------------------------------------------------
# The study's table: a row per (defense, predictor), mean +- std across seeds of each seed's mean over repeats


def fake_mixup_results(path: Path, clean: float, repeats_ol: list, images: int = 100):
    """A test_mixup_inference.py results.json: the base model's row and OL / PL rows ({metric: summary})."""
    def summary(values):
        return {"values": values, "mean": sum(values) / len(values), "std": 0.0, "repeats": len(values)}
    keys = ["clean", "oblivious", "worst"]
    rows = [{"label": "base model", "mode": None, "metrics": {k: summary([clean - 0.1 * i]) for i, k in enumerate(keys)}},
            {"label": "mixup inference (ol)", "mode": "ol",
             "metrics": {k: summary([v - 0.1 * i for v in repeats_ol]) for i, k in enumerate(keys)}},
            {"label": "mixup inference (pl)", "mode": "pl",
             "metrics": {k: summary([0.5] * len(repeats_ol)) for k in keys}}]
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({
        "columns": [{"key": "clean", "header": "Clean"}, {"key": "oblivious", "header": "Oblivious PGD-10"},
                    {"key": "worst", "header": "Worst case"}],
        "test_images": images, "models": [{"label": "x", "rows": rows}]}))


def test_the_table_has_a_row_per_defense_and_predictor_averaged_over_seeds(tmp_path):
    config, tasks = plan(MIXUP, seeds=[0, 1], out=tmp_path)

    def evaluate(task):
        offset = {"standard-at": 0.0, "mixup": 0.01, "iat": 0.02}[task.defense] + task.seed / 10
        fake_mixup_results(task.run_dir, 0.8 + offset, [0.6 + offset, 0.7 + offset, 0.8 + offset])
    fake_study(tasks, evaluate)
    table = comparison(config, list(tasks.values()))
    assert [row["label"] for row in table["rows"]] == [
        f"{label}{suffix}" for label in ("Standard AT", "Mixup", "IAT")
        for suffix in ("", " + mixup inference (OL)", " + mixup inference (PL)")]
    assert [row["key"] for row in table["rows"][3:6]] == ["mixup", "mixup/mi-ol", "mixup/mi-pl"]
    assert table["columns"] == [("clean", "Clean"), ("oblivious", "Oblivious PGD-10"), ("worst", "Worst case")]
    ol = table["cells"]["mixup/mi-ol"]
    # per seed the mean over its 3 repeats (0.71, 0.81), then mean and sample std across the seeds
    assert ol["clean"]["values"] == pytest.approx([0.71, 0.81]) and ol["clean"]["mean"] == pytest.approx(0.76)
    assert ol["clean"]["std"] == pytest.approx(0.0707107, rel=1e-5) and ol["clean"]["n"] == 2
    assert ol["worst"]["values"] == pytest.approx([0.51, 0.61])
    assert table["cells"]["iat"]["oblivious"]["values"] == pytest.approx([0.72, 0.82])  # the base model's row
    markdown = comparison_markdown(config, table).splitlines()
    assert markdown[0] == "| Defense | Clean | Oblivious PGD-10 | Worst case |"
    assert "| Mixup + mixup inference (OL) | 76.00 ± 7.07 | 66.00 ± 7.07 | 56.00 ± 7.07 |" in markdown
    rows = list(csv.DictReader(io.StringIO(comparison_csv(config, table))))
    assert len(rows) == 9 * 3 and {r["defense"] for r in rows if r["label"].startswith("IAT")} == {"iat"}
    write_study(config, list(tasks.values()), tmp_path, {}, INVOCATION)
    text = (tmp_path / "results.md").read_text()
    assert "within-seed standard deviation is in each evaluation's results" in text
    assert "not available offline" in text and "The paper's Table 1" not in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert [row["predictor"] for row in results["rows"][:3]] == [None, "mi-ol", "mi-pl"]


# ----------------------------------------------------------------------------------------------
# A tiny mixup-fashion-mnist-cpu end to end


def tiny_mixup_args(out, data_dir, *extra):
    return ["--preset", MIXUP, "--defenses", "mixup", "iat", "--seeds", "0", "1", "--jobs", "1", "--out", str(out),
            "--data-dir", str(data_dir), "--device", "cpu",
            "--set", "train-limit=300", "val-size=100", "standard.test-limit=50", "train.epochs=1",
            "standard.eval-steps=2", "standard.num-steps=2", "standard.warmup-epochs=0", "eval.test-limit=20",
            "eval.repeats=2", "eval.partners=3", "eval.pgd-steps=1", "eval.eot-steps=1", "eval.aa-iterations=1",
            *extra]


def test_a_tiny_mixup_study_end_to_end(fmnist_dir, tmp_path):
    out = tmp_path / "mixup"
    result = run_study(tiny_mixup_args(out, fmnist_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [c["key"] for c in results["columns"]] == ["clean", "oblivious", "eot-pgd", "aa-rand", "worst"]
    labels = [row["label"] for row in results["rows"]]
    assert labels == ["Mixup", "Mixup + mixup inference (OL)", "Mixup + mixup inference (PL)",
                      "IAT", "IAT + mixup inference (OL)", "IAT + mixup inference (PL)"]
    for seed in (0, 1):
        evaluation = json.loads((out / f"seed{seed}" / "eval-iat" / "results.json").read_text())
        assert evaluation["args"]["mixup_lambda"] == 0.6 and evaluation["repeats"] == 2
        ol = evaluation["models"][0]["rows"][1]
        assert ol["mode"] == "ol" and len(ol["metrics"]["worst"]["values"]) == 2
        assert results["cells"]["iat/mi-ol"]["worst"]["values"][seed] == pytest.approx(ol["metrics"]["worst"]["mean"])
    assert json.loads((out / "seed0" / "eval-mixup" / "results.json").read_text())["args"]["mixup_lambda"] == 0.5
    for key, cells in results["cells"].items():
        assert set(cells) == {"clean", "oblivious", "eot-pgd", "aa-rand", "worst"}, key
        assert all(stats["n"] == 2 and 0 <= stats["mean"] <= 1 for stats in cells.values()), key
    markdown = (out / "results.md").read_text()
    assert markdown.startswith(f"# {MIXUP}: robust accuracy (%) on fashion-mnist, mean ± std over 2 seeds (seeds 0, 1)"
                               ", 20 test images per seed")
    assert "| IAT + mixup inference (OL) |" in markdown and "| Mixup |" in markdown
    assert "| IAT + mixup inference (PL) |" in result.stdout  # the table is printed
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert {r["label"] for r in rows} == set(labels) and len(rows) == 6 * 5


def test_help_and_docstring_list_the_mixup_preset_and_defenses(monkeypatch):
    import reproduce
    monkeypatch.setenv("COLUMNS", "1000")
    text = reproduce.build_parser().format_help()
    for name in (MIXUP, "mixup", "iat"):
        assert name in text and name in reproduce.__doc__, name
