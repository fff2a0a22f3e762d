"""The seed talk's heads (defenses/): Max-Mahalanobis centers, MM-LDA, MMC, the ADP ensemble and its loss, against
hand computations; their wiring into stage 1 (natural training, AT with the head's loss and attack) and stage 3
(NAMID on a head: base loss, selection and estimators on the head's logits)."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_MIAT
import train_standard
from defenses import Head, head_for
from defenses.adp import (DET_OFFSET, Ensemble, adp_loss, ensemble_entropy, ensemble_logits, log_ensemble_diversity,
                          member_outputs)
from defenses.max_mahalanobis import MaxMahalanobisHead, max_mahalanobis_centers, mmc_loss
from defenses.rce import rce_loss
from models import build_model
from models.estimators import build_estimators
from tests.helpers import assert_one_line_error, run_script
from utils.attacks import PGDConfig
from utils.errors import UserError
from utils.losses import OBJECTIVES, check_head_supports, training_loss
from utils.namid import make_namid_step
from utils.training import load_model, make_adversarial_step, model_from_spec


# ----------------------------------------------------------------------------------------------
# Max-Mahalanobis centers, MM-LDA and MMC


@pytest.mark.parametrize("classes, dim", [(10, 256), (10, 10), (3, 5), (100, 128)])
def test_centers_form_a_regular_simplex_of_norm_c(classes, dim):
    mu = max_mahalanobis_centers(classes, dim, scale=10.0)
    assert mu.shape == (classes, dim) and mu.dtype == torch.float64
    unit_gram = mu @ mu.t() / 100.0
    expected = classes / (classes - 1) * torch.eye(classes, dtype=torch.float64) - 1.0 / (classes - 1)
    assert torch.allclose(unit_gram, expected, atol=1e-7)
    assert torch.allclose(mu.norm(dim=1), torch.full((classes,), 10.0, dtype=torch.float64), atol=1e-7)
    assert torch.equal(mu, mu.tril()), "the authors' recursion fills a lower-triangular matrix"
    # the smallest squared distance between centers, 2 C^2 L / (L - 1) (222.2 for C = 10, L = 10)
    distances = torch.cdist(mu, mu).pow(2) + torch.eye(classes, dtype=torch.float64) * 1e9
    assert distances.min().item() == pytest.approx(2 * 100 * classes / (classes - 1), rel=1e-7)


def test_centers_refuse_a_feature_dimension_below_the_classes():
    with pytest.raises(ValueError, match="feature dimension"):
        max_mahalanobis_centers(10, 9)


def test_centers_are_a_fixed_buffer_never_trained():
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head="mmc", feature_dim=16)
    head = model.net
    assert isinstance(head, MaxMahalanobisHead) and "centers" in dict(head.named_buffers())
    assert all(p is not head.centers for p in model.parameters())
    assert torch.allclose(head.centers.double(), max_mahalanobis_centers(10, 16, 10.0), atol=1e-6)


def mm_head(kind, z):
    """An MM head whose feature network returns the given features."""
    class Fixed(torch.nn.Module):
        def forward(self, x):
            return z
    return MaxMahalanobisHead(Fixed(), kind, 10, z.shape[1], 10.0)


def test_mm_lda_logits_give_the_softmax_of_the_distance_form():
    torch.manual_seed(0)
    z = 3 * torch.randn(8, 16)
    head = mm_head("mm-lda", z)
    logits = head(None)
    assert torch.allclose(logits, z @ head.centers.t(), atol=1e-5)
    by_distance = -0.5 * torch.cdist(z.double(), head.centers.double()).pow(2)
    assert torch.allclose(F.softmax(logits.double(), 1), F.softmax(by_distance, 1), atol=1e-6)


def test_mmc_predicts_the_nearest_center_and_its_loss_is_half_the_squared_distance():
    torch.manual_seed(0)
    z = 4 * torch.randn(32, 16)
    head = mm_head("mmc", z)
    logits = head(None)
    assert (logits <= 0).all()
    distances = torch.cdist(z.double(), head.centers.double())
    assert torch.equal(logits.argmax(1), distances.argmin(1))
    y = torch.randint(0, 10, (32,))
    expected = 0.5 * distances.gather(1, y[:, None]).pow(2).mean()
    assert mmc_loss(logits, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_mmc_loss_is_zero_at_the_center_and_predicts_it():
    centers = max_mahalanobis_centers(10, 16, 10.0).float()
    y = torch.arange(10)
    head = mm_head("mmc", centers[y].clone())
    logits = head(None)
    assert mmc_loss(logits, y).item() == 0.0
    assert torch.equal(logits.argmax(1), y)


# ----------------------------------------------------------------------------------------------
# ADP


def hand_adp_loss(member_logits, y, alpha, beta):
    """The ADP loss of one example (numpy, float64), written from the paper's definitions."""
    member_logits = np.asarray(member_logits, dtype=np.float64)
    probs = np.exp(member_logits) / np.exp(member_logits).sum(axis=1, keepdims=True)   # (K, L)
    ce = -np.log(probs[:, y]).sum()
    mean = probs.mean(axis=0)
    entropy = -(mean * np.log(mean + 1e-20)).sum()
    others = np.delete(probs, y, axis=1)                                             # (K, L-1)
    others = others / np.linalg.norm(others, axis=1, keepdims=True)
    gram = others @ others.T + 1e-6 * np.eye(len(others))
    return ce - alpha * entropy - beta * np.log(np.linalg.det(gram))


def test_adp_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(4, 3, 5)  # batch 4, K = 3 members, 5 classes
    y = torch.tensor([0, 4, 2, 2])
    expected = np.mean([hand_adp_loss(logits[b].numpy(), int(y[b]), 2.0, 0.5) for b in range(4)])
    assert adp_loss(logits, y, 2.0, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_adp_without_regulariser_is_the_sum_of_the_members_cross_entropies():
    torch.manual_seed(1)
    logits, y = torch.randn(6, 3, 10), torch.randint(0, 10, (6,))
    expected = sum(F.cross_entropy(logits[:, k], y) for k in range(3))
    assert adp_loss(logits, y, 0.0, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)


def test_adp_loss_stays_finite_with_identical_members():
    torch.manual_seed(2)
    one = torch.randn(4, 1, 10)
    logits = one.repeat(1, 3, 1).requires_grad_(True)
    y = torch.randint(0, 10, (4,))
    diversity = log_ensemble_diversity(logits, y)
    # a rank-one Gram matrix: eigenvalues 3 + 1e-6 and 1e-6 twice
    assert torch.allclose(diversity, torch.full((4,), math.log((3 + DET_OFFSET) * DET_OFFSET ** 2)), rtol=1e-5)
    loss = adp_loss(logits, y, 2.0, 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_ensemble_exposes_the_log_of_its_averaged_probabilities():
    torch.manual_seed(3)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head="adp", members=3)
    assert isinstance(model.net, Ensemble) and len(model.net.members) == 3
    x = torch.rand(5, 1, 28, 28)
    members = torch.stack([member(model.normalize(x)) for member in model.net.members], 1)
    expected = torch.log(F.softmax(members, -1).mean(1))
    assert torch.allclose(model(x), expected, atol=1e-5)
    with member_outputs(model):
        assert torch.allclose(model(x), members, atol=1e-6)
    assert model(x).shape == (5, 10), "member_outputs must not outlive its block"
    assert not torch.allclose(members[:, 0], members[:, 1]), "the members must start from different weights"
    # log p_bar stays finite where p_bar underflows float32
    assert torch.isfinite(ensemble_logits(torch.tensor([[[0.0, 200.0], [0.0, 300.0]]]))).all()


def test_ensemble_entropy_is_maximal_for_uniform_members():
    uniform = torch.zeros(2, 3, 10)
    assert torch.allclose(ensemble_entropy(uniform), torch.full((2,), math.log(10)), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Specs and checkpoints


@pytest.mark.parametrize("head", ["softmax", "mm-lda", "mmc", "adp"])
def test_every_head_rebuilds_from_its_spec(head):
    spec = dict(arch="small-cnn", dataset="fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=[0.5],
                std=[0.5], width=64, depth=34, widen_factor=10, head=head, feature_dim=32, mm_scale=10.0, members=2)
    model = model_from_spec(spec)
    copy = model_from_spec(spec)
    copy.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), copy(x))


def test_a_spec_without_a_head_is_a_softmax_model():
    spec = dict(arch="small-cnn", dataset="fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=[0.5],
                std=[0.5], width=64, depth=34, widen_factor=10)
    model = model_from_spec(spec)
    assert isinstance(model.net.classifier.fc3, torch.nn.Linear) and model.net.classifier.fc3.out_features == 10
    assert head_for(spec) == Head("softmax")


# ----------------------------------------------------------------------------------------------
# Training objectives with a head


def test_objectives_with_heads():
    base = PGDConfig("linf", 0.1, 0.025, 3)
    assert OBJECTIVES["at"].training_attack(base, Head("mmc")).loss == "cw", "CE on MMC logits is saturated"
    assert OBJECTIVES["at"].training_attack(base, Head("mm-lda")).loss == "ce"
    assert OBJECTIVES["trades"].training_attack(base, Head("mm-lda")).loss == "kl"
    # --at-attack-loss overrides the head's choice under Standard AT (the softmax control of AT-MMC's margin attack)
    assert OBJECTIVES["at"].training_attack(base, Head("softmax"), "cw").loss == "cw"
    assert OBJECTIVES["at"].training_attack(base, Head("adp", 2, 0.5), "cw").loss == "cw"
    assert OBJECTIVES["at"].training_attack(base, Head("softmax")).loss == "ce"
    assert OBJECTIVES["at"].needs_clean_outputs(Head("adp", 2, 0.5)) and not OBJECTIVES["at"].needs_clean_outputs(Head("mmc"))
    for head in ("mmc", "adp"):
        for loss in ("trades", "mart"):
            with pytest.raises(UserError, match="softmax"):
                check_head_supports(head, loss)
    check_head_supports("mm-lda", "trades")
    check_head_supports("softmax", "at", "cw")
    with pytest.raises(UserError, match="saturated"):
        check_head_supports("mmc", "at", "ce")
    with pytest.raises(UserError, match="has its own"):
        check_head_supports("softmax", "trades", "cw")


def test_standard_at_uses_the_heads_loss():
    torch.manual_seed(4)
    y = torch.randint(0, 10, (6,))
    logits_nat, logits_adv = -torch.rand(6, 10) * 50, -torch.rand(6, 10) * 50
    at = OBJECTIVES["at"]
    assert training_loss(at, Head("mmc"), logits_nat, logits_adv, y, 6.0).item() == pytest.approx(
        mmc_loss(logits_adv, y).item())
    assert training_loss(at, Head("softmax"), logits_nat, logits_adv, y, 6.0).item() == pytest.approx(
        F.cross_entropy(logits_adv, y).item())
    members_nat, members_adv = torch.randn(6, 3, 10), torch.randn(6, 3, 10)
    expected = adp_loss(members_adv, y, 2.0, 0.5) + adp_loss(members_nat, y, 2.0, 0.5)
    assert training_loss(at, Head("adp", 2.0, 0.5), members_nat, members_adv, y, 6.0).item() == pytest.approx(
        expected.item(), rel=1e-6)


def test_natural_training_never_attacks_and_uses_the_heads_loss(monkeypatch):
    import utils.training as training
    monkeypatch.setattr(training, "pgd_attack", lambda *a, **k: pytest.fail("natural training ran an attack"))
    torch.manual_seed(5)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head="mmc", feature_dim=16)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    step = make_adversarial_step(model, OBJECTIVES["natural"], lambda index: PGDConfig(), 6.0, torch.Generator(),
                                 head=Head("mmc"))
    loss, logits_nat, logits_adv, _ = step(x, y, 0)
    assert logits_adv is None and model.training
    assert loss.item() == pytest.approx(mmc_loss(model(x), y).item(), rel=1e-5)


def test_adversarial_step_of_an_ensemble_trains_on_its_members(monkeypatch):
    import utils.training as training
    torch.manual_seed(6)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head="adp", members=2)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    crafted = []
    original = training.pgd_attack
    monkeypatch.setattr(training, "pgd_attack", lambda *a: crafted.append(original(*a)) or crafted[-1])
    head = Head("adp", 2.0, 0.5)
    step = make_adversarial_step(model, OBJECTIVES["at"], lambda index: PGDConfig("linf", 0.1, 0.025, 2), 6.0,
                                 torch.Generator().manual_seed(0), head=head)
    loss, logits_nat, logits_adv, _ = step(x, y, 0)
    with member_outputs(model):
        expected = adp_loss(model(crafted[0]), y, 2.0, 0.5) + adp_loss(model(x), y, 2.0, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(logits_adv, model(crafted[0]), atol=1e-5), "the step must report the ensemble's logits"


@pytest.mark.parametrize("head_name", ["mmc", "adp", "rce"])
def test_namid_on_a_head_reads_its_logits_and_its_loss(head_name, monkeypatch):
    import utils.namid as namid_module
    torch.manual_seed(7)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head=head_name, feature_dim=16, members=2)
    with torch.no_grad():  # SmallCNN's zeroed last layer gives all-zero logits, where CE and RCE both equal log 10
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.any():
                module.weight.normal_(0, 0.5)
    estimators = build_estimators(1, 10, 16).eval().requires_grad_(False)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    crafted, seen = [], []
    original = namid_module.pgd_attack
    monkeypatch.setattr(namid_module, "pgd_attack", lambda *a: crafted.append(original(*a)) or crafted[-1])
    quantities = namid_module.mi_quantities
    def spy(estimators, local_nat, local_adv, logits_nat, logits_adv, measure, which):
        seen.append((logits_nat.detach(), logits_adv.detach()))
        return quantities(estimators, local_nat, local_adv, logits_nat, logits_adv, measure, which)
    monkeypatch.setattr(namid_module, "mi_quantities", spy)
    monkeypatch.setattr(namid_module, "select_misled", lambda nat, adv, y: torch.ones(len(y), dtype=torch.bool))
    head = head_for({"head": head_name}, type("Args", (), {"adp_alpha": 2.0, "adp_beta": 0.5}))
    step = make_namid_step(model, estimators, OBJECTIVES["at"], lambda index: PGDConfig("linf", 0.1, 0.025, 2),
                           torch.Generator().manual_seed(0), beta=6.0, alpha=0.5, lam=0.1, measure="dv", head=head)
    loss, logits_nat, logits_adv, extras = step(x, y, 0)
    model.eval()
    assert torch.allclose(seen[0][0], model(x), atol=1e-4) and torch.allclose(seen[0][1], model(crafted[0]), atol=1e-4)
    if head_name == "mmc":
        expected = mmc_loss(model(crafted[0]), y)
    elif head_name == "rce":  # the estimators and X' read -Z, the base loss is RCE on x~
        assert torch.allclose(seen[0][0], -model.net.network(model.normalize(x)), atol=1e-4)
        expected = rce_loss(model(crafted[0]), y)
    else:
        with member_outputs(model):
            expected = adp_loss(model(crafted[0]), y, 2.0, 0.5) + adp_loss(model(x), y, 2.0, 0.5)
    assert extras["base_loss"].item() == pytest.approx(expected.item(), rel=1e-4)


# ----------------------------------------------------------------------------------------------
# The stage scripts


TINY = ["--dataset", "fashion-mnist", "--train-limit", "100", "--val-size", "50", "--test-limit", "50",
        "--batch-size", "50", "--num-steps", "1", "--eval-steps", "1", "--warmup-epochs", "0", "--eps-ramp-epochs", "0",
        "--epochs", "1", "--device", "cpu", "--feature-dim", "16"]


def test_train_standard_trains_an_mmc_model_naturally_and_selects_on_clean_accuracy(fmnist_dir, tmp_path):
    model_dir = tmp_path / "mmc"
    assert train_standard.main(TINY + ["--data-dir", str(fmnist_dir), "--model-dir", str(model_dir), "--head", "mmc",
                                       "--loss", "natural"]) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["args"]["head"] == "mmc" and config["args"]["lr"] == 0.01 and config["args"]["grad_clip"] == 10.0
    assert config["train_attack"] is None and config["model_spec"]["head"] == "mmc"
    last = torch.load(model_dir / "last.pt", weights_only=True)
    assert last["best"]["key"] == "val_clean_acc"
    model, _ = load_model(model_dir / "best.pt", "cpu")
    assert (model(torch.rand(4, 1, 28, 28)) <= 0).all(), "the checkpoint must rebuild the MMC head"


def test_train_standard_trains_an_adp_ensemble_with_adam(fmnist_dir, tmp_path):
    model_dir = tmp_path / "adp"
    assert train_standard.main(TINY + ["--data-dir", str(fmnist_dir), "--model-dir", str(model_dir), "--head", "adp",
                                       "--members", "2", "--loss", "at"]) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["args"]["optimizer"] == "adam" and config["args"]["lr"] == 0.001
    last = torch.load(model_dir / "last.pt", weights_only=True)
    assert "exp_avg" in str(last["optimizer"]["state"][0].keys())
    model, _ = load_model(model_dir / "best.pt", "cpu")
    assert isinstance(model.net, Ensemble) and len(model.net.members) == 2


def test_trades_on_an_mmc_head_is_one_clear_error(fmnist_dir, tmp_path):
    result = run_script("train_standard.py", TINY + ["--data-dir", str(fmnist_dir), "--model-dir", str(tmp_path / "x"),
                                                     "--head", "mmc", "--loss", "trades"])
    assert_one_line_error(result, "saturated")
    assert not (tmp_path / "x").exists()


def test_namid_refuses_estimators_of_another_head(tiny_estimators, fmnist_dir, tmp_path):
    result = run_script("train_MIAT.py", ["--estimators", str(tiny_estimators), "--data-dir", str(fmnist_dir),
                                          "--head", "mmc", "--model-dir", str(tmp_path / "x"), "--device", "cpu",
                                          "--allow-uninformative-estimators"])
    assert_one_line_error(result, "softmax head")


def test_namid_takes_the_head_of_the_estimators_target(tiny_estimators):
    args = train_MIAT.build_parser().parse_args(["--estimators", str(tiny_estimators)])
    checkpoint = torch.load(tiny_estimators, weights_only=True)
    train_MIAT.resolve_args(args, checkpoint)
    assert args.head == "softmax"
    checkpoint["target_spec"]["head"] = "mm-lda"
    args = train_MIAT.build_parser().parse_args(["--estimators", str(tiny_estimators)])
    train_MIAT.resolve_args(args, checkpoint)
    assert args.head == "mm-lda" and args.lr == 0.01


# ----------------------------------------------------------------------------------------------
# The adaptive attacks on tiny trained models of each defense


def train_naturally(model, head, batches, epochs=2):
    train_x, train_y = batches[0][:2000], batches[1][:2000]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    model.train()
    for _ in range(epochs):
        for i in torch.randperm(len(train_x)).split(64):
            optimizer.zero_grad()
            head.loss(head.outputs(model, train_x[i]), train_y[i]).backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("head_name", ["mmc", "adp"])
def test_each_adaptive_attack_lowers_the_accuracy_of_a_trained_model_of_its_defense(head_name, fmnist_batches):
    """eps 0.2: a briefly trained natural ensemble of SmallCNNs keeps ~30 % under PGD-40 at 0.1 on Fashion-MNIST."""
    import test_comparison
    from utils.data import dataset_info
    from utils.evaluation import build_attacks, isolated_rng
    info = dataset_info("fashion-mnist")
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1, 28, info.mean, info.std, head=head_name, feature_dim=16, members=2)
    model = train_naturally(model, Head(head_name, 2.0, 0.5), fmnist_batches)
    x, y = fmnist_batches[2][:24], fmnist_batches[3][:24]
    clean = (model(x).argmax(1) == y).float().mean().item()
    assert clean >= 0.6, f"the tiny {head_name} model did not train ({clean:.2f})"
    if head_name == "mmc":
        assert (model(x) <= 0).all()
    args = test_comparison.build_parser().parse_args(
        ["--checkpoints", "unused.pt", "--epsilon", "0.2", "--mt-steps", "10", "--restarts", "2", "--restarts-steps", "20"])
    names = ["pgd-mt", "aa"] if head_name == "mmc" else ["pgd-restarts", "aa", "bim-p"]
    for attack in build_attacks(names, test_comparison.resolve_settings(args, info), 10):
        with isolated_rng(0, torch.device("cpu")):
            x_adv = attack.craft(model, x, y, torch.Generator().manual_seed(0)).x_adv
        assert (x_adv - x).abs().max() <= 0.2 + 1e-6
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
        assert robust <= clean - 0.3, f"{attack.name} left {robust:.2f} of {clean:.2f} on {head_name}"
