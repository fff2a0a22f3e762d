"""Stage 3: the NAMID loss by hand, its gradients and ablations, the step's cost rule, and train_MIAT.py end to end."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import train_MIAT
from models import build_model
from models.estimators import build_estimators
from tests.conftest import REPO
from tests.helpers import (assert_all_float32_without_autocast, assert_one_line_error, assert_resume_is_bit_identical,
                           digest, read_metrics, record_estimator_precision, record_local_inputs, run_script)
from utils.attacks import PGDConfig
from utils.losses import OBJECTIVES
from utils.mi import mi_estimate
from utils.namid import alpha_schedule, make_namid_step, namid_mi_loss, namid_step_mi
from utils.training import training_attack_schedule

Q = {"nat_mi_clean": torch.tensor([1.0, 2.0, 3.0, 4.0]), "nat_mi_adv": torch.tensor([0.5, 1.0, -1.0, 2.0]),
     "adv_mi_adv": torch.tensor([2.0, 0.0, 1.0, 1.0]), "adv_mi_clean": torch.tensor([1.0, 1.0, 0.5, 3.0])}
SELECTED = torch.tensor([True, False, True, True])


def hand_cosine(a, b):
    return sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))


def test_namid_loss_by_hand():
    pick = lambda name: [Q[name][i].item() for i in (0, 2, 3)]
    nat = 1 - hand_cosine(pick("nat_mi_adv"), pick("nat_mi_clean"))
    adv = 1 - hand_cosine(pick("adv_mi_adv"), pick("adv_mi_clean"))
    gap = sum(a - n for a, n in zip(pick("adv_mi_adv"), pick("nat_mi_adv"))) / 3
    loss, terms = namid_mi_loss(Q, SELECTED, lam=0.1)
    assert loss.item() == pytest.approx(nat + adv + 0.1 * gap, rel=1e-6)
    assert terms["mi_nat_cos"].item() == pytest.approx(nat, rel=1e-6)
    assert terms["mi_adv_cos"].item() == pytest.approx(adv, rel=1e-6)
    assert terms["mi_gap"].item() == pytest.approx(gap, rel=1e-6)


def test_empty_selection_contributes_zero_not_nan():
    loss, terms = namid_mi_loss(Q, torch.zeros(4, dtype=torch.bool), lam=0.1)
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in terms.values())


@pytest.mark.parametrize("switch", ["no_nat", "no_adv", "lambda0"])
def test_each_ablation_removes_exactly_its_term(switch):
    full, terms = namid_mi_loss(Q, SELECTED, lam=0.1)
    kwargs = {"lam": 0.0 if switch == "lambda0" else 0.1, "use_nat": switch != "no_nat", "use_adv": switch != "no_adv"}
    ablated, _ = namid_mi_loss(Q, SELECTED, **kwargs)
    removed = {"no_nat": terms["mi_nat_cos"], "no_adv": terms["mi_adv_cos"], "lambda0": 0.1 * terms["mi_gap"]}[switch]
    assert ablated.item() == pytest.approx(full.item() - removed.item(), rel=1e-6)
    assert removed.item() != 0


def small_setup(hsize=16, seed=0):
    torch.manual_seed(seed)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,))
    with torch.no_grad():  # SmallCNN's last layer starts at zero (TRADES init): give it some signal
        model.net.classifier.fc3.weight.normal_(0, 0.1)
    estimators = build_estimators(1, 10, hsize).eval().requires_grad_(False)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    return model, estimators, x, y


def test_gradient_reaches_the_target_and_not_the_estimators():
    model, estimators, x, y = small_setup()
    logits_nat, logits_adv = model(x), model((x + 0.1).clamp(0, 1))
    local_nat, local_adv = (e.encode_local(u) for e, u in ((estimators["natural"], x), (estimators["adversarial"], x * 0)))
    # a selection where every sample counts: labels equal the clean prediction, adversarial labels differ
    y = logits_nat.argmax(1)
    logits_adv = logits_adv + 100 * torch.nn.functional.one_hot((y + 1) % 10, 10)
    loss, terms = namid_step_mi(estimators, local_nat, local_adv, logits_nat, logits_adv, y, "dv", 0.1, True, True)
    assert terms["selected"].item() == 16
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert all(p.grad is None for p in estimators.parameters())


@pytest.mark.parametrize("base_loss", ["at", "trades", "mart"])
def test_step_runs_the_target_forward_exactly_twice_and_uses_the_base_loss(base_loss, monkeypatch):
    model, estimators, x, y = small_setup()
    calls, configs = [], []
    model.register_forward_hook(lambda module, inputs, output: calls.append(module.training))
    import utils.namid as namid_module
    original = namid_module.pgd_attack
    def spy(m, xx, yy, config, generator):
        configs.append(config)
        return original(m, xx, yy, config, generator)
    monkeypatch.setattr(namid_module, "pgd_attack", spy)
    objective = OBJECTIVES[base_loss]
    attack = objective.training_attack(PGDConfig("linf", 0.1, 0.025, 3))
    step = make_namid_step(model, estimators, objective, lambda index: attack, torch.Generator().manual_seed(0),
                           beta=6.0, alpha=5.0, lam=0.1, measure="dv")
    loss, logits_nat, logits_adv, extras = step(x, y, 0)
    assert calls.count(True) == 2, f"train-mode forwards: {calls.count(True)}"
    assert configs[0].loss == {"at": "ce", "trades": "kl", "mart": "ce"}[base_loss]
    expected_base = objective.loss(logits_nat, logits_adv, y, 6.0)
    assert extras["base_loss"].item() == pytest.approx(expected_base.item(), rel=1e-6)
    assert loss.item() == pytest.approx(expected_base.item() + 5.0 * extras["mi_loss"].item(), rel=1e-5)


def spy_on_attack(monkeypatch, module):
    """Record every adversarial batch the step's PGD returns."""
    crafted = []
    original = module.pgd_attack
    def spy(m, xx, yy, config, generator):
        crafted.append(original(m, xx, yy, config, generator))
        return crafted[-1]
    monkeypatch.setattr(module, "pgd_attack", spy)
    return crafted


def test_wmim_maximises_the_mi_of_the_adversarial_image_with_its_logits(monkeypatch):
    import utils.namid as namid_module
    model, estimators, x, y = small_setup()
    crafted = spy_on_attack(monkeypatch, namid_module)
    objective = OBJECTIVES["at"]
    step = make_namid_step(model, estimators, objective, lambda index: PGDConfig("linf", 0.1, 0.025, 3),
                           torch.Generator().manual_seed(0), beta=6.0, alpha=2.0, lam=0.0, measure="dv", mi_mode="wmim")
    loss, logits_nat, logits_adv, extras = step(x, y, 0)
    natural = estimators["natural"]
    with torch.no_grad():
        expected = -mi_estimate(natural, natural.encode_local(crafted[0]), logits_adv).mean()
        on_clean = -mi_estimate(natural, natural.encode_local(x), logits_nat).mean()
    assert extras["mi_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert extras["mi_loss"].item() != pytest.approx(on_clean.item(), rel=1e-3), "WMIM read the clean image"
    assert loss.item() == pytest.approx(extras["base_loss"].item() + 2.0 * expected.item(), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_step_feeds_the_image_to_the_natural_estimator_and_the_pattern_to_the_adversarial_one(monkeypatch):
    import utils.namid as namid_module
    model, estimators, x, y = small_setup()
    crafted = spy_on_attack(monkeypatch, namid_module)
    seen = record_local_inputs(estimators)
    step = make_namid_step(model, estimators, OBJECTIVES["at"], lambda index: PGDConfig("linf", 0.1, 0.025, 3),
                           torch.Generator().manual_seed(0), beta=6.0, alpha=5.0, lam=0.1, measure="dv")
    step(x, y, 0)
    assert len(seen["natural"]) == 1 and len(seen["adversarial"]) == 1
    assert torch.equal(seen["natural"][0], x)
    assert torch.allclose(seen["adversarial"][0], crafted[0] - x, atol=1e-7)
    assert seen["adversarial"][0].abs().max() <= 0.1 + 1e-6, "E_a was fed the adversarial image, not n = x~ - x"


def test_step_runs_the_estimators_in_float32_under_bf16_autocast(monkeypatch):
    """--amp (CPU bf16 autocast stands in for CUDA's): the target may run in bf16, the estimators must not."""
    model, estimators, x, y = small_setup()
    seen = record_estimator_precision(estimators)
    step = make_namid_step(model, estimators, OBJECTIVES["at"], lambda index: PGDConfig("linf", 0.1, 0.025, 2),
                           torch.Generator().manual_seed(0), beta=6.0, alpha=5.0, lam=0.1, measure="dv")
    y = model(x).argmax(1)  # correct when clean, so that X' is not empty
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logits_nat, _, extras = step(x, y, 0)
    assert logits_nat.dtype == torch.bfloat16, "the test needs the target itself to run under autocast"
    assert extras["selected"].item() > 0
    assert_all_float32_without_autocast(seen)
    assert extras["mi_loss"].dtype == torch.float32


# ---------------------------------------------------------------------------------------------------------
# Stabilisers: alpha warm-up and a minimum size of X'


def test_adversarial_epochs_and_the_alpha_ramp_by_hand():
    schedule = training_attack_schedule(PGDConfig("linf", 0.1, 0.025, 3), epoch=0, batches_per_epoch=4, warmup_epochs=1,
                                        ramp_epochs=0)
    assert schedule(3) is None and schedule.adversarial_epochs(3) == 0.0  # clean warm-up: no adversarial epoch yet
    schedule = training_attack_schedule(PGDConfig("linf", 0.1, 0.025, 3), 2, 4, 1, 0)
    assert [schedule.adversarial_epochs(i) for i in range(4)] == [1.25, 1.5, 1.75, 2.0]
    alpha_at = alpha_schedule(5.0, 2)
    assert [alpha_at(e) for e in (0.0, 0.5, 1.25, 2.0, 7.0)] == [0.0, 1.25, 3.125, 5.0, 5.0]
    assert alpha_schedule(5.0, 0)(0.0) == 5.0  # the paper's constant alpha


def ramped_schedule(adversarial_epochs):
    schedule = lambda index: PGDConfig("linf", 0.1, 0.025, 2)  # noqa: E731
    schedule.adversarial_epochs = lambda index: adversarial_epochs
    return schedule


@pytest.mark.parametrize("elapsed,weight", [(0.5, 1.25), (4.0, 5.0)])
def test_the_step_weights_l_mi_by_the_ramped_alpha(elapsed, weight):
    model, estimators, x, y = small_setup()
    y = model(x).argmax(1)  # correct when clean, so that X' is not empty
    step = make_namid_step(model, estimators, OBJECTIVES["at"], ramped_schedule(elapsed), torch.Generator().manual_seed(0),
                           beta=6.0, alpha=5.0, lam=0.1, measure="dv", alpha_warmup_epochs=2)
    loss, _, _, extras = step(x, y, 0)
    assert extras["selected"].item() > 0 and extras["mi_loss"].abs().item() > 0
    assert extras["alpha"].item() == weight
    assert loss.item() == pytest.approx((extras["base_loss"] + weight * extras["mi_loss"]).item(), rel=1e-5)


def test_l_mi_is_off_in_batches_whose_selection_is_smaller_than_min_selected():
    model, estimators, x, y = small_setup()
    logits_nat, logits_adv = model(x), model((x + 0.1).clamp(0, 1))
    local_nat, local_adv = (e.encode_local(u) for e, u in ((estimators["natural"], x), (estimators["adversarial"], x - 0.5)))
    y = logits_nat.argmax(1)
    fooled = torch.arange(16) < 5  # exactly 5 samples in X'
    logits_adv = logits_adv + 100 * torch.nn.functional.one_hot(torch.where(fooled, (y + 1) % 10, y), 10)
    for minimum, active in ((1, True), (5, True), (6, False)):
        loss, terms = namid_step_mi(estimators, local_nat, local_adv, logits_nat, logits_adv, y, "dv", 0.1, True, True,
                                    min_selected=minimum)
        assert terms["selected"].item() == 5
        assert (loss.abs().item() > 0) == active and loss.requires_grad == active, minimum


class _Stop(Exception):
    pass


def test_each_torchrun_process_puts_the_estimators_and_the_target_on_its_own_device(monkeypatch, tiny_estimators, tmp_path):
    """Under torchrun on a 4-GPU node, rank 2 owns cuda:2: the estimators must be loaded there, on the
    device the training loop puts the target on (simulated: no GPU is needed to check the choice)."""
    from utils import distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda *a, **k: None)
    for name in ("auto", "cuda", "cuda:0"):
        assert distributed.process_device(name) == torch.device("cuda", 2), name
    assert distributed.setup("auto") == torch.device("cuda", 2)
    seen = {}
    def load(path, device):
        seen["estimators"] = device
        raise _Stop
    monkeypatch.setattr(train_MIAT, "load_estimators", load)
    with pytest.raises(_Stop):
        train_MIAT.main(["--estimators", str(tiny_estimators), "--device", "cuda", "--model-dir", str(tmp_path / "r")])
    assert seen["estimators"] == torch.device("cuda", 2)
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.process_device("cpu") == torch.device("cpu")


def test_report_only_refuses_torchrun(tiny_target, tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    result = subprocess.run([sys.executable, str(REPO / "train_MI_estimator.py"), "--target-model", str(tiny_target),
                             "--report-only", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert_one_line_error(result, "runs as a single process")


# ---------------------------------------------------------------------------------------------------------
# train_MIAT.py end to end

def small_args(fmnist_dir, estimators, model_dir, *extra):
    return ["--estimators", str(estimators), "--data-dir", str(fmnist_dir), "--train-limit", "300", "--val-size", "100",
            "--test-limit", "100", "--batch-size", "50", "--num-steps", "2", "--eval-steps", "2", "--warmup-epochs", "0",
            "--eps-ramp-epochs", "0", "--device", "cpu", "--model-dir", str(model_dir),
            "--allow-uninformative-estimators", *extra]  # 1-epoch estimators; the refusal: test_informativeness.py


NAMID_COLUMNS = ["epoch", "lr", "train_loss", "base_loss", "mi_loss", "mi_nat_cos", "mi_adv_cos", "mi_gap", "selected", "alpha",
                 "train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc", "test_clean_acc", "test_pgd_acc", "seconds"]


def test_end_to_end_writes_every_output(fmnist_dir, tiny_estimators, tmp_path):
    model_dir = tmp_path / "namid"
    before = digest(tiny_estimators)
    assert train_MIAT.main(small_args(fmnist_dir, tiny_estimators, model_dir, "--epochs", "2", "--base-loss", "trades")) == 0
    # warnings.json too when the 1-epoch estimators are not judged informative (--allow-uninformative-estimators)
    assert sorted(p.name for p in model_dir.iterdir() if p.name != "warnings.json") == ["best.pt", "config.json", "last.pt", "metrics.csv"]
    assert digest(tiny_estimators) == before
    config = json.loads((model_dir / "config.json").read_text())
    args = config["args"]
    assert config["stage"] == "namid" and args["base_loss"] == "trades" and args["mi_mode"] == "namid"
    assert args["alpha"] == 5.0 and args["lam"] == pytest.approx(0.1) and args["dataset"] == "fashion-mnist"
    assert config["estimator_spec"]["hsize"] == 32 and config["train_attack"]["loss"] == "kl"
    rows = read_metrics(model_dir)
    assert list(rows[0]) == NAMID_COLUMNS and len(rows) == 2
    for row in rows:
        assert all(row[key] not in ("", "nan") for key in NAMID_COLUMNS)
        # |X'| per batch of 50 (the training split is whole batches of 50) against the accuracies of the very
        # logits it is selected from: C - A <= |correct and fooled| <= min(C, 50 - A), averaged over batches
        clean, adv, selected = (float(row[k]) for k in ("train_clean_acc", "train_adv_acc", "selected"))
        assert 50 * (clean - adv) - 1e-3 <= selected <= 50 * min(clean, 1 - adv) + 1e-3, row
    assert any(float(row["selected"]) > 0 for row in rows)
    best = torch.load(model_dir / "best.pt", weights_only=True)
    assert best["stage"] == "namid" and best["model_spec"]["arch"] == "small-cnn"


def test_wmim_and_ablations_run(fmnist_dir, tiny_only_max_estimators, tiny_estimators, tmp_path):
    assert train_MIAT.main(small_args(fmnist_dir, tiny_only_max_estimators, tmp_path / "wmim", "--epochs", "1",
                                      "--mi-mode", "wmim")) == 0
    assert "mi_wmim" in read_metrics(tmp_path / "wmim")[0]
    assert train_MIAT.main(small_args(fmnist_dir, tiny_estimators, tmp_path / "abl", "--epochs", "1", "--no-adv-mi",
                                      "--lambda", "0")) == 0
    row = read_metrics(tmp_path / "abl")[0]
    assert float(row["mi_adv_cos"]) == 0.0 and float(row["mi_gap"]) == 0.0


def test_resume_is_bit_identical(fmnist_dir, tiny_estimators, tmp_path):
    assert_resume_is_bit_identical(train_MIAT.main, lambda d, *extra: small_args(fmnist_dir, tiny_estimators, d, *extra),
                                   tmp_path)


def test_two_process_torchrun_matches_the_single_process_metrics_shape(fmnist_dir, tiny_estimators, tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    train_MIAT.main(small_args(fmnist_dir, tiny_estimators, single, "--epochs", "1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train_MIAT.py"), *small_args(fmnist_dir, tiny_estimators, multi, "--epochs", "1")],
                            cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list(read_metrics(multi)[0]) == list(read_metrics(single)[0]) and len(read_metrics(multi)) == 1
    assert json.loads((multi / "config.json").read_text())["processes"] == 2
    assert sorted(p.name for p in multi.iterdir() if p.name != "warnings.json") == ["best.pt", "config.json", "last.pt", "metrics.csv"]


def test_bad_input(fmnist_dir, tiny_estimators, tiny_target, tmp_path):
    assert_one_line_error(run_script("train_MIAT.py", small_args(fmnist_dir, tiny_target, tmp_path / "a")), "is not an estimators.pt")
    assert_one_line_error(run_script("train_MIAT.py", small_args(fmnist_dir, tiny_estimators, tmp_path / "b", "--arch", "resnet18")),
                          "logits of a small-cnn, not a resnet18")
    assert_one_line_error(run_script("train_MIAT.py", small_args(fmnist_dir, tiny_estimators, tmp_path / "c", "--norm", "l2")),
                          "trained under linf, not --norm l2")
    assert_one_line_error(run_script("train_MIAT.py", small_args(fmnist_dir, tiny_estimators, tmp_path / "d", "--dataset", "mnist")),
                          "trained on fashion-mnist, not --dataset mnist")
    assert_one_line_error(run_script("train_MIAT.py", small_args(fmnist_dir, tiny_estimators, tmp_path / "e", "--alpha=-1")), "--alpha")
