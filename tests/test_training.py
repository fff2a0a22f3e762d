"""The shared training engine: checkpoint selection (non-finite values never win), one validation attack
seed per run, and the BatchNorm policy of stages 1 and 3 (--bn-stats) on a small BN network."""
import copy
from argparse import Namespace

import pytest
import torch

import train_MIAT
import train_standard
import utils.namid as namid_module
import utils.training as training_module
from models import build_model
from models.estimators import build_estimators
from tests.test_train_standard import small_args
from utils.attacks import PGDConfig
from utils.losses import OBJECTIVES
from utils.training import RunDirectory, TrainingRun, make_adversarial_step

INF, NAN = float("inf"), float("nan")


# ---------------------------------------------------------------------------------------------------------
# Selection

def selection_run(tmp_path, values, mode="max", selects=True, key="score", resume=False):
    """A TrainingRun over a tiny model whose epochs report `values` as their selection key; returns the
    run and, per epoch, the weight the model had (the epoch number), to read back from best.pt."""
    model = torch.nn.Linear(1, 1, bias=False)
    args = Namespace(resume=resume, epochs=len(values), lr=0.1, milestones=[], lr_gamma=0.1, tensorboard=False)
    run = TrainingRun(RunDirectory(tmp_path / "run", resume=resume), args, "standard", model,
                      torch.optim.SGD(model.parameters(), lr=0.1), torch.Generator(), select_key=key,
                      select_mode=mode, selects=selects)

    def run_epoch(epoch):
        with torch.no_grad():
            model.weight.fill_(epoch + 1)  # best.pt then tells which epoch it holds
        return {"score": values[epoch], "other": None if values[epoch] is None else -values[epoch]}

    run.fit(run_epoch)
    return run


def best_weight(tmp_path):
    return torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]["weight"].item()


@pytest.mark.parametrize("mode,values,best_epoch", [
    ("max", [0.5, NAN, 0.4], 1),
    ("max", [0.5, INF, 0.6], 3),
    ("max", [0.5, -INF, None], 1),
    ("max", [NAN, 0.2, NAN], 2),
    ("min", [3.0, -INF, 2.0, NAN], 3),
    ("min", [-173.0, -448.0, INF], 2),
])
def test_a_non_finite_value_never_becomes_the_best_epoch(tmp_path, mode, values, best_epoch):
    run = selection_run(tmp_path, values, mode)
    assert run.best["epoch"] == best_epoch
    assert best_weight(tmp_path) == best_epoch, "best.pt holds another epoch than the best"
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["epoch"] == len(values) and last["best"]["epoch"] == best_epoch


def test_no_finite_value_writes_no_best_checkpoint(tmp_path):
    run = selection_run(tmp_path, [NAN, -INF])
    assert run.best is None and not (tmp_path / "run" / "best.pt").exists()
    assert (tmp_path / "run" / "last.pt").is_file()


def test_without_validation_data_every_epoch_replaces_the_last(tmp_path):
    run = selection_run(tmp_path, [NAN, NAN, NAN], selects=False)
    assert run.best["epoch"] == 3 and best_weight(tmp_path) == 3


def test_resuming_a_run_selected_on_another_value_starts_selection_afresh(tmp_path):
    """A run begun by a version that selected on another key (stage 2 before issue 10): its old best is
    not comparable, so the first resumed epoch with a finite value becomes the best."""
    selection_run(tmp_path, [0.9, 0.8], key="other", mode="min")  # best: epoch 1 (other = -0.9)
    run = selection_run(tmp_path, [0.9, 0.8, 0.1], key="score", resume=True)
    assert run.best["epoch"] == 3 and run.best["key"] == "score" and best_weight(tmp_path) == 3


def test_one_validation_attack_seed_for_every_epoch(fmnist_dir, tmp_path, monkeypatch):
    """The best epoch must be chosen on model change, not on a new draw of the attack's random start."""
    seeds = []
    original = training_module.evaluate
    def spy(*args, seed, **kwargs):
        seeds.append(seed)
        return original(*args, seed=seed, **kwargs)
    monkeypatch.setattr(training_module, "evaluate", spy)
    train_standard.main(small_args(fmnist_dir, tmp_path / "run", "--epochs", "3", "--seed", "4"))
    assert len(seeds) == 6 and set(seeds) == {seeds[0]}, seeds


# ---------------------------------------------------------------------------------------------------------
# BatchNorm running statistics (--bn-stats)

def bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def bn_setup():
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 1, 28, (0.5,), (0.5,), width=4)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    x_adv = (x + 0.1 * torch.rand_like(x).sign()).clamp(0, 1)
    return model, x, y, x_adv


def expected_buffers(model, x, x_adv, clean_updates: bool):
    """Running statistics after train-mode forwards on x (if it updates them) and then x~, by hand."""
    reference = copy.deepcopy(model).train()
    with torch.no_grad():
        if clean_updates:
            reference(x)
        reference(x_adv)
    return bn_buffers(reference)


@pytest.mark.parametrize("stage", ["standard", "namid"])
@pytest.mark.parametrize("base_loss", ["at", "trades"])
@pytest.mark.parametrize("policy", ["base", "mixed"])
def test_bn_running_statistics_follow_the_policy(stage, base_loss, policy, monkeypatch):
    """base: the statistics see the batches the base loss trains on (AT: x~ only; TRADES: x and x~), in
    both stages, so NAMID's extra clean forward changes nothing; mixed: x and x~ in every run."""
    model, x, y, x_adv = bn_setup()
    module = training_module if stage == "standard" else namid_module
    monkeypatch.setattr(module, "pgd_attack", lambda *args, **kwargs: x_adv)
    objective = OBJECTIVES[base_loss]
    attack = objective.training_attack(PGDConfig("linf", 0.1, 0.025, 2))
    clean_updates = base_loss == "trades" or policy == "mixed"
    expected = expected_buffers(model, x, x_adv, clean_updates)
    if stage == "standard":
        step = make_adversarial_step(model, objective, lambda index: attack, 6.0, None, bn_stats=policy)
    else:
        estimators = build_estimators(1, 10, 16).eval().requires_grad_(False)
        step = namid_module.make_namid_step(model, estimators, objective, lambda index: attack, None, beta=6.0,
                                            alpha=5.0, lam=0.1, measure="dv", bn_stats=policy)
    loss, logits_nat, logits_adv, _ = step(x, y, 0)
    after = bn_buffers(model)
    assert after.keys() == expected.keys() and len(after) > 10
    for key in expected:
        assert torch.allclose(after[key].float(), expected[key].float(), rtol=0, atol=1e-6), key
    assert torch.isfinite(loss)
    if stage == "namid" or clean_updates:
        assert logits_nat is not None and logits_nat.shape == (8, 10)


def test_the_policy_reaches_both_stages_with_its_documented_defaults(fmnist_dir, tiny_estimators, tmp_path, monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def capture(name):
        def fake(*args, bn_stats, **kwargs):
            seen[name] = bn_stats
            raise Stop
        return fake
    monkeypatch.setattr(train_standard, "make_adversarial_step", capture("standard"))
    monkeypatch.setattr(train_MIAT, "make_namid_step", capture("namid"))
    for name, main, argv in [
            ("standard", train_standard.main, small_args(fmnist_dir, tmp_path / "a")),
            ("namid", train_MIAT.main, ["--estimators", str(tiny_estimators), "--allow-uninformative-estimators", *small_args(fmnist_dir, tmp_path / "b")[2:]]),
            ("namid", train_MIAT.main, ["--estimators", str(tiny_estimators), "--allow-uninformative-estimators", "--preset", "reference", "--arch", "small-cnn",
                                        *small_args(fmnist_dir, tmp_path / "c")[2:]]),
            ("standard", train_standard.main, small_args(fmnist_dir, tmp_path / "d", "--bn-stats", "mixed"))]:
        with pytest.raises(Stop):
            main(argv)
        expected = "mixed" if ("reference" in argv or "mixed" in argv) else "base"
        assert seen.pop(name) == expected, argv
