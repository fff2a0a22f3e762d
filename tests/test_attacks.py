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
