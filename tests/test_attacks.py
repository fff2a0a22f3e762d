"""PGD: budgets, range, side effects, effectiveness, and agreement with torchattacks."""
import pytest
import torch

from utils.attacks import PGDConfig, cw_margin, perturbation_norms, pgd_attack, project


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("norm,epsilon,step", [("linf", 0.1, 0.025), ("l2", 1.5, 0.375)])
@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_stays_in_ball_and_range(trained_small_cnn, fmnist_batches, norm, epsilon, step, loss):
    _, _, x, y = fmnist_batches
    x, y = x[:64], y[:64]
    x_adv = pgd_attack(trained_small_cnn, x, y, PGDConfig(norm, epsilon, step, 5, loss=loss),
                       torch.Generator().manual_seed(0))
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert perturbation_norms(x_adv, x, norm).max() <= epsilon * (1 + 1e-5)
    assert not x_adv.requires_grad


def test_l2_random_start_is_inside_ball_and_uses_it():
    delta = project(torch.randn(8, 1, 28, 28) * 10, "l2", 0.5)
    assert torch.allclose(delta.flatten(1).norm(dim=1), torch.full((8,), 0.5), atol=1e-5)
    small = torch.full((2, 3), 0.01)
    assert torch.equal(project(small, "l2", 0.5), small)


def test_pgd_restores_mode_and_leaves_no_gradients_or_rng_change(trained_small_cnn, fmnist_batches):
    _, _, x, y = fmnist_batches
    model = trained_small_cnn.train()
    for p in model.parameters():
        p.grad = None
    flags = [p.requires_grad for p in model.parameters()]
    state = torch.get_rng_state()
    pgd_attack(model, x[:16], y[:16], PGDConfig("linf", 0.1, 0.025, 3))
    assert model.training, "the model's train mode was not restored"
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), state), "the attack drew from the global RNG"
    model.eval()


def test_pgd_is_reproducible_with_a_seeded_generator(trained_small_cnn, fmnist_batches):
    _, _, x, y = fmnist_batches
    config = PGDConfig("linf", 0.1, 0.025, 3)
    a = pgd_attack(trained_small_cnn, x[:16], y[:16], config, torch.Generator().manual_seed(3))
    b = pgd_attack(trained_small_cnn, x[:16], y[:16], config, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_cw_margin_by_hand():
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 0.5]])
    assert torch.allclose(cw_margin(logits, torch.tensor([0, 0])), torch.tensor([1.0 - 2.0, 3.0 - 0.0]))


@pytest.mark.parametrize("norm,epsilon", [("linf", 0.1), ("l2", 1.5)])
def test_pgd_lowers_accuracy_and_agrees_with_torchattacks(trained_small_cnn, fmnist_batches, norm, epsilon):
    torchattacks = pytest.importorskip("torchattacks")
    _, _, x, y = fmnist_batches
    model = trained_small_cnn
    steps, step = 20, epsilon / 4
    clean = accuracy(model, x, y)
    ours = accuracy(model, pgd_attack(model, x, y, PGDConfig(norm, epsilon, step, steps), torch.Generator().manual_seed(0)), y)
    oracle_cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    torch.manual_seed(0)
    theirs = accuracy(model, oracle_cls(model, eps=epsilon, alpha=step, steps=steps, random_start=True)(x, y), y)
    assert clean > 0.7, f"the fixture model is too weak to test against ({clean:.3f})"
    assert ours < clean - 0.2, f"PGD barely lowered accuracy: clean {clean:.3f}, PGD {ours:.3f}"
    assert abs(ours - theirs) <= 0.01, f"ours {ours:.3f} vs torchattacks {theirs:.3f}"


class ConstantModel(torch.nn.Module):
    """Logits that do not depend on the input: every gradient is zero, so PGD's steps are zero and its
    result is exactly its (projected, clipped) random start."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x):
        return self.bias.expand(len(x), 2) + 0 * x.flatten(1).sum(dim=1, keepdim=True)


def test_pgd_starts_uniformly_in_the_linf_ball():
    x, y = torch.full((64, 1, 28, 28), 0.5), torch.zeros(64, dtype=torch.long)
    eps = 0.1
    delta = pgd_attack(ConstantModel(), x, y, PGDConfig("linf", eps, 0.025, 3), torch.Generator().manual_seed(0)) - x
    # U(-eps, eps) per pixel: mean 0, mean |delta| eps/2, std eps/sqrt(3), reaching close to +-eps
    assert abs(delta.mean().item()) < 0.002
    assert delta.abs().mean().item() == pytest.approx(eps / 2, rel=0.02)
    assert delta.std().item() == pytest.approx(eps / 3 ** 0.5, rel=0.02)
    assert delta.abs().max().item() > 0.99 * eps and delta.abs().max().item() <= eps + 1e-6
    other = pgd_attack(ConstantModel(), x, y, PGDConfig("linf", eps, 0.025, 3), torch.Generator().manual_seed(1)) - x
    assert not torch.equal(delta, other), "the start does not come from the generator"


def test_pgd_starts_uniformly_in_the_l2_ball():
    x, y = torch.full((2000, 1, 4, 4), 0.5), torch.zeros(2000, dtype=torch.long)
    eps, d = 0.3, 16
    delta = pgd_attack(ConstantModel(), x, y, PGDConfig("l2", eps, 0.1, 2), torch.Generator().manual_seed(0)) - x
    radius = delta.flatten(1).norm(dim=1)
    # uniform in the ball: P(r <= t eps) = t^d, so E[r] = eps d / (d + 1); directions average out
    assert radius.max().item() <= eps * (1 + 1e-5)
    assert radius.mean().item() == pytest.approx(eps * d / (d + 1), rel=0.01)
    assert (radius <= 0.5 ** (1 / d) * eps).float().mean().item() == pytest.approx(0.5, abs=0.05)
    assert delta.mean(dim=0).abs().max().item() < 0.01


def test_the_training_and_evaluation_attacks_start_uniformly():
    """Standard AT trains and every stage evaluates with the uniform start; TRADES and MART use their small
    Gaussian one (their reference code)."""
    from utils.losses import OBJECTIVES
    base = PGDConfig("linf", 0.1, 0.025, 10)
    assert base.random_start == "uniform"
    assert OBJECTIVES["at"].training_attack(base).random_start == "uniform"
    assert OBJECTIVES["trades"].training_attack(base).random_start == "normal"
    assert OBJECTIVES["mart"].training_attack(base).random_start == "normal"
