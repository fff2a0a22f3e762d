"""Stage 4's per-batch journal and test_comparison.py --resume: an interrupted evaluation, continued, gives the
results of an uninterrupted one example for example without attacking the journalled batches again; a journal
made with other settings, or a run without --resume, never leaks into the results; a journal written by one
process is taken up by two; reproduce.py continues an interrupted evaluation stage with --resume."""
import dataclasses
import json
import re
import sys

import pytest
import torch
from torch import nn

import test_comparison
from tests.test_sharded_eval import evaluate_in_two_processes
from utils import pipeline
from utils.data import load_splits
from utils.eval_journal import JOURNAL_FOLDER
from utils.pipeline import MARKER, Task, build_plan, resolve_config, run_task, task_state
from utils.run_warnings import read_warnings

TIME_FIELDS = {"seconds", "resumed"}  # wall times, and (resumed runs only) the batches taken from the journal
ARGS = ["--test-limit", "40", "--batch-size", "10", "--attacks", "pgd", "pgd-l2", "--pgd-steps", "2",
        "--pgd-l2-steps", "2", "--epsilon", "0.002", "--epsilon-l2", "0.02", "--labels", "linear",
        "--device", "cpu"]  # 4 batches per attack; budgets small enough that some examples stay robust


@pytest.fixture
def linear_model(monkeypatch, tmp_path, fmnist_dir):
    """A nearest-centroid linear model (about 70% clean accuracy) standing for the checkpoint, a file so that the
    journal has its SHA-256."""
    splits = load_splits("fashion-mnist", fmnist_dir, val_size=0, train_limit=500, test_limit=10, seed=0)
    x = torch.stack([splits.train[i][0].flatten() for i in range(len(splits.train))])
    y = torch.tensor([int(splits.train[i][1]) for i in range(len(splits.train))])
    centroids = torch.stack([x[y == c].mean(dim=0) for c in range(10)])
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    with torch.no_grad():
        model[1].weight.copy_(centroids)
        model[1].bias.copy_(-0.5 * centroids.pow(2).sum(dim=1))
    spec = {"stage": "test", "config": {}, "epoch": 0, "model_spec": {"dataset": "fashion-mnist", "arch": "tiny"}}
    monkeypatch.setattr(test_comparison, "load_models",
                        lambda paths, device, channels_last=None: [(model, spec) for _ in paths])
    checkpoint = tmp_path / "m.pt"
    checkpoint.write_bytes(b"a stand-in checkpoint")
    return checkpoint


class Crafts(list):
    """The attacks' crafted batches, in order (an attack's name per batch)."""

    def __init__(self):
        super().__init__()
        self.stop = {}

    def interrupt(self, name, k):
        """Make the k-th batch that attack crafts raise KeyboardInterrupt (as ctrl-C or a preempted job), after
        k - 1 finished batches."""
        self.stop[name] = k

    def reset(self):
        self.clear()
        self.stop.clear()


@pytest.fixture
def crafts(monkeypatch):
    recorder, real = Crafts(), test_comparison.build_attacks

    def build(names, args, num_classes):
        def counted(attack):
            def craft(model, x, y, generator):
                recorder.append(attack.name)
                if recorder.stop.get(attack.name) == recorder.count(attack.name):
                    raise KeyboardInterrupt
                return attack.craft(model, x, y, generator)
            return dataclasses.replace(attack, craft=craft)
        return [counted(attack) for attack in real(names, args, num_classes)]

    monkeypatch.setattr(test_comparison, "build_attacks", build)
    return recorder


def evaluate(checkpoint, fmnist_dir, out_dir, *extra):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a torchrun process, so that results compare bit for bit
    try:
        return test_comparison.main(["--checkpoints", str(checkpoint), "--data-dir", str(fmnist_dir),
                                     "--out-dir", str(out_dir), *ARGS, *extra])
    finally:
        torch.set_num_threads(threads)


def interrupted(checkpoint, fmnist_dir, out_dir, crafts, name, k, *extra):
    crafts.reset()
    crafts.interrupt(name, k)
    with pytest.raises(KeyboardInterrupt):
        evaluate(checkpoint, fmnist_dir, out_dir, *extra)
    crafts.reset()


def without_time(value):
    if isinstance(value, dict):
        return {key: without_time(item) for key, item in value.items() if key not in TIME_FIELDS}
    if isinstance(value, list):
        return [without_time(item) for item in value]
    return value


def assert_same_results(reference_dir, other_dir):
    reference, other = (json.loads((folder / "results.json").read_text()) for folder in (reference_dir, other_dir))
    assert other["complete"] and reference["complete"]
    assert without_time(other["models"]) == without_time(reference["models"])
    for key in ("test_indices", "test_labels", "attacks", "columns", "warnings"):
        assert other[key] == reference[key], key
    assert (other_dir / "results.csv").read_text() == (reference_dir / "results.csv").read_text()
    seconds = re.compile(r"; [0-9.]+ s in all")
    assert seconds.sub("", (other_dir / "results.md").read_text()) == \
        seconds.sub("", (reference_dir / "results.md").read_text())
    return reference, other


@pytest.fixture
def reference(linear_model, fmnist_dir, tmp_path, crafts):
    """An uninterrupted run's folder."""
    assert evaluate(linear_model, fmnist_dir, tmp_path / "reference") == 0
    assert crafts == ["pgd"] * 4 + ["pgd-l2"] * 4
    assert not (tmp_path / "reference" / JOURNAL_FOLDER).exists()  # removed once complete
    crafts.reset()
    return tmp_path / "reference"


def test_a_resumed_evaluation_equals_an_uninterrupted_one_without_attacking_journalled_batches(
        linear_model, fmnist_dir, tmp_path, crafts, reference):
    out = tmp_path / "resumed"
    interrupted(linear_model, fmnist_dir, out, crafts, "pgd-l2", 3)  # pgd done, 2 batches of pgd-l2
    journal = out / JOURNAL_FOLDER / "0"
    assert sorted(path.name for path in journal.iterdir()) == ["pgd-l2.rank0.pt", "pgd.rank0.pt"]
    saved = torch.load(journal / "pgd-l2.rank0.pt", weights_only=True)  # plain types and tensors only
    assert [entry["index"] for entry in saved["batches"]] == [0, 1]
    assert not json.loads((out / "results.json").read_text())["complete"]

    assert evaluate(linear_model, fmnist_dir, out, "--resume") == 0
    assert crafts == ["pgd-l2"] * 2  # batches 2 and 3 of pgd-l2, nothing else
    first, resumed = assert_same_results(reference, out)
    assert resumed["journalled_batches"] == {"0/pgd": 4, "0/pgd-l2": 2} and first["journalled_batches"] == {}
    attacks = resumed["models"][0]["attacks"]
    assert attacks["pgd"]["resumed"]["journalled_batches"] == 4 and attacks["pgd-l2"]["resumed"]["journalled_batches"] == 2
    assert attacks["pgd"]["seconds"] > attacks["pgd"]["resumed"]["seconds_this_run"]  # journalled seconds count
    assert "resumed" not in first["models"][0]["attacks"]["pgd"]  # an uninterrupted run's records are as before
    for name in ("pgd", "pgd-l2"):  # the comparison says something: flags of both kinds
        assert "0" in attacks[name]["per_example"] and "1" in attacks[name]["per_example"], name
    assert not (out / JOURNAL_FOLDER).exists()


def test_a_journal_made_with_other_settings_is_not_used(linear_model, fmnist_dir, tmp_path, crafts, reference):
    out = tmp_path / "other"
    interrupted(linear_model, fmnist_dir, out, crafts, "pgd-l2", 3, "--pgd-steps", "3")  # other pgd settings
    assert evaluate(linear_model, fmnist_dir, out, "--resume") == 0
    assert crafts == ["pgd"] * 4 + ["pgd-l2"] * 2  # pgd redone whole; pgd-l2's journal matches
    assert_same_results(reference, out)
    warnings = read_warnings(out)
    assert len(warnings) == 1 and "other settings" in warnings[0] and "1 journal file(s)" in warnings[0]

    crafts.reset()  # another seed: every journal differs (attack seeds and test images)
    out = tmp_path / "seed"
    interrupted(linear_model, fmnist_dir, out, crafts, "pgd-l2", 3, "--seed", "1")
    assert evaluate(linear_model, fmnist_dir, out, "--resume") == 0
    assert crafts == ["pgd"] * 4 + ["pgd-l2"] * 4
    assert_same_results(reference, out)


def test_without_resume_the_journal_is_not_used(linear_model, fmnist_dir, tmp_path, crafts, reference):
    out = tmp_path / "fresh"
    interrupted(linear_model, fmnist_dir, out, crafts, "pgd", 3)
    assert (out / JOURNAL_FOLDER / "0" / "pgd.rank0.pt").is_file()
    assert evaluate(linear_model, fmnist_dir, out) == 0
    assert crafts == ["pgd"] * 4 + ["pgd-l2"] * 4
    assert_same_results(reference, out)
    assert json.loads((out / "results.json").read_text())["journalled_batches"] == {}


def test_a_journal_of_one_process_is_taken_up_by_two(tiny_target, fmnist_dir, tmp_path, crafts):
    args = ["--checkpoints", str(tiny_target), "--test-limit", "40", "--batch-size", "10", "--attacks", "pgd",
            "--pgd-steps", "2", "--data-dir", str(fmnist_dir), "--device", "cpu"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        assert test_comparison.main([*args, "--out-dir", str(tmp_path / "single")]) == 0
        crafts.reset()
        crafts.interrupt("pgd", 4)  # batches 0, 1 and 2 journalled by the one process (rank 0)
        with pytest.raises(KeyboardInterrupt):
            test_comparison.main([*args, "--out-dir", str(tmp_path / "sharded")])
    finally:
        torch.set_num_threads(threads)
    result = evaluate_in_two_processes(fmnist_dir, tmp_path / "sharded", *args[:-4], "--resume")
    assert "3 batches from the journal" in result.stdout + result.stderr  # rank 0's batches 0 and 2, rank 1's 1
    single, sharded = assert_same_results(tmp_path / "single", tmp_path / "sharded")
    assert sharded["processes"] == 2 and sharded["journalled_batches"] == {"0/pgd": 3}
    assert "0" in single["models"][0]["attacks"]["pgd"]["per_example"]
    assert not (tmp_path / "sharded" / JOURNAL_FOLDER).exists()


# ----------------------------------------------------------------------------------------------
# reproduce.py


def test_reproduce_continues_an_interrupted_evaluation_with_resume(tmp_path, monkeypatch):
    config = resolve_config("demo", [], {"seeds": None, "defenses": None, "jobs": None, "curve_steps": None,
                                         "epsilons": None, "namid_estimators": None})
    tasks = {task.name: task for task in build_plan(config, tmp_path / "study", "cpu", "data")}
    evaluation = next(task for task in tasks.values() if task.kind == "eval")
    curve = next(task for task in tasks.values() if task.kind == "curve")
    planned = list(evaluation.argv)
    assert task_state(evaluation) == "fresh" and "--resume" not in planned
    (evaluation.run_dir / JOURNAL_FOLDER / "0").mkdir(parents=True)  # what an interrupted run leaves
    (curve.run_dir / JOURNAL_FOLDER).mkdir(parents=True)
    assert task_state(evaluation) == "resume" and task_state(curve) == "resume"
    commands = []
    (tmp_path / "logs").mkdir()
    monkeypatch.setattr(pipeline.subprocess, "call", lambda command, **kwargs: commands.append(command) or 0)
    run_task(evaluation, task_state(evaluation), tmp_path / "logs", {})
    assert commands[-1][-1] == "--resume" and commands[-1][:-1] == evaluation.command
    assert evaluation.argv == planned  # the plan, and the completion record's argv, are unchanged
    assert json.loads((evaluation.run_dir / MARKER).read_text())["argv"] == planned
    # finished (test_comparison.py removes the journal): done; a finished evaluation re-run with other settings and
    # interrupted: continued again (the journal's fingerprint decides which batches are taken)
    (evaluation.run_dir / JOURNAL_FOLDER / "0").rmdir()
    (evaluation.run_dir / JOURNAL_FOLDER).rmdir()
    assert task_state(evaluation) == "done"
    marker = json.loads((evaluation.run_dir / MARKER).read_text())
    (evaluation.run_dir / MARKER).write_text(json.dumps({**marker, "argv": planned + ["--pgd-steps", "3"]}))
    assert task_state(evaluation) == "fresh"
    (evaluation.run_dir / JOURNAL_FOLDER).mkdir()
    assert task_state(evaluation) == "resume"
    # the other evaluation scripts keep journals too; one without (a registered script whose Evaluator says so)
    # has no --resume: its stage is redone
    for script in ("test_detection.py", "test_mixup_inference.py"):
        other = Task("seed0/eval-x", "eval", script, [], tmp_path / script, 0)
        (other.run_dir / JOURNAL_FOLDER).mkdir(parents=True)
        assert task_state(other) == "resume", script
    from utils.evaluators import EVALUATORS
    monkeypatch.setitem(EVALUATORS, "test_nothing.py", dataclasses.replace(EVALUATORS["test_comparison.py"],
                                                                          script="test_nothing.py", journal=False))
    other = Task("seed0/eval-y", "eval", "test_nothing.py", [], tmp_path / "y", 0)
    (other.run_dir / JOURNAL_FOLDER).mkdir(parents=True)
    assert task_state(other) == "fresh"
    assert sys.executable in commands[-1][0]
