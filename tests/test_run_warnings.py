"""Warnings: printed when raised, kept in the run folder, gathered by the study with their stage."""
import json

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
