"""utils/paired.py and the study's paired section: per-example flags as the records count them, McNemar's exact
p-value against hand computations, and the table of each row against its baseline in a study."""
import json

import pytest

from tests.helpers import INVOCATION
from tests.test_reproduce_seed_talk import ADP, TALK, fake_study, plan
from utils.paired import mcnemar_p, paired_counts, per_example_flags
from utils.study import comparison, paired_comparisons, paired_markdown, paired_tables, write_study


def record(clean: str, pgd: str, aa: str) -> dict:
    """A test_comparison.py results.json model record with these per-example strings."""
    accuracy = lambda bits: bits.count("1") / len(bits)  # noqa: E731
    worst = "".join("1" if c == p == a == "1" else "0" for c, p, a in zip(clean, pgd, aa))
    return {"clean": {"accuracy": accuracy(clean), "per_example": clean},
            "attacks": {"pgd": {"accuracy": accuracy(pgd), "per_example": pgd},
                        "aa": {"accuracy": accuracy(aa), "per_example": aa}},
            "worst_case": {"linf": {"accuracy": accuracy(worst), "attacks": ["pgd", "aa"]}}}


def test_worst_case_flags_are_clean_and_every_attack_of_the_threat_model():
    # the fourth image survives both attacks but is wrong when clean; the third falls to AA only
    entry = record("1110", "1111", "1001")
    assert per_example_flags(entry, "worst_linf") == [True, False, False, False]
    assert per_example_flags(entry, "pgd") == [True, True, True, True]
    assert sum(per_example_flags(entry, "worst_linf")) / 4 == entry["worst_case"]["linf"]["accuracy"]


def test_mcnemar_exact_p_values_by_hand():
    # 8 discordant images for the first model, 2 for the second: 2 P(X <= 2), X ~ Bin(10, 1/2) = 2 * 56 / 1024
    assert mcnemar_p(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_p(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_p(5, 5) == pytest.approx(1.0) and mcnemar_p(0, 0) == 1.0
    assert mcnemar_p(6, 0) == pytest.approx(2 / 64)  # all six discordant images favour one model
    counts = paired_counts([True, True, False, False, True], [True, False, True, False, False])
    assert counts == {"difference": pytest.approx(1 / 5), "only_first": 2, "only_second": 1, "images": 5,
                      "p": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="same images"):
        paired_counts([True], [True, False])


def write_eval(task, entry, indices):
    task.run_dir.mkdir(parents=True, exist_ok=True)
    (task.run_dir / "results.json").write_text(json.dumps({
        "columns": [{"key": "clean", "header": "None"}, {"key": "pgd", "header": "PGD-40"},
                    {"key": "aa", "header": "AA"}, {"key": "worst_linf", "header": "Worst L-inf"}],
        "test_images": len(indices), "test_indices": indices, "models": [entry]}))


def test_the_study_pairs_each_namid_row_with_its_baseline_per_seed(tmp_path):
    config, tasks = plan("fashion-mnist-cpu", seeds=[0, 1], out=tmp_path)
    per_seed = {  # (NAMID, Standard AT) per seed; TRADES and NAMID-T alike on other images
        0: (record("11111111", "11110000", "11100000"), record("11111110", "11000000", "11000000")),
        1: (record("11111111", "11000000", "10000000"), record("11111111", "11100000", "11000000"))}

    def evaluate(task):
        namid, standard = per_seed[task.seed]
        entry = namid if task.defense in ("namid", "namid-t") else standard
        write_eval(task, entry, list(range(8)) if task.seed == 0 else list(range(8, 16)))
    fake_study(tasks, evaluate)
    table = comparison(config, list(tasks.values()))
    pairs = paired_comparisons(config, list(tasks.values()), table["columns"])
    assert [(p["defense"], p["baseline"]) for p in pairs] == [("namid", "standard-at"), ("namid-t", "trades")]
    aa = pairs[0]["columns"]["aa"]
    # seed 0: NAMID right on images 0-2, Standard AT on 0-1: +1/8; seed 1: images 0 against 0-1: -1/8
    assert aa["seeds"]["0"]["difference"] == pytest.approx(0.125) and aa["seeds"]["1"]["difference"] == pytest.approx(-0.125)
    assert aa["mean"] == pytest.approx(0.0) and aa["std"] == pytest.approx(0.1767767, rel=1e-5)
    assert aa["pooled"] == {"only_first": 1, "only_second": 1, "p": pytest.approx(1.0)}
    # the difference is the table's: NAMID's cell minus Standard AT's, seed by seed
    for column, summary in pairs[0]["columns"].items():
        for seed, counts in summary["seeds"].items():
            namid, standard = (table["cells"][row][column]["values"][int(seed)] for row in ("namid", "standard-at"))
            assert counts["difference"] == pytest.approx(namid - standard), (column, seed)
    markdown = paired_markdown(paired_tables(pairs, table["columns"]))
    assert "| NAMID − Standard AT | None | PGD-40 | AA | Worst L-inf |" in markdown
    assert "| seed 0 | +12.50 (p 1) | +25.00 (p 0.5) | +12.50 (p 1) | +12.50 (p 1) |" in markdown
    assert "| mean ± std over seeds | +6.25 ± 8.84 | +6.25 ± 26.52 | +0.00 ± 17.68 | +0.00 ± 17.68 |" in markdown
    write_study(config, list(tasks.values()), tmp_path, {}, INVOCATION)
    assert "## Each row against its baseline, on the same test images" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["paired"][1]["label"] == "NAMID-T − TRADES"


def test_no_pair_without_the_baseline_or_other_test_images(tmp_path):
    config, tasks = plan("fashion-mnist-cpu", seeds=[0], defenses=["namid", "trades"], out=tmp_path)
    assert paired_comparisons(config, list(tasks.values()), []) == []  # NAMID's baseline is not in the study
    config, tasks = plan("fashion-mnist-cpu", seeds=[0], defenses=["standard-at", "namid"], out=tmp_path / "b")
    write_eval(tasks["seed0/eval-namid"], record("11", "10", "10"), [0, 1])
    write_eval(tasks["seed0/eval-standard-at"], record("11", "10", "10"), [0, 2])  # another subset: no pairing
    assert paired_comparisons(config, list(tasks.values()), [("clean", "None")]) == []


def test_the_talks_rows_are_paired_with_the_defense_they_modify(tmp_path):
    config, tasks = plan(TALK, seeds=[0], out=tmp_path)

    def evaluate(task):
        write_eval(task, record("11", "10", "10"), [0, 1])
    fake_study(tasks, evaluate)
    pairs = paired_comparisons(config, list(tasks.values()), [("clean", "None")])
    # ADP_{2,0.5} has no pair here: the study trains no plain ensemble
    assert [(p["defense"], p["baseline"]) for p in pairs] == [
        ("mm-lda", "sce"), ("mmc", "sce"), ("at-mmc", "standard-at"), ("at-adp", "standard-at"),
        ("namid-mmc", "at-mmc")]


def test_the_adp_ensembles_are_paired_with_the_plain_ensemble_per_budget(tmp_path):
    config, tasks = plan(ADP, seeds=[0], out=tmp_path)
    ensemble, adp = record("1111", "1100", "1000"), record("1111", "1110", "1100")

    def evaluate(task):
        write_eval(task, ensemble if task.defense == "ensemble" else adp, [0, 1, 2, 3])
    fake_study(tasks, evaluate)
    table = comparison(config, list(tasks.values()))
    pairs = paired_comparisons(config, list(tasks.values()), table["columns"])
    assert [(p["defense"], p["baseline"]) for p in pairs] == [("adp-2-0", "ensemble"), ("adp", "ensemble")]
    for variant in ("eps0.1", "eps0.15"):  # one column per budget: ADP right on 1 (AA) more image of 4
        assert pairs[1]["columns"][f"{variant}:aa"]["seeds"]["0"]["difference"] == pytest.approx(0.25)
        assert pairs[1]["columns"][f"{variant}:aa"]["pooled"]["only_first"] == 1
    assert "| ADP_{2,0.5} − Baseline ensemble |" in "\n".join(paired_tables(pairs, table["columns"]))
