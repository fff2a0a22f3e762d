"""train_MI_estimator.py and train_MI_estimator_only_max.py end to end: outputs, frozen target, resume, bad input."""
import json
import os
import subprocess
import sys

import numpy
import pytest
import torch

import train_MI_estimator
import train_MI_estimator_only_max
from tests.helpers import (assert_all_float32_without_autocast, assert_one_line_error, assert_resume_is_bit_identical,
                           digest, read_metrics, record_estimator_precision, record_local_inputs, run_script)
from utils.mi import QUANTITIES
from utils.run_warnings import read_warnings
from utils.training import load_model

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent

SCRIPTS = {"paper": train_MI_estimator, "only-max": train_MI_estimator_only_max}


def small_args(fmnist_dir, target, model_dir, *extra):
    return ["--target-model", str(target), "--data-dir", str(fmnist_dir), "--train-limit", "200", "--val-size", "100",
            "--test-limit", "100", "--batch-size", "50", "--hsize", "32", "--num-steps", "2", "--device", "cpu",
            "--model-dir", str(model_dir), *extra]


@pytest.mark.parametrize("name,extra", [("paper", []), ("paper", ["--estimator-loss", "reference", "--mi-measure", "jsd"]),
                                        ("only-max", ["--mi-measure", "nce"])])
def test_end_to_end_outputs_and_frozen_target(fmnist_dir, tiny_target, tmp_path, name, extra, capsys):
    target_digest = digest(tiny_target)
    target_before, _ = load_model(tiny_target, "cpu")
    model_dir = tmp_path / "est"
    assert SCRIPTS[name].main(small_args(fmnist_dir, tiny_target, model_dir, "--epochs", "2", *extra)) == 0

    outputs = ["config.json", "estimators.pt", "last.pt", "metrics.csv", "mi_distributions.png", "mi_report.json",
               "mi_values.npz"]
    assert sorted(p.name for p in model_dir.iterdir() if p.name != "warnings.json") == outputs
    captured = capsys.readouterr()
    printed, console = captured.err, captured.out + captured.err
    for message in read_warnings(model_dir):  # every warning kept was also printed, and the other way round
        assert f"warning: {message}" in printed
    assert printed.count("warning: ") == len(read_warnings(model_dir))
    report = json.loads((model_dir / "mi_report.json").read_text())
    with numpy.load(model_dir / "mi_values.npz") as values:  # the per-sample values behind the report
        selected, correct, fooled = values["selected"], values["correct"], values["fooled"]
        assert len(selected) == report["samples"] and int(selected.sum()) == report["selected"]["nat_mi_clean"]["n"]
        assert numpy.array_equal(selected, correct & fooled) and 0 < correct.sum() < len(correct) and fooled.any()
        for quantity in QUANTITIES:
            assert float(values[quantity].mean()) == pytest.approx(report["all"][quantity]["mean"], rel=1e-5, abs=1e-6)
        maximised = report["maximised_estimates"]  # each estimator on the samples it is trained for
        natural, adversarial = values["nat_mi_clean"][correct].mean(), values["adv_mi_adv"][fooled].mean()
        assert maximised["nat_mi_correct"] == pytest.approx(float(natural), rel=1e-5, abs=1e-6)
        assert maximised["adv_mi_fooled"] == pytest.approx(float(adversarial), rel=1e-5, abs=1e-6)
        assert maximised["mi_selection"] == pytest.approx(float(natural + adversarial) / 2, rel=1e-5, abs=1e-6)
        # the informativeness check: E_n on all samples, E_a on the fooled ones, each against its shuffled pairs
        verdicts = report["informativeness"]
        for judged, quantity, mask in (("natural", "nat_mi_clean", numpy.ones_like(fooled)), ("adversarial", "adv_mi_adv", fooled)):
            real, shuffled = values[quantity][mask], values[f"{quantity}_shuffled"][mask]
            assert verdicts[judged]["n"] == int(mask.sum())
            assert verdicts[judged]["mean"] == pytest.approx(float(real.mean()), rel=1e-5, abs=1e-6)
            assert verdicts[judged]["se"] == pytest.approx(float(real.std(ddof=1) / numpy.sqrt(len(real))), rel=1e-4)
            assert verdicts[judged]["shuffled_mean"] == pytest.approx(float(shuffled.mean()), rel=1e-5, abs=1e-6)
        assert verdicts["informative"] == all(verdicts[n]["verdict"] == "informative" for n in ("natural", "adversarial"))
        assert "test set: E_n" in console and "epoch 2 held-out: E_n" in console
        assert ("the estimators are not informative" in printed) == (not verdicts["informative"])
    assert report["selected_on"] == "val_mi_selection"
    assert digest(tiny_target) == target_digest, "the target checkpoint was modified"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["stage"] == "estimators" and config["args"]["dataset"] == "fashion-mnist"
    assert config["args"]["epsilon"] == pytest.approx(0.1) and config["args"]["norm"] == "linf"
    assert config["target_sha256"] == target_digest

    rows = read_metrics(model_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for key in (["val_mi_selection", "val_nat_mi_correct", "val_adv_mi_fooled", "val_objective", "val_selected",
                 "train_selected", "val_En_mean", "val_En_se", "val_En_shuffled_mean", "val_En_informative",
                 "val_Ea_mean", "val_Ea_se", "val_Ea_shuffled_mean", "val_Ea_informative"] + [f"val_{q}" for q in QUANTITIES] + [f"val_sel_{q}" for q in QUANTITIES]):
        assert key in rows[0] and rows[0][key] not in ("", "nan"), key
    for row in rows:
        parts = float(row["val_nat_mi_correct"]), float(row["val_adv_mi_fooled"])
        assert float(row["val_mi_selection"]) == pytest.approx(sum(parts) / 2, rel=1e-4, abs=1e-5)
    # estimators.pt is the epoch with the highest held-out mean of the maximised estimates (first one on a tie)
    best_epoch = int(max(rows, key=lambda r: float(r["val_mi_selection"]))["epoch"])
    assert torch.load(model_dir / "estimators.pt", weights_only=True)["epoch"] == best_epoch == report["best_epoch"]

    estimators = torch.load(model_dir / "estimators.pt", weights_only=True)
    assert estimators["estimator_spec"]["hsize"] == 32 and estimators["target_spec"]["arch"] == "small-cnn"
    default_objective = {"paper": "paper-bounded", "only-max": "only-max"}[name]
    assert estimators["objective"] == (extra[1] if extra[:1] == ["--estimator-loss"] else default_objective)
    assert any(k.startswith("natural.local") for k in estimators["estimators"])
    assert any(k.startswith("adversarial.head") for k in estimators["estimators"])

    assert report["samples"] == 100 and set(report["all"]) == set(QUANTITIES) and "observation" in report
    png = (model_dir / "mi_distributions.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    # the in-memory target was never touched either: weights and BN buffers (SmallCNN has none) equal
    target_after, _ = load_model(tiny_target, "cpu")
    for (k, a), (_, b) in zip(target_before.state_dict().items(), target_after.state_dict().items()):
        assert torch.equal(a, b), k


def test_stage2_step_wiring_and_precision(trained_small_cnn, fmnist_batches):
    """E_n reads x and E_a reads n = x~ - x; the objective sees the target's logits of x and x~; under bf16
    autocast (--amp; CPU's stands in for CUDA's) every estimator module still computes in float32."""
    from models.estimators import build_estimators
    from utils.attacks import PGDConfig, pgd_attack
    from utils.estimator_training import make_estimator_step
    from utils.mi import only_max_objective
    _, _, x, y = fmnist_batches
    x, y = x[:16], y[:16]
    torch.manual_seed(0)
    estimators = build_estimators(1, 10, 16)
    attack = PGDConfig("linf", 0.1, 0.025, 3)
    seen = record_local_inputs(estimators)
    precision = record_estimator_precision(estimators)
    objectives = []
    def objective(q, logits_nat, logits_adv, y):
        objectives.append((logits_nat, logits_adv))
        return only_max_objective(q, logits_nat, logits_adv, y)
    step = make_estimator_step(estimators, trained_small_cnn, objective, attack, torch.Generator().manual_seed(0), "dv")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits_nat, logits_adv, _ = step(x, y, 0)
    x_adv = pgd_attack(trained_small_cnn, x, y, attack, torch.Generator().manual_seed(0))  # the same draw, in float32
    assert torch.equal(seen["natural"][0], x)
    pattern = seen["adversarial"][0]
    assert pattern.abs().max() <= 0.1 + 1e-6 and (pattern - (x_adv - x)).abs().mean() < 0.01, "E_a was not fed n = x~ - x"
    assert_all_float32_without_autocast(precision)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.equal(objectives[0][0].argmax(1), logits_nat.argmax(1))
    assert torch.equal(objectives[0][1].argmax(1), logits_adv.argmax(1))
    assert not torch.equal(logits_nat, logits_adv)


def test_estimator_training_never_touches_the_target_in_memory(fmnist_dir, tiny_target, tmp_path, monkeypatch):
    """Weights, buffers and gradients of the live target module are unchanged by a whole run."""
    from utils import estimator_training
    captured = {}
    original = estimator_training.load_frozen_target
    def capture(path, device):
        model, checkpoint = original(path, device)
        captured["model"], captured["state"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return model, checkpoint
    monkeypatch.setattr(estimator_training, "load_frozen_target", capture)
    train_MI_estimator.main(small_args(fmnist_dir, tiny_target, tmp_path / "est", "--epochs", "1"))
    model = captured["model"]
    assert not model.training
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, captured["state"][k]) for k, v in model.state_dict().items())


def test_resume_is_bit_identical(fmnist_dir, tiny_target, tmp_path):
    assert_resume_is_bit_identical(train_MI_estimator.main, lambda d, *extra: small_args(fmnist_dir, tiny_target, d, *extra),
                                   tmp_path, weights_key="estimators", first_leg=("--milestones", "1"))


def test_bad_input(fmnist_dir, tiny_target, tmp_path):
    script = "train_MI_estimator.py"
    run = tmp_path / "est"
    assert_one_line_error(run_script(script, small_args(fmnist_dir, tiny_target, tmp_path / "a", "--dataset", "cifar10")),
                          "does not match the target model")
    assert_one_line_error(run_script(script, small_args(fmnist_dir, tiny_target, tmp_path / "b", "--val-size", "0")),
                          "--val-size must be > 0")
    assert_one_line_error(run_script(script, small_args(fmnist_dir, tmp_path / "missing.pt", tmp_path / "c")),
                          "does not exist")
    assert run_script(script, small_args(fmnist_dir, tiny_target, run, "--epochs", "1")).returncode == 0
    # an estimators.pt is not a target model
    assert_one_line_error(run_script(script, small_args(fmnist_dir, run / "estimators.pt", tmp_path / "d")),
                          "not a trained target model")
    # resuming with estimators of another size, or another objective, is refused and damages nothing
    before = digest(run / "last.pt")
    assert_one_line_error(run_script(script, small_args(fmnist_dir, tiny_target, run, "--epochs", "2", "--resume", "--hsize", "64")),
                          "--hsize 32")
    assert_one_line_error(run_script("train_MI_estimator_only_max.py",
                                     small_args(fmnist_dir, tiny_target, run, "--epochs", "2", "--resume")), "--objective paper")
    assert digest(run / "last.pt") == before


def test_report_only_rewrites_the_report_without_training(fmnist_dir, tiny_estimators, tiny_target, tmp_path):
    run = tiny_estimators.parent
    before = digest(tiny_estimators)
    (run / "mi_report.json").unlink()
    assert train_MI_estimator.main(small_args(fmnist_dir, tiny_target, run, "--report-only")) == 0
    report = json.loads((run / "mi_report.json").read_text())
    assert report["objective"] == "paper-bounded" and set(report["all"]) == set(QUANTITIES)
    assert digest(tiny_estimators) == before, "--report-only modified the estimators"
    assert_one_line_error(run_script("train_MI_estimator.py", small_args(fmnist_dir, tiny_target, run, "--report-only",
                                                                         "--estimator-loss", "reference")),
                          "trained with the paper-bounded objective, not reference")


def test_two_process_torchrun_averages_the_estimators_and_judges_every_held_out_sample(fmnist_dir, tiny_target, tmp_path):
    """Under torchrun each process trains on its shard with averaged gradients (utils.distributed checks every
    epoch that the copies agree, and fails the run otherwise) and the held-out values of all processes are
    gathered, in the split's order, before the verdict and the report."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    train_MI_estimator_only_max.main(small_args(fmnist_dir, tiny_target, single, "--epochs", "1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train_MI_estimator_only_max.py"),
                             *small_args(fmnist_dir, tiny_target, multi, "--epochs", "1")],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((multi / "config.json").read_text())["processes"] == 2
    assert list(read_metrics(multi)[0]) == list(read_metrics(single)[0]) and len(read_metrics(multi)) == 1
    assert float(read_metrics(multi)[0]["val_En_informative"]) in (0.0, 1.0)
    report = json.loads((multi / "mi_report.json").read_text())
    assert report["informativeness"]["natural"]["n"] == 100  # every test image, not one process's half
    values, reference = numpy.load(multi / "mi_values.npz"), numpy.load(single / "mi_values.npz")
    # the target is the same, so per-image clean correctness must match the single process's, in order
    assert len(values["correct"]) == 100 and (values["correct"] == reference["correct"]).all()
    assert sorted(p.name for p in multi.iterdir() if p.name != "warnings.json") == sorted(
        p.name for p in single.iterdir() if p.name != "warnings.json")
