"""reproduce.py with the seed talk's defenses (MM-LDA, MMC, ADP, alone, with AT and with NAMID): the plan's
wiring of stage 2 and 3 to another stage-1 target than Standard AT, evaluation variants and their table
columns, the per-preset reference table, and that the NAMID presets plan exactly what they planned before.
Plan level only: no training, fake results files."""
import csv
import io
import json
from pathlib import Path

import pytest

import reproduce
from tests.helpers import INVOCATION
from utils.errors import UserError
from utils.pipeline import (DEFENSES, ESTIMATOR_RUNS, build_plan, check_command_lines, resolve_config, stage_flags)
from utils.presets import ALL_DEFENSES, MIXUP_DEFENSES, NAMID_DEFENSES, PRESETS, RCE_DEFENSES, TALK_DEFENSES
from utils.study import DEFAULT_REFERENCE, REFERENCE_TABLES, comparison, comparison_csv, comparison_markdown, \
    paper_markdown, write_study

RUNNER = {"seeds": None, "defenses": None, "jobs": None, "curve_steps": None, "epsilons": None, "namid_estimators": None}
OUT = Path("study")  # relative, so that the command lines below are literal
TALK = "seed-talk-fashion-mnist-cpu"
ADP = "adp-mnist-cpu"


def plan(preset, overrides=(), out=OUT, **runner):
    config = resolve_config(preset, list(overrides), {**RUNNER, **runner})
    return config, {task.name: task for task in build_plan(config, out, "cpu", "data")}


def flag_value(argv, flag):
    assert argv.count(flag) == 1, (flag, argv)
    return argv[argv.index(flag) + 1]


def flag_values(argv, flag):
    """The tokens after flag, up to the next --flag."""
    start = argv.index(flag) + 1
    end = next((i for i in range(start, len(argv)) if argv[i].startswith("--")), len(argv))
    return argv[start:end]


# ----------------------------------------------------------------------------------------------
# The NAMID presets plan what they planned before (a 3-seed fashion-mnist-cpu study resumes on these)


FMNIST_CPU_TASKS = [f"seed{s}/{stage}" for s in (0, 1, 2) for stage in (
    "standard-at", "trades", "only-max", "namid", "namid-t",
    "eval-standard-at", "eval-namid", "eval-trades", "eval-namid-t")]
DATA = ["--dataset", "fashion-mnist", "--train-limit", "10000", "--test-limit", "1000"]
RUNTIME = ["--device", "cpu", "--data-dir", "data"]
FMNIST_CPU_ARGV = {
    "seed1/standard-at": DATA + ["--epochs", "10", "--grad-clip", "10", "--loss", "at", "--seed", "1",
                                 "--model-dir", "study/seed1/standard-at"] + RUNTIME,
    "seed1/trades": DATA + ["--epochs", "10", "--grad-clip", "10", "--loss", "trades", "--seed", "1",
                            "--model-dir", "study/seed1/trades"] + RUNTIME,
    "seed1/only-max": DATA + ["--lr", "0.001", "--milestones", "--epochs", "10",
                              "--target-model", "study/seed1/standard-at/best.pt", "--seed", "1",
                              "--model-dir", "study/seed1/only-max"] + RUNTIME,
    "seed1/namid-t": DATA + ["--alpha", "0.5", "--lambda", "0.1", "--grad-clip", "10", "--epochs", "10",
                             "--estimators", "study/seed1/only-max/estimators.pt", "--base-loss", "trades",
                             "--seed", "1", "--model-dir", "study/seed1/namid-t"] + RUNTIME,
    "seed2/eval-namid": ["--test-limit", "1000", "--attacks", "pgd", "aa", "--pgd-steps", "40",
                         "--checkpoints", "study/seed2/namid/best.pt", "--labels", "NAMID", "--seed", "2",
                         "--out-dir", "study/seed2/eval-namid"] + RUNTIME,
}


def test_the_fashion_mnist_cpu_plan_is_unchanged():
    config, tasks = plan("fashion-mnist-cpu")
    assert list(tasks) == FMNIST_CPU_TASKS
    for name, argv in FMNIST_CPU_ARGV.items():
        assert tasks[name].argv == argv, name
    assert tasks["seed1/only-max"].deps == ["seed1/standard-at"]
    assert tasks["seed1/only-max"].inputs == [Path("study/seed1/standard-at/best.pt")]
    assert tasks["seed1/namid-t"].deps == ["seed1/only-max"]
    assert all(task.variant is None for task in tasks.values())
    assert "eval_variants" not in config


def test_the_paper_like_presets_keep_the_namid_rows():
    for name in ("cifar10-paper", "cifar10-reference", "tiny-imagenet-paper", "mnist", "fashion-mnist", "demo"):
        assert PRESETS[name]["defenses"] == list(NAMID_DEFENSES), name
        assert PRESETS[name]["reference"] == "namid-table1", name
    assert ALL_DEFENSES == NAMID_DEFENSES + TALK_DEFENSES + MIXUP_DEFENSES + RCE_DEFENSES == tuple(DEFENSES)


# ----------------------------------------------------------------------------------------------
# Stage 2 and 3 on another stage-1 target


@pytest.mark.parametrize("seed", [0, 2])
def test_namid_mmc_reads_estimators_trained_on_at_mmc(seed):
    _, tasks = plan(TALK, seeds=[0, 2])
    stage1 = tasks[f"seed{seed}/at-mmc"]
    assert flag_value(stage1.argv, "--loss") == "at" and flag_value(stage1.argv, "--head") == "mmc"
    assert flag_value(stage1.argv, "--model-dir") == f"study/seed{seed}/at-mmc"
    stage2 = tasks[f"seed{seed}/only-max-at-mmc"]
    assert stage2.kind == "only-max" and stage2.script == "train_MI_estimator_only_max.py"
    assert flag_value(stage2.argv, "--target-model") == f"study/seed{seed}/at-mmc/best.pt"
    assert flag_value(stage2.argv, "--model-dir") == f"study/seed{seed}/only-max-at-mmc"
    assert stage2.deps == [f"seed{seed}/at-mmc"] and stage2.inputs == [Path(f"study/seed{seed}/at-mmc/best.pt")]
    stage3 = tasks[f"seed{seed}/namid-mmc"]
    assert stage3.kind == "namid" and stage3.script == "train_MIAT.py"
    assert flag_value(stage3.argv, "--estimators") == f"study/seed{seed}/only-max-at-mmc/estimators.pt"
    assert flag_value(stage3.argv, "--head") == "mmc" and flag_value(stage3.argv, "--base-loss") == "at"
    assert flag_value(stage3.argv, "--alpha") == "13.6"  # matched to the MMC loss's gradient scale (utils/presets.py)
    assert flag_value(stage3.argv, "--grad-clip") == "10"  # the preset's other NAMID settings still apply
    assert stage3.deps == [f"seed{seed}/only-max-at-mmc"]
    assert stage3.inputs == [Path(f"study/seed{seed}/only-max-at-mmc/estimators.pt")]
    # Standard AT is a row here, but no NAMID row reads estimators on it: no stage-2 run on it
    assert f"seed{seed}/standard-at" in tasks and f"seed{seed}/only-max" not in tasks
    assert f"seed{seed}/estimators" not in tasks
    # with train_MI_estimator.py's estimators, the same wiring in a folder of its own
    _, wired = plan(TALK, seeds=[seed], namid_estimators="estimators")
    assert flag_value(wired[f"seed{seed}/namid-mmc"].argv, "--estimators") == \
        f"study/seed{seed}/estimators-at-mmc/estimators.pt"
    assert flag_value(wired[f"seed{seed}/estimators-at-mmc"].argv, "--target-model") == f"study/seed{seed}/at-mmc/best.pt"
    assert wired[f"seed{seed}/estimators-at-mmc"].kind == "estimators"


def test_a_target_is_trained_even_when_it_is_not_a_row():
    _, tasks = plan(TALK, seeds=[0], defenses=["namid-mmc"])
    assert sorted(tasks) == ["seed0/at-mmc", "seed0/eval-namid-mmc", "seed0/namid-mmc", "seed0/only-max-at-mmc"]
    assert flag_values(tasks["seed0/at-mmc"].argv, "--loss") == ["at"]
    # two targets side by side: NAMID on Standard AT and NAMID on AT + ADP, neither target a row
    _, tasks = plan("demo", defenses=["namid", "namid-adp"])
    assert {"seed0/standard-at", "seed0/at-adp", "seed0/only-max", "seed0/only-max-at-adp"} <= set(tasks)
    assert "seed0/eval-at-adp" not in tasks and "seed0/eval-standard-at" not in tasks
    assert flag_value(tasks["seed0/namid"].argv, "--estimators") == "study/seed0/only-max/estimators.pt"
    namid_adp, at_adp = tasks["seed0/namid-adp"].argv, tasks["seed0/at-adp"].argv
    assert flag_value(namid_adp, "--estimators") == "study/seed0/only-max-at-adp/estimators.pt"
    for flag in ("--head", "--adp-alpha", "--adp-beta"):  # stage 3 builds the head its estimators' target has
        assert flag_value(namid_adp, flag) == flag_value(at_adp, flag)
    assert flag_value(namid_adp, "--head") == "adp" and flag_value(namid_adp, "--adp-beta") == "0.5"
    assert flag_value(tasks["seed0/only-max-at-adp"].argv, "--target-model") == "study/seed0/at-adp/best.pt"


def test_every_defense_is_wired_consistently():
    for name, spec in DEFENSES.items():
        if spec.section == "namid":
            assert DEFENSES[spec.target].section == "standard" and spec.estimators in ESTIMATOR_RUNS, name
            head = flag_values(spec.flags, "--head") if "--head" in spec.flags else []
            target_head = flag_values(DEFENSES[spec.target].flags, "--head") if "--head" in DEFENSES[spec.target].flags \
                else []
            assert head == target_head, name
        else:
            assert spec.target is None and spec.estimators is None, name
    expected = {"sce": ["--loss", "natural"], "mm-lda": ["--loss", "natural", "--head", "mm-lda"],
                "mmc": ["--loss", "natural", "--head", "mmc"], "at-mm-lda": ["--loss", "at", "--head", "mm-lda"],
                "at-mmc": ["--loss", "at", "--head", "mmc"],
                "ensemble": ["--loss", "natural", "--head", "adp", "--adp-alpha", "0", "--adp-beta", "0"],
                "adp-2-0": ["--loss", "natural", "--head", "adp", "--adp-alpha", "2", "--adp-beta", "0"],
                "adp": ["--loss", "natural", "--head", "adp", "--adp-alpha", "2", "--adp-beta", "0.5"],
                "at-adp": ["--loss", "at", "--head", "adp", "--adp-alpha", "2", "--adp-beta", "0.5"]}
    for name, flags in expected.items():
        assert list(DEFENSES[name].flags) == flags, name
    assert DEFENSES["namid-mmc"].target == "at-mmc" and DEFENSES["namid-adp"].target == "at-adp"
    assert DEFENSES["mmc"].label == "MMC-10" and DEFENSES["at-mmc"].label == "AT-MMC-10"
    assert DEFENSES["adp"].label == "ADP_{2,0.5}" and DEFENSES["at-adp"].label == "AT + ADP_{2,0.5}"


@pytest.mark.parametrize("item", ["head=mmc", "standard.adp-beta=0", "namid.head=adp"])
def test_the_flags_that_make_a_defense_cannot_be_overridden(item):
    with pytest.raises(UserError, match="the runner sets"):
        plan(TALK, [item])


# ----------------------------------------------------------------------------------------------
# Evaluation variants


def test_each_variant_has_its_own_evaluation_folder_and_flags():
    config, tasks = plan(ADP, seeds=[1])
    assert list(config["eval_variants"]) == ["eps0.1", "eps0.15"]
    evals = [task for task in tasks.values() if task.kind == "eval"]
    assert [task.name for task in evals] == [f"seed1/eval-{d}-{v}" for d in ("ensemble", "adp-2-0", "adp")
                                             for v in ("eps0.1", "eps0.15")]
    attacks = "fgsm-p bim-p pgd-p mim-p fgsm bim pgd mim pgd-restarts aa".split()
    for task in evals:
        variant = task.name.rsplit("-", 1)[1]
        epsilon, step = {"eps0.1": ("0.1", "0.01"), "eps0.15": ("0.15", "0.015")}[variant]
        assert task.variant == variant and task.run_dir == Path(f"study/seed1/eval-{task.defense}-{variant}")
        argv = task.argv
        assert flag_value(argv, "--out-dir") == f"study/seed1/eval-{task.defense}-{variant}"
        assert flag_value(argv, "--epsilon") == epsilon
        for flag in ("--pgd-step-size", "--bim-step-size", "--mim-step-size"):
            assert flag_value(argv, flag) == step, flag
        for flag in ("--pgd-steps", "--bim-steps", "--mim-steps"):
            assert flag_value(argv, flag) == "10", flag
        assert flag_values(argv, "--attacks") == attacks
        assert flag_value(argv, "--checkpoints") == f"study/seed1/{task.defense}/best.pt"
        assert flag_value(argv, "--labels") == DEFENSES[task.defense].label
        assert task.deps == [f"seed1/{task.defense}"]
    # a --set on the eval section reaches every variant; the variant's own flags stay its own
    _, tasks = plan(ADP, ["eval.attacks=pgd aa", "eval.restarts=2"], seeds=[0])
    for variant, epsilon in (("eps0.1", "0.1"), ("eps0.15", "0.15")):
        argv = tasks[f"seed0/eval-adp-{variant}"].argv
        assert flag_values(argv, "--attacks") == ["pgd", "aa"] and flag_value(argv, "--restarts") == "2"
        assert flag_value(argv, "--epsilon") == epsilon


def test_adp_mnist_cpu_trains_with_the_authors_recipe():
    _, tasks = plan(ADP, seeds=[0])
    assert sorted(name for name, task in tasks.items() if task.kind == "standard") == \
        ["seed0/adp", "seed0/adp-2-0", "seed0/ensemble"]
    argv = tasks["seed0/ensemble"].argv
    assert flag_value(argv, "--dataset") == "mnist" and flag_value(argv, "--train-limit") == "10000"
    assert flag_value(argv, "--optimizer") == "adam" and flag_value(argv, "--lr") == "0.001"
    assert flag_values(argv, "--milestones") == ["4", "8"] and flag_value(argv, "--batch-size") == "64"
    assert flag_value(argv, "--epochs") == "10" and flag_value(argv, "--eval-steps") == "5"
    assert flag_value(argv, "--test-limit") == "1000"  # the per-epoch monitoring; the evaluations take 250
    assert flag_value(tasks["seed0/eval-adp-eps0.1"].argv, "--test-limit") == "250"


@pytest.mark.parametrize("variants, fragment", [
    ({"eps 0.1": {"epsilon": "0.1"}}, "names a folder"),
    ({"v": {"out-dir": "x"}}, "the runner sets --out-dir itself"),
])
def test_bad_eval_variants_are_refused(monkeypatch, variants, fragment):
    monkeypatch.setitem(PRESETS, "test-variants", {**PRESETS[ADP], "eval_variants": variants})
    with pytest.raises(UserError, match=fragment):
        plan("test-variants")


def fake_results(path: Path, columns: list, accuracies: dict, images: int = 1000):
    """A test_comparison.py results.json with one model: columns [(key, header)], accuracies {key: value}."""
    record = {"clean": {"accuracy": accuracies["clean"]},
              "attacks": {k: {"accuracy": v} for k, v in accuracies.items() if k not in ("clean", "worst_linf")},
              "worst_case": {"linf": {"accuracy": accuracies["worst_linf"]}}}
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps({
        "columns": [{"key": k, "header": h} for k, h in columns], "models": [record], "test_images": images}))


def fake_metrics(path: Path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.csv").write_text("epoch,val_clean_acc,val_pgd_acc\n1,0.9,0.1\n2,0.95,0.2\n")


def fake_study(tasks: dict, evaluate):
    """A planned study's folders as if it had run: a metrics.csv for every training, what evaluate(task) writes
    for every evaluation."""
    for task in tasks.values():
        if task.kind == "eval":
            evaluate(task)
        elif task.kind in ("standard", "namid"):
            fake_metrics(task.run_dir)


def test_the_table_has_a_column_per_variant_and_attack_in_variant_order(tmp_path):
    config, tasks = plan(ADP, seeds=[0, 1], out=tmp_path)
    base = [("clean", "None"), ("pgd", "PGD-10"), ("worst_linf", "Worst L-inf")]
    def evaluate(task):
        eps = 0.1 if task.variant == "eps0.1" else 0.15
        # the first evaluation of all (ensemble, eps0.1, seed 0) lacks the MIM column the others have
        first = (task.defense, task.variant, task.seed) == ("ensemble", "eps0.1", 0)
        columns = base if first else base[:2] + [("mim", "MIM-10")] + base[2:]
        value = {"ensemble": 0.1, "adp-2-0": 0.2, "adp": 0.3}[task.defense] + eps + task.seed / 100
        accuracies = {"clean": 0.99, "pgd": value, "mim": value + 0.001, "worst_linf": value - 0.001}
        fake_results(task.run_dir, columns, {k: v for k, v in accuracies.items() if k in dict(columns)})
    fake_study(tasks, evaluate)
    table = comparison(config, list(tasks.values()))
    expected = [("eps0.1:clean", "eps0.1: None"), ("eps0.1:pgd", "eps0.1: PGD-10"),
                ("eps0.1:worst_linf", "eps0.1: Worst L-inf"), ("eps0.1:mim", "eps0.1: MIM-10"),
                ("eps0.15:clean", "eps0.15: None"), ("eps0.15:pgd", "eps0.15: PGD-10"),
                ("eps0.15:mim", "eps0.15: MIM-10"), ("eps0.15:worst_linf", "eps0.15: Worst L-inf")]
    assert table["columns"] == expected
    adp = table["cells"]["adp"]
    assert adp["eps0.1:pgd"]["values"] == pytest.approx([0.4, 0.41])
    assert adp["eps0.15:pgd"]["values"] == pytest.approx([0.45, 0.46])
    assert adp["eps0.15:mim"]["mean"] == pytest.approx(0.456)
    assert table["cells"]["ensemble"]["eps0.1:mim"]["values"] == pytest.approx([0.211])  # seed 1 only
    header = comparison_markdown(config, table).splitlines()[0]
    assert header == "| Defense | " + " | ".join(h for _, h in expected) + " |"
    rows = list(csv.DictReader(io.StringIO(comparison_csv(config, table))))
    assert [(r["column"], r["header"]) for r in rows if r["defense"] == "adp"] == expected
    # results.md / .json: the same columns, and the ADP paper's table for orientation
    summary = write_study(config, list(tasks.values()), tmp_path, {}, INVOCATION)
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(c["key"], c["header"]) for c in results["columns"]] == expected
    assert summary["table"].splitlines()[0] == header
    markdown = (tmp_path / "results.md").read_text()
    assert "## The ADP paper's MNIST Table 2" in markdown and "| PGD, eps 0.15 | 6.3 | 36.2 | 41.0 |" in markdown
    assert "averaged probabilities" in markdown and "The paper's Table 1" not in markdown


def test_without_variants_the_columns_are_the_evaluations_own(tmp_path):
    config, tasks = plan("fashion-mnist-cpu", seeds=[0], out=tmp_path)
    columns = [("clean", "None"), ("pgd", "PGD-40"), ("aa", "AA"), ("worst_linf", "Worst L-inf")]
    for task in tasks.values():
        if task.kind == "eval":
            fake_results(task.run_dir, columns, {"clean": 0.8, "pgd": 0.5, "aa": 0.4, "worst_linf": 0.39})
    table = comparison(config, list(tasks.values()))
    assert table["columns"] == columns and table["cells"]["namid"]["aa"]["mean"] == pytest.approx(0.4)


# ----------------------------------------------------------------------------------------------
# Reference tables, the new presets, reproduce.py --help


def test_each_preset_names_its_reference_table():
    for name, preset in PRESETS.items():
        assert preset.get("reference", DEFAULT_REFERENCE) in REFERENCE_TABLES, name
    assert PRESETS[TALK]["reference"] == "mmc-iclr2020" and PRESETS[ADP]["reference"] == "adp-icml2019-mnist"
    namid = paper_markdown(REFERENCE_TABLES["namid-table1"])
    assert namid == paper_markdown()
    assert namid.splitlines()[:3] == ["| Defense | None | PGD-40 | AA |", "|---|---:|---:|---:|",
                                      "| Standard AT | 83.39 | 42.38 | 39.01 |"]
    mmc = paper_markdown(REFERENCE_TABLES["mmc-iclr2020"])
    for line in ("| SCE | 92.9 | 3.7 | 3.6 | - |", "| MMC-10 | 92.7 | 36.0 | 24.8 | - |",
                 "| AT^un_10 (SCE) | 80.9 | 55.4 | 53.9 | - |", "| AT^un_10 (MMC-10) | 81.8 | 56.3 | 55.0 | - |",
                 "| MM-LDA | 92.4 | 16.5 | 9.7 | - |"):
        assert line in mmc
    assert "| 90.18 | - | - | 0.00 |" in mmc and "for orientation only" in mmc
    adp = paper_markdown(REFERENCE_TABLES["adp-icml2019-mnist"])
    for line in ("| FGSM, eps 0.1 | 78.3 | 95.5 | 96.3 |", "| FGSM, eps 0.2 | 21.5 | 50.6 | 52.8 |",
                 "| BIM, eps 0.1 | 52.3 | 86.4 | 88.5 |", "| BIM, eps 0.15 | 12.2 | 69.5 | 73.6 |",
                 "| PGD, eps 0.1 | 50.7 | 73.4 | 82.8 |", "| PGD, eps 0.15 | 6.3 | 36.2 | 41.0 |",
                 "| MIM, eps 0.1 | 58.3 | 89.7 | 92.0 |", "| MIM, eps 0.15 | 16.1 | 73.3 | 77.5 |"):
        assert line in adp
    assert "averaged probabilities" in adp and "for orientation only" in adp


def test_the_seed_talk_preset_plans_its_rows():
    config, tasks = plan(TALK)
    assert config["defenses"] == ["sce", "mm-lda", "mmc", "standard-at", "at-mmc", "adp", "at-adp", "namid-mmc"]
    assert config["seeds"] == [0, 1, 2] and config["namid_estimators"] == "only-max"
    evaluation = tasks["seed2/eval-mmc"].argv
    assert flag_values(evaluation, "--attacks") == ["pgd", "aa", "pgd-mt", "pgd-restarts"]
    assert flag_value(evaluation, "--pgd-steps") == "40" and flag_value(evaluation, "--test-limit") == "500"
    standard = tasks["seed0/sce"].argv
    assert flag_value(standard, "--train-limit") == "5000" and flag_value(standard, "--epochs") == "10"
    assert flag_value(tasks["seed0/only-max-at-mmc"].argv, "--lr") == "0.001"  # the MNIST-like estimator recipe
    assert len(tasks) == 3 * (7 + 1 + 1 + 8)  # per seed: trainings, estimators, NAMID, evaluations


def stage_scripts_have_the_talk_flags() -> bool:
    flags = stage_flags()
    return ("head" in flags["standard"] and "head" in flags["namid"] and "mt-targets" in flags["eval"]
            and "restarts" in flags["eval"] and "mim-step-size" in flags["eval"])


@pytest.mark.parametrize("preset, defenses", [(TALK, None), (ADP, None), (TALK, list(TALK_DEFENSES)),
                                              ("demo", ["namid-adp", "at-mm-lda", "ensemble", "adp-2-0"])])
def test_every_planned_command_line_parses(preset, defenses):
    if not stage_scripts_have_the_talk_flags():
        pytest.skip("the stage scripts do not have the seed talk's flags yet (--head, --mt-targets, --restarts, "
                    "--mim-step-size): the plan is written against them")
    _, tasks = plan(preset, defenses=defenses)
    check_command_lines(list(tasks.values()))


def test_help_and_docstring_list_the_new_presets_and_defenses(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at hyphens too: keep every name on one line
    text = reproduce.build_parser().format_help()
    for name in (TALK, ADP, *TALK_DEFENSES):
        assert name in text, name
        assert name in reproduce.__doc__, name
