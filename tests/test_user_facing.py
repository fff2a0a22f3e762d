"""What a new user meets: warnings (printed when raised, kept in the run folder, gathered by the study with
their stage), run folders accepted wherever a checkpoint file is expected, and --help showing defaults."""
import json

import pytest

from utils.pipeline import Task
from utils.run_warnings import WARNINGS_FILE, RunWarnings, read_warnings
from utils.study import stage_warnings


def test_warnings_are_printed_and_kept_once_in_the_run_folder(tmp_path, capsys):
    warnings = RunWarnings()
    warnings.warn("raised before the folder exists")
    assert "warning: raised before the folder exists" in capsys.readouterr().err
    warnings.keep_in(tmp_path)
    warnings.warn("second")
    warnings.warn("second")
    assert read_warnings(tmp_path) == ["raised before the folder exists", "second"]
    assert capsys.readouterr().err.count("warning: second") == 2  # printed each time, kept once


def test_a_resumed_run_adds_to_its_warnings_and_a_fresh_evaluation_replaces_them(tmp_path):
    first = RunWarnings()
    first.keep_in(tmp_path)
    first.warn("epoch 1: old")
    resumed = RunWarnings()
    resumed.warn("raised early")
    resumed.keep_in(tmp_path)
    resumed.warn("epoch 2: new")
    assert read_warnings(tmp_path) == ["epoch 1: old", "raised early", "epoch 2: new"]
    evaluation = RunWarnings()
    evaluation.keep_in(tmp_path, fresh=True)
    assert read_warnings(tmp_path) == []


def test_no_warning_writes_no_file_and_a_broken_file_is_reported(tmp_path):
    RunWarnings().keep_in(tmp_path)
    assert not (tmp_path / WARNINGS_FILE).exists() and read_warnings(tmp_path) == []
    (tmp_path / WARNINGS_FILE).write_text("{not json")
    assert "unreadable" in read_warnings(tmp_path)[0]


def test_the_study_gathers_every_stages_warnings_in_plan_order(tmp_path):
    tasks = [Task(name, kind, "x.py", [], tmp_path / name.replace("/", "_"), 0)
             for name, kind in (("seed0/standard-at", "standard"), ("seed0/estimators", "estimators"),
                                ("seed0/eval-namid", "eval"))]
    for task in tasks:
        task.run_dir.mkdir()
    (tasks[1].run_dir / WARNINGS_FILE).write_text(json.dumps({"warnings": ["below a constant critic", "no X'"]}))
    (tasks[2].run_dir / WARNINGS_FILE).write_text(json.dumps({"warnings": ["NAMID: the attack is failing"]}))
    assert stage_warnings(tasks) == [{"stage": "seed0/estimators", "message": "below a constant critic"},
                                     {"stage": "seed0/estimators", "message": "no X'"},
                                     {"stage": "seed0/eval-namid", "message": "NAMID: the attack is failing"}]


# ---------------------------------------------------------------------------------------------------------
# A run folder wherever a checkpoint file is expected

def test_a_run_folder_stands_for_its_checkpoint(tiny_target, tiny_estimators, fmnist_dir, tmp_path):
    import subprocess
    import sys
    from tests.conftest import REPO
    from tests.helpers import assert_one_line_error, run_script
    folder = str(tiny_target.parent)
    result = run_script("test_comparison.py", ["--checkpoints", folder, "--surrogate", folder, "--attacks", "pgd", "transfer",
                                               "--pgd-steps", "1", "--test-limit", "10", "--data-dir", str(fmnist_dir),
                                               "--device", "cpu", "--out-dir", str(tmp_path / "eval")])
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"test_comparison.py: {folder} is a run folder: using its best.pt" in result.stderr
    record = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert record["models"][0]["checkpoint"] == str(tiny_target) and record["surrogate"]["checkpoint"] == str(tiny_target)
    # stage 2 (--target-model) and stage 3 (--estimators) take run folders too; a folder without one is one line
    run = tiny_estimators.parent
    result = run_script("train_MI_estimator.py", ["--target-model", folder, "--model-dir", str(run), "--report-only",
                                                  "--data-dir", str(fmnist_dir), "--train-limit", "200", "--val-size", "100",
                                                  "--test-limit", "100", "--device", "cpu", "--num-steps", "2"])
    assert result.returncode == 0 and "is a run folder: using its best.pt" in result.stderr, result.stderr[-2000:]
    assert_one_line_error(run_script("train_MIAT.py", ["--estimators", folder, "--device", "cpu"]),
                          f"{folder} is a folder without estimators.pt")
    result = subprocess.run([sys.executable, str(REPO / "train_MIAT.py"), "--estimators", str(run), "--dataset", "mnist"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert f"{run} is a run folder: using its estimators.pt" in result.stderr
    assert "trained on fashion-mnist, not --dataset mnist" in result.stderr  # it read the estimators inside


# ---------------------------------------------------------------------------------------------------------
# --help

@pytest.mark.parametrize("script", ["train_standard", "train_MI_estimator", "train_MI_estimator_only_max", "train_MIAT",
                                    "test_comparison", "reproduce"])
def test_help_shows_every_options_effective_default(script):
    """Every option that takes a value says its default in --help (switches and required options aside)."""
    import importlib
    parser = importlib.import_module(script).build_parser()
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.required:
            continue
        if "default" not in formatter._format_action(action).lower():
            missing.append(action.option_strings[0])
    assert not missing, f"{script} --help shows no default for {missing}"


@pytest.mark.parametrize("script", ["train_standard.py", "train_MI_estimator.py", "train_MIAT.py", "test_comparison.py",
                                    "reproduce.py"])
def test_help_imports_nothing_heavy(script):
    """--help answers in about the time of `import torch`: torchvision, matplotlib and the attack libraries are
    imported where they are used (torchvision alone added 2-3 s)."""
    import subprocess
    import sys
    from tests.conftest import REPO
    result = subprocess.run([sys.executable, "-X", "importtime", str(REPO / script), "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    heavy = imported & {"torchvision", "matplotlib", "advertorch", "torchattacks", "pyautoattack", "autoattack", "scipy"}
    assert not heavy, f"{script} --help imports {sorted(heavy)}"
