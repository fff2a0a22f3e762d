"""RCE (defenses/rce.py): the reversed logits, the reverse cross-entropy against a hand computation, the
penultimate feature, and the wiring into stage 1 (natural training and AT with --head rce, TRADES refused)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import train_standard
from defenses import HEAD_NAMES, Head
from defenses.rce import ReversedLogits, penultimate_features, rce_loss
from models import build_model
from tests.helpers import assert_one_line_error, run_script
from utils.attacks import PGDConfig
from utils.errors import UserError
from utils.losses import OBJECTIVES, check_head_supports, training_loss
from utils.training import load_model, make_adversarial_step, model_from_spec


def rce_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head="rce")
    torch.nn.init.normal_(model.net.network.classifier.fc3.weight, std=0.5)  # not the zero init: distinct logits
    return model.eval()


def test_the_model_exposes_minus_z_and_predicts_argmin_z():
    model = rce_model()
    x = torch.rand(16, 1, 28, 28)
    raw = model.net.network(model.normalize(x))  # Z, the network's own output
    assert isinstance(model.net, ReversedLogits) and "rce" in HEAD_NAMES
    assert torch.equal(model(x), -raw)
    assert torch.equal(model(x).argmax(dim=1), raw.argmin(dim=1))
    assert not torch.equal(model(x).argmax(dim=1), raw.argmax(dim=1))


def test_rce_loss_matches_a_hand_computation():
    z = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    y = torch.tensor([0, 2])
    expected = 0.0
    for row, label in zip(z.tolist(), y.tolist()):
        log_softmax = [v - math.log(sum(math.exp(u) for u in row)) for v in row]
        expected += -sum(log_softmax[j] / 2 for j in range(3) if j != label)  # R_y = 1/(L-1) off y, 0 on y
    assert rce_loss(-z, y).item() == pytest.approx(expected / 2, rel=1e-6)  # the model's logits are h = -Z
    assert Head("rce").loss(-z, y).item() == pytest.approx(expected / 2, rel=1e-6)
    # the authors' form: (sum y log softmax(Z) - sum log softmax(Z)) / (L - 1)
    log_p = F.log_softmax(z, 1)
    authors = ((F.one_hot(y, 3) * log_p).sum(1) - log_p.sum(1)) / 2
    assert rce_loss(-z, y).item() == pytest.approx(authors.mean().item(), rel=1e-6)


def test_rce_loss_is_minimal_at_the_reverse_label():
    y = torch.tensor([3])
    at_reverse = torch.log(torch.full((1, 10), 1 / 9).index_fill(1, y, 1e-12))  # Z with softmax(Z) = R_y
    assert rce_loss(-at_reverse, y).item() == pytest.approx(math.log(9), rel=1e-4)
    assert rce_loss(torch.zeros(1, 10), y).item() > math.log(9)


def test_training_with_rce_raises_argmin_accuracy_and_lowers_argmax_accuracy(fmnist_batches):
    x, y = fmnist_batches[0][:1024], fmnist_batches[1][:1024]
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head="rce")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        for index in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            Head("rce").loss(model(x[index]), y[index]).backward()
            optimizer.step()
    with torch.no_grad():
        z = model.net.network(model.normalize(x))
    assert (z.argmin(1) == y).float().mean() > 0.4 > 0.05 > (z.argmax(1) == y).float().mean()


def test_penultimate_features_are_the_input_of_the_last_linear_layer():
    model = rce_model()
    x = torch.rand(4, 1, 28, 28)
    network = model.net.network
    hidden = network.classifier[:-1](torch.flatten(network.feature_extractor(model.normalize(x)), 1))
    assert torch.allclose(penultimate_features(model, x), hidden)
    resnet = build_model("resnet18", 10, 3, 32, (0.5,) * 3, (0.5,) * 3, width=8).eval()
    images = torch.rand(2, 3, 32, 32)
    features = penultimate_features(resnet, images)
    assert features.shape == (2, 64) and torch.allclose(resnet.net.linear(features), resnet(images), atol=1e-6)
    for head in ("mmc", "adp"):
        with pytest.raises(UserError, match="softmax or rce"):
            penultimate_features(build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,), head=head, feature_dim=16,
                                             members=2), x)


def test_rce_rebuilds_from_its_spec():
    spec = dict(arch="small-cnn", dataset="fashion-mnist", num_classes=10, in_channels=1, image_size=28, mean=[0.5],
                std=[0.5], width=64, depth=34, widen_factor=10, head="rce")
    model, copy = rce_model(), model_from_spec(spec)
    copy.load_state_dict(model.state_dict())
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model(x), copy.eval()(x))


def test_adversarial_training_with_rce_attacks_the_reversed_logits_and_trains_on_rce(monkeypatch):
    import utils.training as training
    model = rce_model(3).train()
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    crafted = []
    original = training.pgd_attack
    monkeypatch.setattr(training, "pgd_attack", lambda *a: crafted.append((a[3], original(*a))) or crafted[-1][1])
    step = make_adversarial_step(model, OBJECTIVES["at"], lambda index: OBJECTIVES["at"].training_attack(
        PGDConfig("linf", 0.1, 0.025, 2), Head("rce")), 6.0, torch.Generator().manual_seed(0), head=Head("rce"))
    loss, _, logits_adv, _ = step(x, y, 0)
    config, x_adv = crafted[0]
    assert config.loss == "ce", "the inner attack: cross-entropy on the model's logits h = -Z"
    model.eval()
    assert loss.item() == pytest.approx(rce_loss(model(x_adv), y).item(), rel=1e-5)
    assert training_loss(OBJECTIVES["at"], Head("rce"), None, model(x_adv), y, 6.0).item() == pytest.approx(
        rce_loss(model(x_adv), y).item())


def test_trades_and_mart_are_refused_with_rce():
    for loss in ("trades", "mart"):
        with pytest.raises(UserError, match="argmin Z"):
            check_head_supports("rce", loss)
    check_head_supports("rce", "at")
    check_head_supports("rce", "natural")


TINY = ["--dataset", "fashion-mnist", "--train-limit", "100", "--val-size", "50", "--test-limit", "50",
        "--batch-size", "50", "--num-steps", "2", "--eval-steps", "2", "--warmup-epochs", "0", "--eps-ramp-epochs", "0",
        "--epochs", "1", "--device", "cpu"]


@pytest.mark.parametrize("loss", ["natural", "at"])
def test_train_standard_with_head_rce(loss, fmnist_dir, tmp_path):
    model_dir = tmp_path / loss
    assert train_standard.main(TINY + ["--data-dir", str(fmnist_dir), "--model-dir", str(model_dir), "--head", "rce",
                                       "--loss", loss]) == 0
    config = json.loads((model_dir / "config.json").read_text())
    assert config["args"]["head"] == "rce" and config["args"]["lr"] == 0.1 and config["args"]["optimizer"] == "sgd"
    assert config["model_spec"]["head"] == "rce"
    assert (config["train_attack"] is None) == (loss == "natural")
    model, checkpoint = load_model(model_dir / "best.pt", "cpu")
    assert isinstance(model.net, ReversedLogits), "the checkpoint must rebuild the RCE head"
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), -model.net.network(model.normalize(x)))


def test_rce_with_trades_is_one_clear_error(fmnist_dir, tmp_path):
    result = run_script("train_standard.py", TINY + ["--data-dir", str(fmnist_dir), "--model-dir", str(tmp_path / "x"),
                                                     "--head", "rce", "--loss", "trades"])
    assert_one_line_error(result, "argmin Z")
    assert not (tmp_path / "x").exists()
