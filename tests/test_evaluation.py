"""Stage 4: every attack's threat model and effect, thresholding, worst case, side effects, the tables,
and test_comparison.py end to end with its bad inputs.

PGD's agreement with torchattacks' PGD (within 1 point) is tested in tests/test_attacks.py.
"""
import copy
import csv
import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import test_comparison
import train_standard
from tests.conftest import REPO
from tests.test_train_standard import SMALL_RUN
from utils.advertorch_compat import advertorch_attacks, zero_gradients
from utils.attacks import PGDConfig, pgd_attack
from utils.data import dataset_info
from utils.errors import run_main
from utils.evaluation import (Attack, AttackOutput, AttackResult, ModelSnapshot, attack_seed, batch_seed, build_attacks,
                              isolated_rng, markdown_table, run_attack, run_transfer, sanity_warnings, table_columns,
                              threshold_minimum_norm, worst_case)
from utils.run_warnings import read_warnings

INFO = dataset_info("fashion-mnist")
# Few steps, for the tests that check side effects rather than strength.
QUICK = ["--pgd-steps", "2", "--pgd-l2-steps", "2", "--fwa-steps", "2", "--tidim-steps", "2", "--cw-steps", "2",
         "--cw-search-steps", "1", "--ddn-steps", "2"]


def attack_settings(*extra):
    args = test_comparison.build_parser().parse_args(["--checkpoints", "unused.pt", *extra])
    return test_comparison.resolve_settings(args, INFO)


def attacks_by_name(*extra, names=("pgd", "aa", "fwa", "tidim", "pgd-l2", "cw", "ddn")):
    return {a.name: a for a in build_attacks(list(names), attack_settings(*extra), INFO.num_classes)}


def loader_of(x, y, batch_size):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def global_rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def assert_same_rng(before, after):
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])


# ----------------------------------------------------------------------------------------------
# Each attack on the briefly trained SmallCNN: threat model on every returned batch, effect, side effects

# Default settings (docs/method.md section 7), except AutoAttack's epsilon: at 0.2 APGD-CE breaks every image, so
# APGD-T, FAB-T and Square are skipped (each costs ~20 s on CPU for a single surviving image; they run
# in full on a tiny network in test_no_attack_leaves_gradients_bn_statistics_or_rng_changes_behind).
@pytest.mark.parametrize("name,count,extra", [("pgd", 32, []), ("aa", 16, ["--epsilon", "0.2"]), ("fwa", 16, []),
                                              ("tidim", 32, []), ("pgd-l2", 32, []), ("cw", 32, []), ("ddn", 32, [])])
def test_attack_respects_its_threat_model_and_lowers_accuracy(trained_small_cnn, fmnist_batches, name, count, extra):
    _, _, x, y = fmnist_batches
    x, y = x[:count], y[:count]
    model = trained_small_cnn
    for p in model.parameters():
        p.grad = None  # the fixture's training leaves gradients behind
    attack = attacks_by_name(*extra, names=(name,))[name]
    before = global_rng_states()
    result = run_attack(model, attack, loader_of(x, y, count // 2), torch.device("cpu"), False, 0, desc=name)
    assert_same_rng(before, global_rng_states())
    assert result.budget.batches == 2 and result.budget.violating_batches == 0, vars(result.budget)
    assert result.budget.max_value <= attack.bound * (1 + 1e-5) + 1e-6
    assert 0 <= result.budget.min_pixel and result.budget.max_pixel <= 1
    assert result.side_effects == [] and result.nan_batches == 0
    clean = accuracy(model, x, y)
    assert result.accuracy < clean, f"{name} did not lower accuracy: clean {clean:.3f}, attacked {result.accuracy:.3f}"
    if attack.minimum_norm:
        unthresholded = result.unthresholded_robust.float().mean().item()
        assert unthresholded <= result.accuracy, "thresholding can only give robustness back"


def test_thresholding_of_minimum_norm_results_by_hand():
    x = torch.zeros(3, 1, 2, 2)
    x_adv = x.clone()
    x_adv[:, 0, 0, 0] = torch.tensor([0.45, 0.5, 0.7])  # L2 norms 0.45, 0.5, 0.7
    kept = threshold_minimum_norm(x, x_adv, 0.5)
    assert torch.equal(kept[:2], x_adv[:2]) and torch.equal(kept[2], x[2])

    class SumClassifier(nn.Module):  # class 1 once the pixel sum exceeds 0.4, class 0 otherwise
        def __init__(self):
            super().__init__()
            self.unused = nn.Parameter(torch.zeros(1))

        def forward(self, images):
            s = images.flatten(1).sum(1)
            return torch.stack([0.4 - s, s - 0.4], dim=1)

    attack = Attack("cw", "CW (L2)", "l2", 0.5, {},
                    lambda model, xs, ys, g: AttackOutput(threshold_minimum_norm(xs, x_adv, 0.5), unthresholded=x_adv),
                    minimum_norm=True)
    result = run_attack(SumClassifier(), attack, loader_of(x, torch.zeros(3, dtype=torch.long), 3), torch.device("cpu"),
                        False, 0, desc="hand")
    assert result.robust.tolist() == [False, False, True]
    assert result.unthresholded_robust.tolist() == [False, False, False]
    assert result.budget.violating_batches == 0 and result.budget.max_value == pytest.approx(0.5)


def small_bn_network():
    """A tiny random network with BatchNorm (SmallCNN has none); small enough for AutoAttack's
    900 targeted iterations and 5000 Square queries on the points it cannot break."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                         nn.Flatten(), nn.Linear(64, 10))


def test_no_attack_leaves_gradients_bn_statistics_or_rng_changes_behind(fmnist_batches):
    """On a network with BatchNorm, in train mode: every attack must run it in eval mode with frozen
    parameters and restore everything."""
    _, _, x, y = fmnist_batches
    model = small_bn_network().train()
    snapshot = ModelSnapshot(model)
    attacks = attacks_by_name(*QUICK)
    for name, attack in attacks.items():
        before = global_rng_states()
        with isolated_rng(attack_seed(0, name), torch.device("cpu")):
            output = attack.craft(model, x[:4], y[:4], torch.Generator().manual_seed(0))
        assert_same_rng(before, global_rng_states())
        assert output.x_adv.shape == x[:4].shape and not output.x_adv.requires_grad
        assert snapshot.problems(model) == [], f"{name} left {snapshot.problems(model)}"
    assert model.training


def test_side_effects_of_a_misbehaving_attack_are_reported_and_undone(fmnist_batches):
    _, _, x, y = fmnist_batches
    model = small_bn_network().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}

    def careless(m, xs, ys, generator):  # trains on the batch: BN statistics move, gradients stay
        m.train()
        nn.functional.cross_entropy(m(xs), ys).backward()
        return AttackOutput(xs)

    attack = Attack("pgd", "careless", "linf", 0.1, {}, careless)
    result = run_attack(model, attack, loader_of(x[:8], y[:8], 8), torch.device("cpu"), False, 0, desc="careless")
    assert any("gradients" in p for p in result.side_effects) and any("BN" in p for p in result.side_effects)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and not model.training
    assert all(p.grad is None for p in model.parameters())
    warnings = sanity_warnings("M", result, {"pgd": result}, {"pgd": attack})
    assert any("left parameter gradients" in line for line in warnings)


def test_seeded_attacks_are_reproducible(trained_small_cnn, fmnist_batches):
    _, _, x, y = fmnist_batches
    attack = attacks_by_name("--tidim-steps", "3", names=("tidim",))["tidim"]
    runs = [run_attack(trained_small_cnn, attack, loader_of(x[:16], y[:16], 8), torch.device("cpu"), False, 5, "t")
            for _ in range(2)]
    assert torch.equal(runs[0].robust, runs[1].robust)


def perturbed_copy(model, scale, seed):
    """Another model close to `model` (its weights plus Gaussian noise): adversarials partly transfer."""
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return other.eval()


def test_transfer_crafts_on_the_surrogate_and_checks_the_budget(trained_small_cnn, fmnist_batches):
    _, _, x, y = fmnist_batches
    x, y = x[:32], y[:32]
    surrogate = trained_small_cnn
    other = perturbed_copy(surrogate, 0.5, seed=0)
    attack = build_attacks(["transfer"], attack_settings("--pgd-steps", "10"), 10)[0]
    seed = 0
    results = run_transfer(surrogate, [surrogate, other], attack, loader_of(x, y, 16), torch.device("cpu"), False, seed)
    assert len(results) == 2 and results[0].budget.violating_batches == 0
    # Every row sees the very adversarials PGD crafts on the surrogate with the transfer attack's seed.
    crafted = torch.cat([pgd_attack(surrogate, xb, yb, PGDConfig("linf", INFO.epsilon_linf, INFO.epsilon_linf / 4, 10),
                                    torch.Generator().manual_seed(batch_seed(seed, index)))
                         for index, (xb, yb) in enumerate(zip(x.split(16), y.split(16)))])
    for model, result in zip((surrogate, other), results):
        with torch.no_grad():
            assert torch.equal(result.robust, model(crafted).argmax(1) == y)
    # On the surrogate itself it is white-box PGD; on the other model it is weaker than white-box PGD there
    # (crafting on the target instead of the surrogate would make the two equal).
    assert results[0].accuracy < accuracy(surrogate, x, y) - 0.2
    white_box = accuracy(other, pgd_attack(other, x, y, PGDConfig("linf", INFO.epsilon_linf, INFO.epsilon_linf / 4, 10),
                                           torch.Generator().manual_seed(seed)), y)
    assert results[1].accuracy > white_box, (results[1].accuracy, white_box)


def test_autoattack_shows_its_progress_and_reports_its_own_warnings(trained_small_cnn, fmnist_batches, capsys,
                                                                     monkeypatch):
    """AutoAttack can run for many minutes on one batch: each of its attacks and the robust accuracy after it
    reach the terminal, and a warning of its own checks reaches the evaluation's warnings."""
    import importlib
    from utils import evaluation
    _, _, x, y = fmnist_batches
    attack = attacks_by_name("--epsilon", "0.2", names=("aa",))["aa"]  # APGD-CE breaks every image at 0.2
    result = run_attack(trained_small_cnn, attack, loader_of(x[:8], y[:8], 8), torch.device("cpu"), False, 0, desc="aa")
    err = capsys.readouterr().err
    assert "AA: running apgd-ce" in err and "AA: robust accuracy after APGD-CE: 0.00%" in err, err
    assert result.notes == []
    checks = importlib.import_module(evaluation.autoattack_module() + ".checks")
    def randomized(*args, logger=None, **kwargs):  # as AutoAttack's check does on a randomized model
        logger.warning("it seems to be a randomized defense!")
    monkeypatch.setattr(checks, "check_randomized", randomized)
    result = run_attack(trained_small_cnn, attack, loader_of(x[:8], y[:8], 8), torch.device("cpu"), False, 0, desc="aa")
    assert result.notes == ["AutoAttack warns: it seems to be a randomized defense!"]
    clean = AttackResult(torch.ones(8, dtype=torch.bool), 0.0)
    assert "M: AA: AutoAttack warns: it seems to be a randomized defense!" in sanity_warnings("M", clean, {"aa": result},
                                                                                               {"aa": attack})


def test_autoattack_runs_the_standard_version_exactly(trained_small_cnn, fmnist_batches, monkeypatch):
    """What reaches AutoAttack's reference code when it starts: version standard, the four standard
    attacks, 100 iterations, 5000 Square queries, the run's epsilon and seed, one batch per call."""
    from utils import evaluation
    real_class, module_name = evaluation.autoattack_class()
    seen = {}

    class Recording(real_class):
        def run_standard_evaluation(self, x_orig, y_orig, batch_size=250, **kwargs):
            seen.update(version=self.version, norm=self.norm, eps=self.epsilon, seed=self.seed,
                        attacks=list(self.attacks_to_run), batch_size=batch_size, training=self.model.training,
                        apgd=(self.apgd.n_iter, self.apgd.n_restarts, self.apgd.eps, self.apgd.eot_iter),
                        apgd_t=(self.apgd_targeted.n_iter, self.apgd_targeted.n_restarts,
                                self.apgd_targeted.n_target_classes, self.apgd_targeted.eps),
                        fab=(self.fab.n_iter, self.fab.n_restarts, self.fab.n_target_classes, self.fab.eps),
                        square=(self.square.n_queries, self.square.n_restarts, self.square.eps),
                        logits=self.model(x_orig).dtype)
            return x_orig.clone()

    monkeypatch.setattr(evaluation, "autoattack_class", lambda: (Recording, module_name))
    attack = attacks_by_name(names=("aa",))["aa"]
    _, _, x, y = fmnist_batches
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as --amp on CUDA: Square fails on bf16 logits
        attack.craft(trained_small_cnn, x[:8], y[:8], None)
    eps = INFO.epsilon_linf
    assert seen == {"version": "standard", "norm": "Linf", "eps": eps, "seed": attack_seed(0, "aa"),
                    "attacks": ["apgd-ce", "apgd-t", "fab-t", "square"], "batch_size": 8, "training": False,
                    "apgd": (100, 1, eps, 1), "apgd_t": (100, 1, 9, eps), "fab": (100, 1, 9, eps),
                    "square": (5000, 1, eps), "logits": torch.float32}
    assert attack.settings["version"] == "standard" and attack_settings().aa_version == "standard"


# ----------------------------------------------------------------------------------------------
# Worst case, warnings, tables, labels

def test_worst_case_is_the_and_over_a_threat_models_attacks():
    t, f = True, False
    clean = torch.tensor([t, t, t, t, f])
    robust = {"pgd": torch.tensor([t, t, f, t, t]), "aa": torch.tensor([t, f, t, t, t]),
              "fwa": torch.tensor([f, f, f, f, f]), "cw": torch.tensor([t, t, t, f, t])}
    worst = worst_case(clean, robust)
    assert set(worst) == {"linf", "l2"}  # fwa is its own threat model: no worst-case column
    assert worst["linf"][0].tolist() == [t, f, f, t, f] and worst["linf"][1] == ["pgd", "aa"]
    assert worst["l2"][0].tolist() == [t, t, t, f, f] and worst["l2"][1] == ["cw"]


def test_sanity_warnings_fire_on_suspicious_numbers():
    from utils.evaluation import AttackResult, BudgetCheck
    t, f = True, False
    clean = AttackResult(torch.tensor([t, f, f, t]), 0.0)
    pgd = AttackResult(torch.tensor([t, t, t, t]), 0.0, BudgetCheck(0.1, "L-inf norm", 0.2, 3, 1))
    transfer = AttackResult(torch.tensor([f, f, f, t]), 0.0, nan_batches=1)
    attacks = {name: Attack(name, name.upper(), "linf", 0.1, {}, None) for name in ("pgd", "transfer")}
    lines = sanity_warnings("M", clean, {"pgd": pgd, "transfer": transfer}, attacks)
    assert any("above clean accuracy" in line and "2 examples" in line for line in lines)
    assert any("outside its budget in 1 of 3 batches (max L-inf norm 0.2" in line for line in lines)
    assert any("black-box transfer attack" in line and "beats" in line for line in lines)
    assert any("NaN" in line for line in lines)
    assert all("\n" not in line for line in lines)


def test_sanity_warnings_name_a_model_at_chance_and_pgd_outdone_by_a_stronger_attack():
    from utils.evaluation import AttackResult
    labels = torch.arange(20) % 10
    flags = lambda correct: torch.arange(20) < correct  # noqa: E731  the first `correct` of 20 examples
    attacks = {name: Attack(name, name.upper(), "linf", 0.1, {}, None) for name in ("pgd", "aa", "pgd-label-mi")}
    at_chance = AttackResult(flags(2), 0.0, labels=labels)  # 10 %, ten classes
    assert any("near chance (10%)" in line for line in sanity_warnings("M", at_chance, {}, attacks))
    trained = AttackResult(flags(16), 0.0, labels=labels)
    assert not any("chance" in line for line in sanity_warnings("M", trained, {}, attacks))
    pgd, aa = AttackResult(flags(12), 0.0), AttackResult(flags(11), 0.0)  # 60 % and 55 %: 5 points
    [line] = sanity_warnings("M", trained, {"pgd": pgd, "aa": aa}, attacks)
    assert line.startswith("M: AA leaves 55.00% correct, 5.0 points fewer than PGD (60.00%)")
    # within 3 points, or only the label-MI attack below PGD (it does not minimise accuracy): no warning
    close = AttackResult(torch.arange(100) < 58, 0.0)
    wide_pgd = AttackResult(torch.arange(100) < 60, 0.0)
    assert sanity_warnings("M", trained, {"pgd": wide_pgd, "aa": close}, attacks) == []
    assert sanity_warnings("M", trained, {"pgd": pgd, "pgd-label-mi": AttackResult(flags(1), 0.0)}, attacks) == []


def test_markdown_table_on_fixed_numbers():
    columns = [("clean", "None"), ("pgd", "PGD-40"), ("aa", "AA"), ("worst_linf", "Worst L-inf")]
    table = markdown_table(["Standard AT", "NAMID"], columns,
                           [{"clean": 0.8339, "pgd": 0.4238, "aa": 0.3901, "worst_linf": 0.39},
                            {"clean": 0.8341, "pgd": 0.44789, "aa": 0.39255}])
    assert table == ("| Defense | None | PGD-40 | AA | Worst L-inf |\n"
                     "|---|---:|---:|---:|---:|\n"
                     "| Standard AT | 83.39 | 42.38 | 39.01 | 39.00 |\n"
                     "| NAMID | 83.41 | 44.79 | 39.26 | - |\n")


def test_columns_follow_the_papers_table_order():
    names = ["pgd", "aa", "fwa", "tidim", "pgd-l2", "cw", "ddn", "transfer"]
    attacks = {a.name: a for a in build_attacks(names, attack_settings(), 10)}
    columns = table_columns(names, attacks, "transfer (from Standard AT)")
    assert [title for _, title in columns] == ["None", "PGD-40", "AA", "FWA-40", "TI-DIM", "Worst L-inf", "PGD-40 (L2)",
                                               "CW (L2)", "DDN (L2)", "Worst L2", "transfer (from Standard AT)"]
    assert [key for key, _ in table_columns(["ddn", "fwa"], attacks)] == ["clean", "fwa", "ddn", "worst_l2"]


def test_default_settings_follow_the_spec_and_the_dataset():
    args = attack_settings()
    assert args.attacks == ["pgd", "aa", "fwa", "tidim", "pgd-l2", "cw", "ddn"]
    assert (args.epsilon, args.epsilon_l2) == (0.1, 1.5) and args.pgd_step_size == pytest.approx(0.025)
    assert (args.pgd_steps, args.pgd_l2_steps, args.fwa_steps, args.tidim_steps, args.cw_steps, args.ddn_steps) == \
        (40, 40, 40, 40, 20, 20)
    assert args.cw_lr == 0.01 and args.fwa_kernel_size == 5 and args.fwa_radius == 0.1 and args.tidim_kernel_size == 7
    cifar = test_comparison.resolve_settings(test_comparison.build_parser().parse_args(
        ["--checkpoints", "x.pt", "--epsilon", "4/255"]), dataset_info("cifar10"))
    assert cifar.epsilon == pytest.approx(4 / 255) and cifar.epsilon_l2 == 0.5
    assert cifar.fwa_radius == 0.005 and cifar.tidim_kernel_size == 15


@pytest.mark.parametrize("stage,config,label", [
    ("standard", {"loss": "at"}, "Standard AT"), ("standard", {"loss": "trades"}, "TRADES"),
    ("standard", {"loss": "mart"}, "MART"), ("standard", {"loss": "at", "norm": "l2"}, "Standard AT (L2)"),
    ("namid", {"base_loss": "at", "mi_mode": "namid"}, "NAMID"),
    ("namid", {"base_loss": "trades", "mi_mode": "namid"}, "NAMID-T"),
    ("namid", {"base_loss": "mart", "mi_mode": "namid"}, "NAMID-M"),
    ("namid", {"base_loss": "at", "mi_mode": "wmim"}, "WMIM"),
    ("namid", {"base_loss": "trades", "mi_mode": "wmim"}, "WMIM (TRADES)"),
])
def test_rows_are_labelled_by_defense(stage, config, label):
    assert test_comparison.defense_label({"stage": stage, "config": config}, "run/best.pt") == label


@pytest.mark.parametrize("stage,config,head,label", [
    ("standard", {"loss": "natural"}, "rce", "natural, RCE head"),
    ("standard", {"loss": "at"}, "mmc", "Standard AT, MMC head"),
    ("standard", {"loss": "natural"}, "softmax", "natural"),
    ("standard", {"loss": "at", "norm": "l2"}, "adp", "Standard AT, ADP head (L2)"),
    ("namid", {"base_loss": "at", "mi_mode": "namid"}, "mmc", "NAMID, MMC head"),
])
def test_rows_name_the_head_of_a_seed_talk_model(stage, config, head, label):
    checkpoint = {"stage": stage, "config": config, "model_spec": {"head": head}}
    assert test_comparison.defense_label(checkpoint, "run/best.pt") == label


def test_advertorch_shim_restores_zero_gradients():
    a, b = torch.ones(2, requires_grad=True), torch.ones(3, requires_grad=True)
    (a.sum() + 2 * b.sum()).backward()
    zero_gradients([a, [b]])
    assert a.grad.abs().sum() == 0 and b.grad.abs().sum() == 0
    from torch.autograd.gradcheck import zero_gradients as installed  # what advertorch imports
    assert installed is not None and hasattr(advertorch_attacks(), "DDNL2Attack")


# ----------------------------------------------------------------------------------------------
# test_comparison.py end to end, and its bad inputs

@pytest.fixture(scope="module")
def trades_target(fmnist_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("trades") / "run"
    train_standard.main(SMALL_RUN + ["--data-dir", str(fmnist_dir), "--model-dir", str(model_dir), "--epochs", "1",
                                     "--loss", "trades"])
    return model_dir / "best.pt"


def test_end_to_end_on_two_checkpoints(tiny_target, trades_target, fmnist_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--checkpoints", str(tiny_target), str(trades_target), "--data-dir", str(fmnist_dir), "--test-limit", "20",
            "--batch-size", "10", "--device", "cpu", "--out-dir", str(out), "--surrogate", str(tiny_target),
            "--attacks", "pgd", "fwa", "tidim", "pgd-l2", "cw", "ddn", "transfer",
            "--pgd-steps", "5", "--pgd-l2-steps", "5", "--fwa-steps", "5", "--tidim-steps", "5", "--cw-steps", "5",
            "--ddn-steps", "5"]
    assert test_comparison.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json", "results.md", "warnings.json"]

    results = json.loads((out / "results.json").read_text())
    assert read_warnings(out) == results["warnings"]  # the warnings the study gathers are the evaluation's own
    assert results["complete"] and results["dataset"] == "fashion-mnist" and results["test_images"] == 20
    assert results["seed"] == 0 and "torch" in results["versions"] and results["wall_seconds"] > 0
    assert results["attacks"]["cw"]["settings"]["thresholded"] and results["attacks"]["fwa"]["settings"]["radius"] == 0.1
    assert [m["label"] for m in results["models"]] == ["Standard AT", "TRADES"]
    for model in results["models"]:
        assert set(model["attacks"]) == {"pgd", "fwa", "tidim", "pgd-l2", "cw", "ddn", "transfer"}
        for name, entry in model["attacks"].items():
            assert len(entry["per_example"]) == 20 and entry["seconds"] >= 0 and entry["batches_outside_budget"] == 0
            assert entry["accuracy"] == pytest.approx(entry["per_example"].count("1") / 20)
        worst = model["worst_case"]
        assert worst["linf"]["attacks"] == ["pgd", "tidim"] and worst["l2"]["attacks"] == ["pgd-l2", "cw", "ddn"]
        assert worst["linf"]["accuracy"] <= min(model["attacks"][n]["accuracy"] for n in ("pgd", "tidim"))
        assert worst["l2"]["accuracy"] <= min(model["clean"]["accuracy"], model["attacks"]["ddn"]["accuracy"])

    header = ("| Defense | None | PGD-5 | FWA-5 | TI-DIM | Worst L-inf | PGD-5 (L2) | CW (L2) | DDN (L2) | Worst L2 "
              "| transfer (from Standard AT) |")
    markdown = (out / "results.md").read_text().splitlines()
    start = markdown.index(header)
    rows = markdown[start + 2:start + 4]
    assert rows[0].startswith("| Standard AT | ") and rows[1].startswith("| TRADES | ")
    assert all(len(row.split("|")) == len(header.split("|")) for row in rows)

    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["label"] for row in table] == ["Standard AT", "TRADES"]
    accuracy_columns = ["clean", "pgd", "fwa", "tidim", "worst_linf", "pgd-l2", "cw", "ddn", "worst_l2", "transfer"]
    assert list(table[0])[4:] == accuracy_columns + [f"label_mi_bits:{key}" for key in accuracy_columns
                                                     if not key.startswith("worst")]
    assert float(table[1]["label_mi_bits:pgd"]) == pytest.approx(results["models"][1]["attacks"]["pgd"]["label_mi_bits"],
                                                                abs=1e-6)
    assert float(table[1]["clean"]) == pytest.approx(results["models"][1]["clean"]["accuracy"], abs=1e-6)


def run_in_process(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(test_comparison.main, argv)
    err = capsys.readouterr().err.strip()
    return exit_info.value.code, err


def test_unknown_attack_is_one_line_and_nonzero_exit(tiny_target):
    completed = subprocess.run([sys.executable, str(REPO / "test_comparison.py"), "--checkpoints", str(tiny_target),
                                "--attacks", "pgd", "bogus"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert len(completed.stderr.strip().splitlines()) == 1 and "invalid choice: 'bogus'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_unloadable_checkpoints_are_rejected(tiny_target, tmp_path, capsys):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    for path, message in ((broken, "cannot read checkpoint"), (tmp_path / "missing.pt", "does not exist")):
        code, err = run_in_process(["--checkpoints", str(tiny_target), str(path), "--device", "cpu"], capsys)
        assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_checkpoints_of_different_datasets_are_rejected(tiny_target, tmp_path, capsys):
    checkpoint = torch.load(tiny_target, weights_only=True)
    checkpoint["model_spec"]["dataset"] = "mnist"  # the same geometry, so the weights still load
    other = tmp_path / "mnist.pt"
    torch.save(checkpoint, other)
    code, err = run_in_process(["--checkpoints", str(tiny_target), str(other), "--device", "cpu"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "different datasets" in err


@pytest.mark.parametrize("extra,message", [
    (["--attacks", "transfer"], "needs --surrogate"),
    (["--labels", "A", "B"], "one label per checkpoint"),
])
def test_inconsistent_options_are_rejected(tiny_target, capsys, extra, message):
    code, err = run_in_process(["--checkpoints", str(tiny_target), "--device", "cpu", *extra], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err
