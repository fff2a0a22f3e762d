"""The Frank-Wolfe Wasserstein attack: the transport geometry, the LMO, the box repair, and the
Wasserstein-ball constraint on returned examples (cost <= radius * mass, mass conservation, [0, 1])."""
import random

import numpy as np
import pytest
import torch

from utils.fwa import (FWAConfig, LocalTransport, capacity_repair, fw_wasserstein_attack, linear_minimisation_oracle,
                       transport_budget)

RADIUS = 0.1


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def assert_feasible(plan, x, x_adv, geometry, radius, atol=1e-5):
    """The plan is a transport plan from x to x_adv within the Wasserstein ball, and x_adv is an image."""
    assert plan.min() >= 0, "negative mass in the plan"
    assert not plan.masked_select(~geometry.valid.expand_as(plan)).any(), "mass sent outside the image"
    assert torch.allclose(geometry.source_mass(plan), x, atol=atol), "row sums differ from x: mass not conserved"
    assert torch.allclose(geometry.image_of(plan), x_adv, atol=atol), "the returned image is not the plan's image"
    cost, budget = geometry.cost_of(plan.double()), transport_budget(x.double(), radius)
    assert (cost <= budget * (1 + 1e-5) + 1e-6).all(), f"cost/budget up to {(cost / budget).max():.6f}"
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_fold_is_the_adjoint_of_unfold_and_costs_are_pixel_distances():
    geometry = LocalTransport(6, 7, 5, "cpu")
    image, plan = torch.rand(2, 3, 6, 7), torch.rand(2, 3, 25, 42) * geometry.valid
    assert torch.allclose((geometry.gather(image) * plan).sum(), (image * geometry.image_of(plan)).sum(), rtol=1e-5)
    assert geometry.cost.flatten()[geometry.centre] == 0
    assert sorted({round(float(c), 4) for c in geometry.cost.flatten()}) == [0, 1, 1.4142, 2, 2.2361, 2.8284]
    x = torch.rand(2, 3, 6, 7)
    identity = geometry.identity_plan(x)
    assert torch.equal(geometry.image_of(identity), x) and geometry.cost_of(identity).abs().max() == 0
    # A corner pixel can move to 9 places of its 5x5 window, a central one to all 25.
    valid = geometry.valid.reshape(25, 6, 7)
    assert valid[:, 0, 0].sum() == 9 and valid[:, 3, 3].sum() == 25


@pytest.mark.parametrize("radius", [0.005, 0.1, 50.0])
def test_lmo_is_feasible_and_spends_a_binding_budget(radius):
    torch.manual_seed(0)
    x = torch.rand(4, 2, 10, 10)
    geometry = LocalTransport(10, 10, 5, "cpu")
    gradient = geometry.gather(torch.randn(4, 2, 10, 10)).clamp(-1, 1)
    budget = transport_budget(x, radius)
    plan = linear_minimisation_oracle(gradient, x, geometry, budget, FWAConfig(radius=radius))
    assert plan.min() >= 0 and torch.allclose(geometry.source_mass(plan), x, atol=1e-5)
    cost = geometry.cost_of(plan)
    assert (cost <= budget).all()
    if radius < 1:  # the budget binds: the oracle uses (nearly) all of it
        assert (cost >= 0.99 * budget).all(), (cost / budget)
    else:  # a budget that cannot bind: mass goes to the best destination in each window
        best = gradient.masked_fill(~geometry.valid, -2).argmax(dim=2)
        assert (plan.argmax(dim=2) == best).float().mean() > 0.95


def test_capacity_repair_keeps_mass_and_cost_and_fits_the_box():
    x = torch.full((1, 1, 5, 5), 0.9)
    geometry = LocalTransport(5, 5, 3, "cpu")
    # The 8 neighbours of pixel (2, 2) send it 80 % of their mass: a pile of mass far above 1.
    plan = torch.zeros(1, 1, 9, 25)
    for i in range(25):
        row, col = divmod(i, 5)
        offset = (2 - row + 1) * 3 + (2 - col + 1) if abs(row - 2) <= 1 and abs(col - 2) <= 1 else None
        if offset is not None and offset != geometry.centre:
            plan[0, 0, offset, i], plan[0, 0, geometry.centre, i] = 0.72, 0.18
        else:
            plan[0, 0, geometry.centre, i] = 0.9
    assert geometry.image_of(plan).max() > 5
    repaired = capacity_repair(plan, x, geometry, rounds=50)
    image = geometry.image_of(repaired)
    assert image.max() <= 1 + 1e-6 and repaired.min() >= 0
    assert torch.allclose(geometry.source_mass(repaired), x)
    assert geometry.cost_of(repaired) <= geometry.cost_of(plan)
    assert image[0, 0, 2, 2] == pytest.approx(1.0, abs=1e-6), "the repair should fill the pixel, not empty it"
    # The conservative fallback alone (no rounds) is feasible too.
    fallback = capacity_repair(plan, x, geometry, rounds=0)
    assert geometry.image_of(fallback).max() <= 1 + 1e-6
    assert torch.allclose(geometry.source_mass(fallback), x)


@pytest.fixture(scope="module")
def fwa_run(trained_small_cnn, fmnist_batches):
    """FWA-40 (kernel 5) at radius 0.1 on 16 test images of the briefly trained SmallCNN."""
    _, _, x, y = fmnist_batches
    x, y = x[:16], y[:16]
    x_adv, plan = fw_wasserstein_attack(trained_small_cnn, x, y, FWAConfig(radius=RADIUS), return_plan=True)
    return x, y, x_adv, plan


def test_fwa_examples_lie_in_the_wasserstein_ball(fwa_run):
    x, _, x_adv, plan = fwa_run
    geometry = LocalTransport(28, 28, 5, "cpu")
    assert_feasible(plan, x, x_adv, geometry, RADIUS)
    assert (x_adv - x).abs().amax() > 0.1, "the attack moved no mass"
    # Moving mass changes pixel values a lot (L-inf) while the total mass stays the same.
    assert torch.allclose(x_adv.flatten(1).sum(1), x.flatten(1).sum(1), rtol=1e-4)


def test_fwa_lowers_accuracy(trained_small_cnn, fwa_run):
    x, y, x_adv, _ = fwa_run
    clean, attacked = accuracy(trained_small_cnn, x, y), accuracy(trained_small_cnn, x_adv, y)
    assert attacked < clean - 0.2, f"FWA barely lowered accuracy: clean {clean:.3f}, FWA {attacked:.3f}"


def test_fwa_is_deterministic_and_leaves_no_trace(trained_small_cnn, fmnist_batches):
    _, _, x, y = fmnist_batches
    model = trained_small_cnn.train()
    for p in model.parameters():
        p.grad = None  # the fixture's training leaves gradients behind
    flags = [p.requires_grad for p in model.parameters()]
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    config = FWAConfig(radius=RADIUS, num_steps=3)
    a = fw_wasserstein_attack(model, x[:4], y[:4], config)
    b = fw_wasserstein_attack(model, x[:4], y[:4], config)
    assert torch.equal(a, b) and not a.requires_grad
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    model.eval()


def test_fwa_config_rejects_bad_settings():
    for bad in (dict(kernel_size=4), dict(kernel_size=1), dict(radius=0.0), dict(num_steps=0)):
        with pytest.raises(ValueError):
            FWAConfig(**bad)
