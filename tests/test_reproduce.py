"""reproduce.py: preset resolution and overrides, the plan, and a tiny study end to end (skipping,
resumption after a kill, the table and the figures)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.helpers import assert_one_line_error, run_script
from utils.errors import UserError
from utils.pipeline import MARKER, build_plan, resolve_config
from utils.run_warnings import read_warnings
from utils.estimator_training import verdict_line
from utils.study import cell_stats, format_cell

RUNNER = {"seeds": None, "defenses": None, "jobs": None, "curve_steps": None, "epsilons": None, "namid_estimators": None}


def plan(overrides=(), **runner):
    config = resolve_config("demo", list(overrides), {**RUNNER, **runner})
    return config, {task.name: task for task in build_plan(config, REPO / "study", "cpu", "data")}


def flag_value(argv, flag):
    index = argv.index(flag)
    return argv[index + 1]


def test_preset_overrides_reach_the_stage_scripts():
    config, tasks = plan(["train.epochs=7", "namid.alpha=2", "eval.attacks=pgd aa", "lr=0.01",
                          "namid.no-adv-mi=true", "estimators.estimator-loss=paper"], seeds=[3],
                          namid_estimators="estimators")
    standard, namid = tasks["seed3/standard-at"].argv, tasks["seed3/namid"].argv
    estimators = tasks["seed3/estimators"].argv
    assert flag_value(standard, "--epochs") == "7" and flag_value(namid, "--epochs") == "7"
    assert flag_value(estimators, "--epochs") == "5"  # train.* leaves the estimator stages alone
    assert flag_value(namid, "--alpha") == "2" and "--alpha" not in standard
    assert "--no-adv-mi" in namid and "--no-adv-mi" not in tasks["seed3/standard-at"].argv
    # a plain FLAG=VALUE goes to every stage script that has the flag
    assert flag_value(standard, "--lr") == "0.01" and flag_value(estimators, "--lr") == "0.01"
    assert flag_value(estimators, "--estimator-loss") == "paper"
    evaluation = tasks["seed3/eval-namid"].argv
    assert evaluation[evaluation.index("--attacks") + 1:evaluation.index("--attacks") + 3] == ["pgd", "aa"]
    assert flag_value(standard, "--seed") == "3" and flag_value(standard, "--dataset") == "fashion-mnist"
    assert config["overrides"][1] == "namid.alpha=2"


def test_a_switch_set_false_is_passed_as_its_no_form_when_the_script_has_one():
    """--amp and --channels-last default to on with CUDA in stages 1 and 3: leaving the flag out would not
    turn them off."""
    _, tasks = plan(["train.amp=false", "standard.channels-last=true", "namid.allow-uninformative-estimators=false"])
    standard, namid = tasks["seed0/standard-at"].argv, tasks["seed0/namid"].argv
    assert "--no-amp" in standard and "--amp" not in standard and "--channels-last" in standard
    assert "--no-amp" in namid and not any("allow-uninformative" in token for token in namid)


def test_plan_wires_every_defense_to_its_inputs():
    _, tasks = plan()  # the demo's NAMID family reads the only-max estimators (utils/presets.py)
    for defense in ("namid", "namid-t", "namid-m", "wmim"):
        assert flag_value(tasks[f"seed0/{defense}"].argv, "--estimators").endswith("seed0/only-max/estimators.pt")
        assert "seed0/only-max" in tasks[f"seed0/{defense}"].deps
    assert flag_value(tasks["seed0/only-max"].argv, "--lr") == "0.001" and "seed0/estimators" not in tasks
    only_max = tasks["seed0/only-max"].argv  # the informative recipe: a constant lr (no milestone follows the flag)
    assert only_max[only_max.index("--milestones") + 1].startswith("--")
    _, wired = plan(namid_estimators="estimators")
    assert flag_value(wired["seed0/namid-t"].argv, "--estimators").endswith("seed0/estimators/estimators.pt")
    assert flag_value(wired["seed0/wmim"].argv, "--estimators").endswith("seed0/only-max/estimators.pt")
    assert flag_value(wired["seed0/estimators"].argv, "--estimator-loss") == "paper-bounded"
    assert flag_value(tasks["seed0/wmim"].argv, "--mi-mode") == "wmim"
    assert flag_value(tasks["seed0/only-max"].argv, "--target-model").endswith("seed0/standard-at/best.pt")
    assert flag_value(tasks["seed0/mart"].argv, "--loss") == "mart"
    curve = tasks["seed0/curve-eps0.1"].argv
    assert flag_value(curve, "--epsilon") == "0.1" and flag_value(curve, "--attacks") == "pgd"
    assert len(tasks) == 7 + 1 + 7 + 4  # trainings, estimators, evaluations, curve points
    # without NAMID-family defenses there are no estimators, but NAMID alone still needs Standard AT's target
    _, tasks = plan(defenses=["namid"])
    assert sorted(tasks) == ["seed0/curve-eps0.05", "seed0/curve-eps0.1", "seed0/curve-eps0.15", "seed0/curve-eps0.2",
                             "seed0/eval-namid", "seed0/namid", "seed0/only-max", "seed0/standard-at"]


def test_transfer_adds_a_surrogate_trained_like_the_baselines():
    _, tasks = plan(["surrogate.arch=vgg19", "eval.attacks=pgd transfer", "standard.lr=0.02"])
    surrogate = tasks["seed0/surrogate"].argv
    assert flag_value(surrogate, "--arch") == "vgg19" and flag_value(surrogate, "--loss") == "at"
    assert flag_value(surrogate, "--lr") == "0.02" and flag_value(surrogate, "--grad-clip") == "10"
    evaluation = tasks["seed0/eval-wmim"]
    assert flag_value(evaluation.argv, "--surrogate").endswith("seed0/surrogate/best.pt")
    assert "seed0/surrogate" in evaluation.deps
    _, tasks = plan()
    assert "seed0/surrogate" not in tasks  # no transfer attack, no surrogate


@pytest.mark.parametrize("overrides, runner, fragment", [
    (["nosuchflag=1"], {}, "no stage script has --nosuchflag"),
    (["namid.epsilon"], {}, "expected FLAG=VALUE"),
    (["seed=4"], {}, "the runner sets --seed itself"),
    (["model-dir=x"], {}, "the runner sets --model-dir"),
    (["nosection.epochs=3"], {}, "no section 'nosection'"),
    (["eval.alpha=3"], {}, "test_comparison.py has no --alpha"),
    (["namid.no-adv-mi=maybe"], {}, "expected true or false"),
    (["eval.attacks=pgd transfer"], {}, "the transfer attack needs a surrogate"),
    ([], {"defenses": ["fgsm-at"]}, "unknown defense 'fgsm-at'"),
    ([], {"namid_estimators": "paper"}, "--namid-estimators: choose one of estimators, only-max"),
])
def test_bad_configurations_are_refused(overrides, runner, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        plan(overrides, **runner)


def test_bad_input_is_one_line_on_stderr():
    assert_one_line_error(run_script("reproduce.py", ["--preset", "nope"]), "invalid choice")
    assert_one_line_error(run_script("reproduce.py", ["--preset", "demo", "--set", "eval.alpha=1"]), "has no --alpha")
    # every planned command line is parsed before any work starts
    assert_one_line_error(run_script("reproduce.py", ["--preset", "demo", "--set", "lr=fast", "--dry-run"]),
                          "seed0/standard-at: train_standard.py: argument --lr: 'fast' is not a number")


def test_a_failing_stage_stops_the_study_with_its_reason(tmp_path, fmnist_dir):
    result = run_study(tiny_study_args(tmp_path / "study", fmnist_dir, "standard.epsilon=2"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("reproduce.py: error: seed0/standard-at failed (exit status 2): ") and "--epsilon 2" in last
    assert "seed0/namid" not in result.stderr  # nothing downstream started
    assert (tmp_path / "study" / "logs" / "seed0_standard-at.log").is_file()


def test_cells_are_mean_and_sample_std():
    stats = cell_stats([0.5, 0.7, 0.6])
    assert stats["mean"] == pytest.approx(0.6) and stats["std"] == pytest.approx(0.1)  # sqrt(0.02 / 2)
    assert format_cell(stats) == "60.00 ± 10.00"
    assert format_cell(cell_stats([0.25])) == "25.00"


# ----------------------------------------------------------------------------------------------
# A tiny study end to end: two defenses, one seed, a few hundred images


def tiny_study_args(out, data_dir, *extra):
    return ["--preset", "demo", "--defenses", "standard-at", "namid", "--seeds", "0", "--jobs", "1",
            "--epsilons", "0.05", "0.1", "--curve-steps", "3", "--out", str(out), "--data-dir", str(data_dir),
            "--device", "cpu", "--tensorboard", "--set", "train-limit=300", "val-size=100", "test-limit=100", "train.epochs=3",
            "train.eval-steps=3", "train.warmup-epochs=0", "mi.epochs=1", "eval.pgd-steps=5", "eval.pgd-l2-steps=5",
            "namid.allow-uninformative-estimators=true",  # 1 epoch on 300 images measures little
            *extra]


def run_study(args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "reproduce.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def tiny_study(fmnist_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "tiny"
    result = run_study(tiny_study_args(out, fmnist_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_tiny_study_writes_the_table_and_every_figure(tiny_study):
    out, result = tiny_study
    results = json.loads((out / "results.json").read_text())
    assert [c["header"] for c in results["columns"]] == ["None", "PGD-5", "Worst L-inf", "PGD-5 (L2)", "Worst L2"]
    for defense in ("standard-at", "namid"):
        cells = results["cells"][defense]
        assert set(cells) == {"clean", "pgd", "worst_linf", "pgd-l2", "worst_l2"}
        for stats in cells.values():
            assert stats["n"] == 1 and 0 <= stats["mean"] <= 1
        # the table's numbers are the evaluation's own
        evaluation = json.loads((out / "seed0" / f"eval-{defense}" / "results.json").read_text())
        assert cells["pgd"]["mean"] == evaluation["models"][0]["attacks"]["pgd"]["accuracy"]
        assert cells["clean"]["mean"] >= cells["worst_linf"]["mean"]
    table = (out / "results.md").read_text()
    assert "| Standard AT |" in table and "| NAMID |" in table and "Seed 0: each seed" in table
    assert "| Standard AT |" in result.stdout  # the table is printed
    for name in ("training_curves.png", "mi_distributions.png", "robust_vs_epsilon.png"):
        data = (out / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    curve = results["robust_vs_epsilon"]
    assert curve["epsilons"] == [0.0, 0.05, 0.1]
    standard = curve["accuracy"]["Standard AT"][0]
    assert standard[0] == results["cells"]["standard-at"]["clean"]["mean"]  # epsilon 0 is clean accuracy
    assert len(results["training_curves"]["NAMID"]["clean"][0]) == 3  # one point per epoch
    config = json.loads((out / "config.json").read_text())
    assert config["namid"]["epochs"] == "3" and config["preset"] == "demo"
    # every stage's warnings, with the stage that raised them, in results.json, results.md and the closing summary
    kept = [{"stage": f"seed0/{folder.name}", "message": message} for folder in (out / "seed0").iterdir()
            for message in read_warnings(folder)]
    by_stage = lambda warnings: sorted(warnings, key=lambda w: (w["stage"], w["message"]))  # noqa: E731
    assert by_stage(kept) == by_stage(results["warnings"])
    verdict = json.loads((out / "seed0" / "only-max" / "mi_report.json").read_text())["informativeness"]
    assert verdict_line(verdict) in (out / "results.md").read_text()  # every estimator run's verdict, in results.md
    markdown = (out / "results.md").read_text()
    summary = result.stdout[result.stdout.index("warning(s) from the stages"):]
    for warning in kept:
        assert f"- `{warning['stage']}`: {warning['message']}" in markdown
        assert f"  {warning['stage']}: {warning['message']}" in summary
    assert markdown.startswith("# demo: robust accuracy (%) on fashion-mnist, a single run (seed 0; no spread across "
                               "seeds), 100 test images per seed")
    assert result.stdout.startswith("demo: robust accuracy (%)")
    # the code behind every stage: one commit here, named in results.md
    from utils.runtime import git_commit
    assert len(results["stage_commits"]) == 7 and all(made_by == [git_commit()] for made_by in results["stage_commits"].values())
    assert f"Code: every stage ran at commit {git_commit()}." in markdown
    # NAMID against Standard AT on the same images: the per-example difference is the table's difference
    [pair] = results["paired"]
    assert (pair["defense"], pair["baseline"]) == ("namid", "standard-at") and set(pair["columns"]) == set(
        results["cells"]["namid"])
    for column, summary in pair["columns"].items():
        cells = results["cells"]
        assert summary["seeds"]["0"]["difference"] == pytest.approx(
            cells["namid"][column]["mean"] - cells["standard-at"][column]["mean"], abs=1e-6), column
    assert "| NAMID − Standard AT | None | PGD-5 | Worst L-inf | PGD-5 (L2) | Worst L2 |" in markdown
    assert "| NAMID − Standard AT | None | PGD-5 | Worst L-inf | PGD-5 (L2) | Worst L2 |" in result.stdout
    for stage in ("standard-at", "only-max", "namid", "eval-namid", "curve-eps0.05"):
        assert (out / "seed0" / stage / MARKER).is_file(), stage
        events = list((out / "seed0" / stage / "tensorboard").rglob("events.out.tfevents*"))
        assert events and all(path.stat().st_size > 0 for path in events), stage  # --tensorboard reached every stage


def test_rerun_skips_completed_stages(tiny_study, fmnist_dir):
    out, _ = tiny_study
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.suffix in (".pt", ".json") and p.parent != out}
    invocation = json.loads((out / "results.json").read_text())["invocation"]
    result = run_study(tiny_study_args(out, fmnist_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("complete, skipped") == 7 and "running" not in result.stderr
    after = {p: p.stat().st_mtime_ns for p in before}
    assert before == after
    # the invocation that did the work stays on record (not the re-run's few seconds)
    assert json.loads((out / "results.json").read_text())["invocation"] == invocation and invocation["seconds"] > 20


def test_changed_settings_never_overwrite_a_finished_stage(tiny_study, fmnist_dir):
    out, _ = tiny_study
    digest = (out / "seed0" / "namid" / "best.pt").read_bytes()
    result = run_study(tiny_study_args(out, fmnist_dir, "namid.alpha=2"))
    assert_one_line_error(result, "holds a finished run made with other settings (--alpha)")
    assert (out / "seed0" / "namid" / "best.pt").read_bytes() == digest


def test_a_killed_stage_resumes_and_the_table_equals_an_uninterrupted_run(tiny_study, fmnist_dir, tmp_path):
    reference, _ = tiny_study
    out = tmp_path / "interrupted"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "reproduce.py"), *tiny_study_args(out, fmnist_dir)], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    last = out / "seed0" / "namid" / "last.pt"
    deadline = time.time() + 400
    while not last.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # the runner and its stage, mid-way through NAMID's epochs
    process.wait()
    assert last.exists() and not (out / "seed0" / "namid" / MARKER).exists()
    result = run_study(tiny_study_args(out, fmnist_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "seed0/namid: resuming" in result.stderr and "seed0/standard-at: complete, skipped" in result.stderr
    first, second = (json.loads((folder / "results.json").read_text()) for folder in (reference, out))
    assert second["cells"] == first["cells"]
    assert second["robust_vs_epsilon"] == first["robust_vs_epsilon"]
    [resume] = json.loads((out / "seed0" / "namid" / "config.json").read_text())["resumes"]
    assert second["stage_commits"]["seed0/namid"] == [resume["git_commit"]]  # the same commit started and resumed it


def test_a_study_run_by_several_commits_names_the_stages_of_each(tmp_path):
    from utils.study import commits_line, stage_commits
    from tests.test_reproduce_seed_talk import plan
    _, tasks = plan("fashion-mnist-cpu", seeds=[0], out=tmp_path)
    for name, record in {"seed0/standard-at": {"git_commit": "aaa"},
                         "seed0/namid": {"git_commit": "aaa", "resumes": [{"after_epoch": 3, "git_commit": "bbb"}]}}.items():
        tasks[name].run_dir.mkdir(parents=True)
        (tasks[name].run_dir / "config.json").write_text(json.dumps(record))
    (tasks["seed0/eval-namid"].run_dir).mkdir(parents=True)
    (tasks["seed0/eval-namid"].run_dir / "results.json").write_text(json.dumps({"git_commit": "bbb"}))
    commits = stage_commits(list(tasks.values()))
    assert commits["seed0/namid"] == ["aaa", "bbb"] and commits["seed0/eval-namid"] == ["bbb"]
    assert commits["seed0/trades"] == []  # not run yet
    assert commits_line(commits) == ("Code: stages ran at several commits: aaa ran seed0/standard-at, seed0/namid; "
                                     "bbb ran seed0/namid, seed0/eval-namid.")
    assert commits_line({"seed0/x": ["aaa"], "seed0/y": ["aaa"]}) == "Code: every stage ran at commit aaa."


def finish_stage(task, files: dict, **record):
    """A finished stage as the runner leaves it: its files, then its completion record."""
    from utils.pipeline import input_hashes
    task.run_dir.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (task.run_dir / name).write_bytes(data)
    (task.run_dir / MARKER).write_text(json.dumps({"argv": task.argv, "inputs": input_hashes(task), "seconds": 7,
                                                   **record}))


def test_reuse_copies_exactly_the_stages_finished_elsewhere_with_the_same_command_and_inputs(tmp_path):
    from utils.pipeline import reuse_finished_stages, task_state
    config = resolve_config("demo", [], RUNNER)
    source, out = tmp_path / "first", tmp_path / "second"
    theirs = {task.name: task for task in build_plan(config, source, "cpu", "data")}
    ours = {task.name: task for task in build_plan(config, out, "cpu", "data")}
    finish_stage(theirs["seed0/standard-at"], {"best.pt": b"standard", "config.json": b"{}"})
    finish_stage(theirs["seed0/only-max"], {"estimators.pt": b"estimators"})  # reads standard-at's best.pt
    finish_stage(theirs["seed0/namid"], {"best.pt": b"namid"}, inputs={"elsewhere": "0" * 64})  # other inputs
    trades = theirs["seed0/trades"]
    finish_stage(trades, {"best.pt": b"trades"}, argv=trades.argv[:-2] + ["--epochs", "99"])  # other settings
    finish_stage(theirs["seed0/mart"], {"best.pt": b"mart"})
    finish_stage(ours["seed0/mart"], {"last.pt": b"begun here"})
    (ours["seed0/mart"].run_dir / MARKER).unlink()
    (source / "logs").mkdir()
    (source / "logs" / "seed0_standard-at.log").write_text("epoch 1\n")
    tasks = list(ours.values())
    expected = {"seed0/standard-at": str(source / "seed0" / "standard-at"),
                "seed0/only-max": str(source / "seed0" / "only-max")}
    assert reuse_finished_stages(tasks, out, [source], dry_run=True) == expected
    assert not (out / "seed0" / "standard-at").exists()  # a dry run copies nothing
    assert reuse_finished_stages(tasks, out, [tmp_path / "missing", source]) == expected
    for name in expected:
        assert task_state(ours[name]) == "done"  # what the runner then skips
        record = json.loads((ours[name].run_dir / MARKER).read_text())
        assert record["argv"] == ours[name].argv and record["seconds"] == 7
        assert record["copied_from"] == str((source / name).resolve())
    assert (out / "seed0" / "only-max" / "estimators.pt").read_bytes() == b"estimators"
    assert (out / "logs" / "seed0_standard-at.log").read_text() == "epoch 1\n"
    assert not (out / "seed0" / "namid").exists() and not (out / "seed0" / "trades").exists()
    assert (out / "seed0" / "mart" / "last.pt").read_bytes() == b"begun here"  # never overwritten
    assert not list(out.rglob("*.copying"))
    from utils.study import copied_line, copied_stages
    assert copied_stages(tasks) == {name: str((source / name).resolve()) for name in expected}
    assert copied_line(copied_stages(tasks))[0].startswith(
        "Stages copied from earlier study folders (reproduce.py --reuse; same command line and inputs): seed0/standard-at")


def test_a_dry_run_of_one_stage_prints_the_plan_and_copies_nothing(tmp_path):
    result = run_study(["--preset", "demo", "--out", str(tmp_path / "study"), "--only-stage", "seed0/standard-at",
                        "--dry-run", "--device", "cpu", "--reuse", str(tmp_path)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[fresh] seed0/standard-at:" in result.stdout and not (tmp_path / "study").exists()


def test_a_study_reusing_another_runs_nothing_that_was_finished_there(tiny_study, fmnist_dir, tmp_path):
    reference, _ = tiny_study
    out = tmp_path / "second"
    source = os.path.relpath(reference, REPO)  # as the source's own command lines did not write it
    result = run_study(tiny_study_args(out, fmnist_dir, "--defenses", "standard-at", "--epsilons", "--reuse", source))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "running" not in result.stderr
    assert "seed0/eval-standard-at: copied from" in result.stderr
    first, second = (json.loads((folder / "results.json").read_text()) for folder in (reference, out))
    assert second["cells"]["standard-at"] == first["cells"]["standard-at"]
    assert set(second["copied_stages"]) == {"seed0/standard-at", "seed0/eval-standard-at"}
    assert "Stages copied from earlier study folders" in (out / "results.md").read_text()
    result = run_study(["--preset", "demo", "--out", str(tmp_path / "x"), "--reuse", str(tmp_path / "none")])
    assert_one_line_error(result, "--reuse")


def test_a_table_over_a_subset_leaves_the_studys_config_alone(tiny_study, fmnist_dir):
    out, _ = tiny_study
    kept = {name: (out / name).read_bytes() for name in ("config.json", "results.json", "results.md", "results.csv")}
    try:
        result = run_study(tiny_study_args(out, fmnist_dir, "--defenses", "standard-at", "--epsilons",
                                           "--only-stage", "results"))
        assert result.returncode == 0, result.stderr[-2000:]
        assert "running" not in result.stderr
        assert (out / "config.json").read_bytes() == kept["config.json"]  # still the whole study's
        table = json.loads((out / "results.json").read_text())
        assert table["config"]["defenses"] == ["standard-at"] and set(table["cells"]) == {"standard-at"}
        command = table["invocation"]["command"]  # this table's command, not the study's earlier one
        assert command.endswith("--defenses standard-at --epsilons") and "--only-stage" not in command
        assert f"Command: `{command}`" in (out / "results.md").read_text()
    finally:
        for name, data in kept.items():
            (out / name).write_bytes(data)


def test_the_curve_uses_the_tables_pgd_and_names_budgets_as_written():
    _, tasks = plan()  # demo: the table's PGD-20
    assert flag_value(tasks["seed0/curve-eps0.1"].argv, "--pgd-steps") == "20"
    _, tasks = plan(["eval.pgd-steps=7"], epsilons=["2/255", "0.1"])
    curve = tasks["seed0/curve-eps2-255"].argv
    assert flag_value(curve, "--pgd-steps") == "7" and flag_value(curve, "--epsilon") == "2/255"
    assert "seed0/curve-eps0.1" in tasks
    _, tasks = plan(curve_steps=3)
    assert flag_value(tasks["seed0/curve-eps0.1"].argv, "--pgd-steps") == "3"
