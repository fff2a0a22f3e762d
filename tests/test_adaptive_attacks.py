"""Stage 4's adaptive L-inf attacks (fgsm, bim, mim, pgd-mt, pgd-restarts) and the ADP authors' "-p"
protocol variants, on tiny models of the two kinds they are for: an MMC-like model (logits
-||f(x) - mu_i||^2, all <= 0) and an ADP-like ensemble (logits log of the members' averaged probabilities).

Everything runs on 8x8 synthetic images with 4 classes; no dataset is read except by the end-to-end test.
"""
import csv
import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import test_comparison
from utils import evaluation
from utils.attacks import PGDConfig, attack_objective, momentum_attack, pgd_attack, targeted_margin
from utils.data import dataset_info
from utils.errors import UserError
from utils.evaluation import (ModelSnapshot, SoftmaxAsLogits, build_attacks, first_success, isolated_rng, run_attack,
                              sharded_loader, table_columns)

CPU = torch.device("cpu")
CLASSES, SIZE, FEATURES = 4, 8, 4
# A dataset's facts with 4 classes and 8x8 images (resolve_settings reads the budgets and the class count).
INFO = dataclasses.replace(dataset_info("fashion-mnist"), num_classes=CLASSES, image_size=SIZE)
EPS = 0.1
NEW_ATTACKS = ("fgsm", "fgsm-p", "bim", "bim-p", "mim", "mim-p", "pgd-p", "pgd-mt", "pgd-restarts")


def settings(*extra, info=INFO):
    args = test_comparison.build_parser().parse_args(["--checkpoints", "unused.pt", "--epsilon", str(EPS), *extra])
    return test_comparison.resolve_settings(args, info)


def attacks_by_name(*extra, names=NEW_ATTACKS):
    return {a.name: a for a in build_attacks(list(names), settings(*extra), CLASSES)}


def loader_of(x, y, batch_size=32):
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------------------------
# Tiny models and data

def synthetic(count, seed, noise=0.3):
    """Images of 4 classes: a fixed random pattern per class plus Gaussian noise, in [0, 1]."""
    patterns = torch.rand(CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(123))
    y = torch.arange(count) % CLASSES
    noise = noise * torch.randn(count, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    return (patterns[y] * 0.4 + 0.3 + noise).clamp(0, 1), y


def simplex_centres(classes, scale):
    """Max-Mahalanobis-like centres: a regular simplex of norm `scale` (pairwise squared distance
    2 scale^2 L / (L - 1))."""
    centred = torch.eye(classes) - 1.0 / classes
    return scale * centred / centred.norm(dim=1, keepdim=True)


class MMCLike(nn.Module):
    """logits h_i = -||f(x) - mu_i||^2 (all <= 0) with a small MLP f and fixed centres mu."""

    def __init__(self, pixels, classes, scale):
        super().__init__()
        self.f = nn.Sequential(nn.Flatten(), nn.Linear(pixels, 16), nn.ReLU(), nn.Linear(16, classes))
        self.register_buffer("mu", simplex_centres(classes, scale))

    def forward(self, x):
        return -((self.f(x)[:, None, :] - self.mu[None]) ** 2).sum(dim=-1)


class ADPLike(nn.Module):
    """logits log((1/3) sum_k softmax(member_k(x))), by logsumexp, as defenses/adp.py computes them."""

    def __init__(self, pixels, classes):
        super().__init__()
        self.members = nn.ModuleList(nn.Sequential(nn.Flatten(), nn.Linear(pixels, 16), nn.ReLU(),
                                                   nn.Linear(16, classes)) for _ in range(3))

    def member_logits(self, x):
        return torch.stack([member(x) for member in self.members], dim=1)

    def forward(self, x):
        return torch.logsumexp(F.log_softmax(self.member_logits(x), dim=-1), dim=1) - math.log(3)


def trained(model, loss, x, y, steps):
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(steps):
        optimizer.zero_grad()
        loss(model, x, y).backward()
        optimizer.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def mmc_loss(model, x, y):
    return 0.5 * ((model.f(x) - model.mu[y]) ** 2).sum(dim=1).mean()


def adp_loss(model, x, y):
    return sum(F.cross_entropy(logits, y) for logits in model.member_logits(x).unbind(1))


@pytest.fixture(scope="module")
def data():
    return (*synthetic(256, 0), *synthetic(64, 1))


@pytest.fixture(scope="module")
def mmc(data):
    """Centres of norm 5: logits ~67 apart at the centres, about 93 % clean accuracy."""
    torch.manual_seed(0)
    return trained(MMCLike(SIZE * SIZE, CLASSES, 5.0), mmc_loss, data[0], data[1], steps=60)


@pytest.fixture(scope="module")
def saturated_mmc(data):
    """Centres of norm 20: logits ~10^3 apart, the softmax cross-entropy is exactly flat (MMC-10 on real data)."""
    torch.manual_seed(0)
    return trained(MMCLike(SIZE * SIZE, CLASSES, 20.0), mmc_loss, data[0], data[1], steps=100)


@pytest.fixture(scope="module")
def adp(data):
    torch.manual_seed(0)
    return trained(ADPLike(SIZE * SIZE, CLASSES), adp_loss, data[0], data[1], steps=100)


def test_the_tiny_models_are_what_the_attacks_are_for(mmc, saturated_mmc, adp, data):
    _, _, x, y = data
    for model in (mmc, saturated_mmc, adp):
        with torch.no_grad():
            logits = model(x)
        assert (logits <= 0).all(), "every logit of both kinds of model is <= 0"
        assert accuracy(model, x, y) > 0.85
    with torch.no_grad():
        p_bar = F.softmax(adp.member_logits(x), dim=-1).mean(dim=1)
        assert torch.allclose(adp(x).exp(), p_bar, atol=1e-6)
        top2 = saturated_mmc(x).topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 200


# ----------------------------------------------------------------------------------------------
# The targeted margin, FGSM, MIM

def test_targeted_margin_by_hand_on_all_negative_logits():
    logits = torch.tensor([[-1.0, -50.0, -3.0], [-200.0, -0.5, -100.0]])
    target = torch.tensor([2, 0])
    expected = torch.tensor([-3.0 - (-1.0), -200.0 - (-0.5)])  # h_t - max_{j != t} h_j
    assert torch.equal(targeted_margin(logits, target), expected)
    assert attack_objective(logits, torch.tensor([0, 1]), "targeted-margin", target=target) == expected.sum()
    # What masking by multiplication with (1 - one_hot) gives instead: the masked 0 is the largest "other" logit.
    multiplied = logits.gather(1, target[:, None]).squeeze(1) - (logits * (1 - F.one_hot(target, 3))).amax(dim=1)
    assert not torch.equal(multiplied, expected)
    with pytest.raises(ValueError, match="target"):
        pgd_attack(nn.Identity(), torch.zeros(1, 3), torch.zeros(1, dtype=torch.long),
                   PGDConfig("linf", 0.1, 0.1, 1, loss="targeted-margin"))


def test_fgsm_steps_exactly_epsilon_along_the_sign_of_the_cross_entropy_gradient(mmc, data):
    _, _, x, y = data
    attack = attacks_by_name(names=("fgsm",))["fgsm"]
    assert attack.column == "FGSM" and attack.settings["random_start"] == "none" and attack.settings["steps"] == 1
    x_adv = attack.craft(mmc, x, y, torch.Generator().manual_seed(0)).x_adv
    again = attack.craft(mmc, x, y, torch.Generator().manual_seed(1)).x_adv
    assert torch.equal(x_adv, again), "FGSM has no random start"
    x_in = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(mmc(x_in), y, reduction="sum"), x_in)
    step = EPS * grad.sign()
    inside = ((x + step) >= 0) & ((x + step) <= 1) & (grad != 0)  # pixels the box does not clip
    assert inside.float().mean() > 0.5
    assert torch.allclose((x_adv - x)[inside], step[inside], rtol=0, atol=1e-6)
    assert torch.allclose(x_adv[~inside], (x + step).clamp(0, 1)[~inside], rtol=0, atol=1e-6)
    assert 0 <= x_adv.min() and x_adv.max() <= 1


def test_mim_is_torchattacks_mifgsm_on_one_channel_images(adp, data):
    """Where the cross-entropy gradient is never exactly zero, momentum_attack computes what torchattacks'
    MIFGSM does (float rounding aside)."""
    torchattacks = pytest.importorskip("torchattacks")
    _, _, x, y = data
    ours = momentum_attack(adp, x, y, EPS, EPS / 10, 10, 1.0)
    theirs = torchattacks.MIFGSM(adp, eps=EPS, alpha=EPS / 10, steps=10, decay=1.0)(x, y)
    assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)
    mim = attacks_by_name(names=("mim",))["mim"]
    assert torch.equal(mim.craft(adp, x, y, None).x_adv, ours) and mim.column == "MIM-10"


class Plateau(nn.Module):
    """One pixel x (0.5 clean, label 0): the logit of class 1 rises with x, is flat on [0.515, 0.565] (an
    exactly zero gradient) and rises again; class 1 wins above x = 0.575."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        rise = (v - 0.5).clamp(max=0.015) + F.relu(v - 0.565) - 0.025
        return torch.stack([torch.zeros_like(v), 100 * rise], dim=1) - 5


def test_mim_carries_its_momentum_over_a_zero_gradient():
    """Why mim is not torchattacks' MIFGSM: it divides by mean|grad| unguarded, so an exactly zero gradient
    (a saturated cross-entropy, as on MMC) makes its momentum NaN for good, and sign(NaN) = 0 stops the
    example there; momentum_attack keeps its momentum and crosses the plateau."""
    x, y = torch.full((1, 1, 1, 1), 0.5), torch.zeros(1, dtype=torch.long)
    ours = momentum_attack(Plateau(), x, y, 0.1, 0.01, 10, 1.0)
    assert ours.item() == pytest.approx(0.6, abs=1e-5) and Plateau()(ours).argmax(1).item() == 1
    torchattacks = pytest.importorskip("torchattacks")
    theirs = torchattacks.MIFGSM(Plateau(), eps=0.1, alpha=0.01, steps=10, decay=1.0)(x, y)
    assert theirs.item() == pytest.approx(0.52, abs=1e-5) and Plateau()(theirs).argmax(1).item() == 0


# ----------------------------------------------------------------------------------------------
# Every new attack: within budget, lowers accuracy; leaves nothing behind

@pytest.mark.parametrize("name", NEW_ATTACKS)
@pytest.mark.parametrize("kind", ["mmc", "adp"])
def test_new_attack_respects_the_budget_and_lowers_accuracy(name, kind, mmc, adp, data):
    _, _, x, y = data
    model = {"mmc": mmc, "adp": adp}[kind]
    attack = attacks_by_name(names=(name,))[name]
    assert attack.threat == "linf" and attack.bound == EPS and name in evaluation.WORST_CASE_GROUPS["linf"]
    result = run_attack(model, attack, loader_of(x, y), CPU, False, 0, desc=name)
    assert result.budget.batches == 2 and result.budget.violating_batches == 0, vars(result.budget)
    assert result.budget.max_value <= EPS * (1 + 1e-5) + 1e-6
    assert 0 <= result.budget.min_pixel and result.budget.max_pixel <= 1
    assert result.side_effects == [] and result.nan_batches == 0
    clean = accuracy(model, x, y)
    assert result.accuracy < clean - 0.3, f"{name} on {kind}: clean {clean:.3f}, attacked {result.accuracy:.3f}"


def test_no_new_attack_leaves_gradients_bn_statistics_mode_or_rng_changes_behind(data):
    _, _, x, y = data
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(144, CLASSES)).train()
    snapshot = ModelSnapshot(model)
    for name, attack in attacks_by_name("--restarts-steps", "3", "--mt-steps", "3").items():
        before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        with isolated_rng(0, CPU):
            output = attack.craft(model, x[:8], y[:8], torch.Generator().manual_seed(0))
        after = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
        assert torch.equal(before[0], after[0]) and before[1] == after[1] and np.array_equal(before[2], after[2])
        assert output.x_adv.shape == x[:8].shape and not output.x_adv.requires_grad
        assert snapshot.problems(model) == [], f"{name} left {snapshot.problems(model)}"
    assert model.training


# ----------------------------------------------------------------------------------------------
# pgd-mt

class TwoPixels(nn.Module):
    """Three classes, all logits about -10, on (1, 1, 2) images (a, b), clean (1.0, 0.5), label 0. Class 1,
    the nearest wrong class, wins only if a exceeds 1.05: the [0, 1] box forbids it. Class 2 wins once
    b > 0.69, within an epsilon of 0.2."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        a, b = x.flatten(1).unbind(1)
        return torch.stack([-10 + 0 * a, -10.05 + (a - 1.0), -10.19 + (b - 0.5)], dim=1)


def test_pgd_mt_reaches_a_class_that_untargeted_margin_pgd_and_the_first_target_miss():
    model = TwoPixels()
    x = torch.tensor([1.0, 0.5]).view(1, 1, 1, 2).repeat(16, 1, 1, 1)
    y = torch.zeros(16, dtype=torch.long)
    three = dataclasses.replace(INFO, num_classes=3)
    args = settings("--epsilon", "0.2", info=three)
    attack = build_attacks(["pgd-mt"], args, 3)[0]
    assert attack.settings["targets"] == 2 and attack.column == "PGD-MT-40x2"
    x_adv = attack.craft(model, x, y, torch.Generator().manual_seed(0)).x_adv
    assert (model(x_adv).argmax(1) == 2).all(), "pgd-mt must try the second-ranked class too"
    untargeted = pgd_attack(model, x, y, PGDConfig("linf", 0.2, 0.05, 40, loss="cw", random_start="none"))
    assert (model(untargeted).argmax(1) == 0).all(), "the untargeted margin follows class 1 into the box's wall"
    first_only = build_attacks(["pgd-mt"], settings("--epsilon", "0.2", "--mt-targets", "1", info=three), 3)[0]
    assert (model(first_only.craft(model, x, y, torch.Generator().manual_seed(0)).x_adv).argmax(1) == 0).all()


def test_pgd_mt_breaks_at_least_what_untargeted_margin_pgd_breaks(mmc, data):
    _, _, x, y = data
    attack = attacks_by_name(names=("pgd-mt",))["pgd-mt"]
    assert attack.settings["targets"] == CLASSES - 1 and attack.settings["steps"] == 40
    assert attack.settings["step_size"] == pytest.approx(EPS / 4)
    x_mt = attack.craft(mmc, x, y, torch.Generator().manual_seed(0)).x_adv
    x_margin = pgd_attack(mmc, x, y, PGDConfig("linf", EPS, EPS / 4, 40, loss="cw"), torch.Generator().manual_seed(0))
    with torch.no_grad():
        broken_mt, broken_margin = mmc(x_mt).argmax(1) != y, mmc(x_margin).argmax(1) != y
    assert broken_mt.sum() >= broken_margin.sum() > 0


def test_on_a_saturated_mmc_the_cross_entropy_attacks_stall_and_pgd_mt_does_not(saturated_mmc, data):
    """Logits ~10^3 apart: the softmax cross-entropy's gradient is exactly zero, so FGSM, BIM and PGD do not move
    (PGD only by its random start); the targeted margin still has a gradient."""
    _, _, x, y = data
    x_in = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(saturated_mmc(x_in), y, reduction="sum"), x_in)
    flat = grad.flatten(1).abs().amax(dim=1) == 0
    assert flat.float().mean() > 0.8
    attacks = attacks_by_name(names=("fgsm", "bim", "mim", "pgd-mt"))
    for name in ("fgsm", "bim", "mim"):
        x_adv = attacks[name].craft(saturated_mmc, x, y, torch.Generator().manual_seed(0)).x_adv
        assert torch.equal(x_adv[flat], x[flat]), name
    clean = accuracy(saturated_mmc, x, y)
    result = run_attack(saturated_mmc, attacks["pgd-mt"], loader_of(x, y), CPU, False, 0, desc="pgd-mt")
    assert result.accuracy < clean - 0.5


# ----------------------------------------------------------------------------------------------
# first_success, pgd-restarts

class Threshold(nn.Module):
    """One pixel: class 1 above 0.5, class 0 below."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        v = x.flatten(1)[:, 0]
        return torch.stack([0.5 - v, v - 0.5], dim=1)


def test_first_success_keeps_each_examples_first_adversarial_and_attacks_only_the_unbroken():
    x, y = torch.full((4, 1, 1, 1), 0.1), torch.zeros(4, dtype=torch.long)
    # candidates[run][example]; above 0.5 fools the model
    candidates = torch.tensor([[0.9, 0.2, 0.1, 0.3], [0.8, 0.6, 0.2, 0.4], [0.7, 0.95, 0.3, 0.75]])
    attacked = []

    def run(number):
        def attempt(xs, ys, index):
            attacked.append(index.tolist())
            assert torch.equal(xs, x[index]) and torch.equal(ys, y[index])
            return candidates[number, index].view(-1, 1, 1, 1)
        return attempt

    x_adv = first_success(Threshold(), x, y, [run(0), run(1), run(2)])
    assert x_adv.flatten().tolist() == pytest.approx([0.9, 0.6, 0.3, 0.75])  # first success, else the last run's
    assert attacked == [[0, 1, 2, 3], [1, 2, 3], [2, 3]]
    attacked.clear()
    first_success(Threshold(), x, y, [run(1), run(2), run(0)])  # 0.8, 0.6, _, _ then 0.3, 0.75: ex. 2 left
    assert attacked == [[0, 1, 2, 3], [2, 3], [2]]


class CoinFlip(nn.Module):
    """No input gradient at all, so PGD's result is its random start; class 1 wins when the start moved
    pixel 0 (0.5 clean) up: each restart fools an example with probability 1/2."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        shift = (x.flatten(1)[:, 0] - 0.5).detach()
        return torch.stack([torch.zeros_like(shift), 100 * shift], dim=1) + 0 * x.flatten(1).sum(1, keepdim=True)


def test_pgd_restarts_is_robust_only_where_every_restart_failed_and_keeps_the_first_success(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    x = torch.rand(32, 1, 4, 4, generator=generator)
    x[:, 0, 0, 0] = 0.5
    y = torch.zeros(32, dtype=torch.long)
    model = CoinFlip()
    calls = []
    real = evaluation.pgd_attack

    def recording(model_, xs, ys, config, generator_, **kwargs):
        out = real(model_, xs, ys, config, generator_, **kwargs)
        rows = [int((xs[i] == x).flatten(1).all(1).nonzero()) for i in range(len(xs))]
        calls.append({row: out[i] for i, row in enumerate(rows)})
        return out

    monkeypatch.setattr(evaluation, "pgd_attack", recording)
    attack = attacks_by_name("--restarts", "3", "--restarts-steps", "2", names=("pgd-restarts",))["pgd-restarts"]
    assert attack.column == "PGD-2x3" and attack.settings["restarts"] == 3
    result = run_attack(model, attack, loader_of(x, y, 32), CPU, False, 0, desc="restarts")
    x_adv = attack.craft(model, x, y, torch.Generator().manual_seed(evaluation.batch_seed(0, 0))).x_adv
    assert len(calls) == 6  # run_attack's 3 restarts, then the same 3 again
    calls = calls[3:]
    fooled_late = 0
    for i in range(32):
        outcomes = [(r, call[i], model(call[i][None]).argmax(1).item() == 1)
                    for r, call in enumerate(calls) if i in call]
        assert [r for r, _, _ in outcomes] == list(range(len(outcomes))), "attacked in consecutive restarts, from the first"
        fooled = [r for r, _, broken in outcomes if broken]
        if fooled:
            assert fooled == [outcomes[-1][0]], "not attacked again after its first success"
            assert torch.equal(x_adv[i], outcomes[-1][1]) and not result.robust[i]
            fooled_late += fooled[0] > 0
        else:
            assert len(outcomes) == 3 and torch.equal(x_adv[i], outcomes[-1][1]) and result.robust[i]
    assert 0 < int(result.robust.sum()) < 8 and fooled_late > 4  # both kinds of example occur


# ----------------------------------------------------------------------------------------------
# The "-p" variants: the ADP authors' protocol

class Probabilities(nn.Module):
    """Written independently of SoftmaxAsLogits: the model's softmax, as logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return torch.softmax(self.model(x), dim=1)


def test_p_variants_ascend_the_cross_entropy_on_the_averaged_probabilities(adp, data):
    """On the tiny ADP-like model the -p variants are not reliably weaker than the honest attacks (their accuracy
    is the same): for sign-gradient attacks the two gradients differ only by per-class weights 1 + s_j - s_y
    versus 1 / p_y (s = softmax(p_bar)), nearly proportional. So this asserts the objective and the wiring:
    the -p attack is the honest attack crafted on softmax(logits), and that changes its adversarials."""
    _, _, x, y = data
    with torch.no_grad():
        p_bar = F.softmax(adp.member_logits(x), dim=-1).mean(dim=1)
        by_hand = -p_bar.gather(1, y[:, None]).squeeze(1) + p_bar.exp().sum(dim=1).log()  # CE(p_bar as logits)
        objective = F.cross_entropy(SoftmaxAsLogits(adp)(x), y, reduction="none")
    assert torch.allclose(objective, by_hand, atol=1e-6)
    attacks = attacks_by_name()
    differs = []
    for name, honest in evaluation.PROBABILITY_ATTACKS.items():
        attack = attacks[name]
        assert attack.column == f"{build_attacks([honest], settings(), CLASSES)[0].column} (CE on p)"
        assert "cleverhans" in attack.settings["protocol"]
        x_p = attack.craft(adp, x, y, torch.Generator().manual_seed(0)).x_adv
        reference = build_attacks([honest], settings(), CLASSES)[0].craft(Probabilities(adp), x, y,
                                                                          torch.Generator().manual_seed(0)).x_adv
        assert torch.equal(x_p, reference), name
        x_honest = build_attacks([honest], settings(), CLASSES)[0].craft(adp, x, y,
                                                                         torch.Generator().manual_seed(0)).x_adv
        differs.append(not torch.equal(x_p, x_honest))
    assert all(differs), "the -p variants must not be the honest attacks"


def test_p_variants_are_judged_on_the_real_model(adp, data):
    _, _, x, y = data
    attack = attacks_by_name(names=("bim-p",))["bim-p"]
    crafted = []
    recording = dataclasses.replace(attack, craft=lambda *a: crafted.append(attack.craft(*a)) or crafted[-1])
    result = run_attack(adp, recording, loader_of(x, y, 64), CPU, False, 0, desc="bim-p")
    with torch.no_grad():
        assert torch.equal(result.robust, adp(crafted[0].x_adv).argmax(1) == y)


# ----------------------------------------------------------------------------------------------
# Settings, columns, sharding, stage 4 end to end

def test_defaults_columns_and_table_order():
    args = settings()
    assert (args.bim_steps, args.mim_steps, args.mim_decay, args.mt_steps, args.restarts, args.restarts_steps) == \
        (10, 10, 1.0, 40, 5, 100)
    assert args.bim_step_size == args.mim_step_size == args.restarts_step_size == pytest.approx(EPS / 10)
    assert args.mt_step_size == pytest.approx(EPS / 4) and args.mt_targets == CLASSES - 1
    fmnist = test_comparison.resolve_settings(test_comparison.build_parser().parse_args(["--checkpoints", "x.pt"]),
                                              dataset_info("fashion-mnist"))
    assert fmnist.mt_targets == 9 and fmnist.attacks == list(evaluation.WHITE_BOX_ATTACKS)  # opt-in
    names = ["pgd", *NEW_ATTACKS, "pgd-l2"]
    attacks = {a.name: a for a in build_attacks(names, fmnist, 10)}
    assert [title for _, title in table_columns(names, attacks)] == [
        "None", "PGD-40", "PGD-40 (CE on p)", "FGSM", "FGSM (CE on p)", "BIM-10", "BIM-10 (CE on p)", "MIM-10",
        "MIM-10 (CE on p)", "PGD-MT-40x9", "PGD-100x5", "Worst L-inf", "PGD-40 (L2)", "Worst L2"]
    assert attacks["bim"].settings == {"epsilon": 0.1, "step_size": pytest.approx(0.01), "steps": 10,
                                       "random_start": "none", "loss": "ce",
                                       "implementation": "utils.attacks.pgd_attack"}
    with pytest.raises(UserError, match="only 3 wrong classes"):
        settings("--mt-targets", "4")


@pytest.mark.parametrize("name", ["pgd-mt", "pgd-restarts", "pgd-p"])
def test_a_batch_gets_the_same_adversarials_whichever_process_attacks_it(mmc, data, name):
    _, _, x, y = data
    dataset = TensorDataset(x[:10].repeat(5, 1, 1, 1), y[:10].repeat(5))
    attack = attacks_by_name("--mt-steps", "2", "--restarts-steps", "2", "--pgd-steps", "2", names=(name,))[name]

    def adversarials(rank, world_size):
        crafted = []
        recording = dataclasses.replace(attack, craft=lambda *a: crafted.append(attack.craft(*a).x_adv) or
                                        evaluation.AttackOutput(crafted[-1]))
        loader = sharded_loader(dataset, 10, rank=rank, world_size=world_size)
        run_attack(mmc, recording, loader, CPU, False, 3, desc=name)
        return dict(zip(loader.batch_indices, crafted))

    whole, shared_out = adversarials(0, 1), {**adversarials(0, 2), **adversarials(1, 2)}
    assert sorted(whole) == sorted(shared_out) == [0, 1, 2, 3, 4]
    assert all(torch.equal(whole[b], shared_out[b]) for b in whole)
    assert any(not torch.equal(whole[0], whole[b]) for b in range(1, 5)), "each batch draws its own random numbers"


def test_stage4_end_to_end_writes_the_new_columns(fmnist_dir, tmp_path, monkeypatch):
    """test_comparison.main on an MMC-like and an ADP-like model of Fashion-MNIST's shape (load_models is
    replaced: the model zoo's heads are not what is tested here)."""
    torch.manual_seed(0)
    models = {"mmc.pt": MMCLike(28 * 28, 10, 5.0).eval(), "adp.pt": ADPLike(28 * 28, 10).eval()}

    def load_models(paths, device, channels_last=None):
        return [(models[str(path)], {"stage": "test", "config": {}, "epoch": 0,
                                     "model_spec": {"dataset": "fashion-mnist", "arch": "tiny"}}) for path in paths]

    monkeypatch.setattr(test_comparison, "load_models", load_models)
    out = tmp_path / "out"
    argv = ["--checkpoints", "mmc.pt", "adp.pt", "--labels", "MMC-like", "ADP-like", "--data-dir", str(fmnist_dir),
            "--test-limit", "20", "--batch-size", "10", "--device", "cpu", "--out-dir", str(out),
            "--attacks", "pgd", *NEW_ATTACKS, "--pgd-steps", "2", "--bim-steps", "2", "--mim-steps", "2",
            "--mt-steps", "2", "--mt-targets", "3", "--restarts", "2", "--restarts-steps", "2"]
    assert test_comparison.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    order = ["pgd", "pgd-p", "fgsm", "fgsm-p", "bim", "bim-p", "mim", "mim-p", "pgd-mt", "pgd-restarts"]
    assert set(results["attacks"]) == set(order)
    assert [column["key"] for column in results["columns"]] == ["clean", *order, "worst_linf"]
    assert results["attacks"]["pgd-mt"]["settings"]["targets"] == 3
    assert results["attacks"]["pgd-restarts"]["column"] == "PGD-2x2"
    for model in results["models"]:
        assert set(model["attacks"]) == set(order)
        for entry in model["attacks"].values():
            assert len(entry["per_example"]) == 20 and entry["batches_outside_budget"] == 0
            assert entry["max_perturbation"] <= 0.1 * (1 + 1e-5) + 1e-6
        worst = model["worst_case"]["linf"]
        assert worst["attacks"] == ["pgd", "fgsm", "bim", "mim", "pgd-mt", "pgd-restarts", "fgsm-p", "bim-p", "pgd-p",
                                    "mim-p"]
        assert worst["accuracy"] <= min(entry["accuracy"] for entry in model["attacks"].values())
    header = ("| Defense | None | PGD-2 | PGD-2 (CE on p) | FGSM | FGSM (CE on p) | BIM-2 | BIM-2 (CE on p) | MIM-2 "
              "| MIM-2 (CE on p) | PGD-MT-2x3 | PGD-2x2 | Worst L-inf |")
    markdown = (out / "results.md").read_text()
    assert header in markdown.splitlines()
    assert "the ADP authors' protocol (cleverhans 2.1.0)" in markdown
    with open(out / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert [row["label"] for row in table] == ["MMC-like", "ADP-like"]
    assert list(table[0])[4:] == ["clean", *order, "worst_linf"] + [f"label_mi_bits:{key}" for key in ("clean", *order)]
