"""The information-theoretically optimal attacks (utils/optimal_mi.py, optimal_mi_attack.py): closed forms against
known values and against the grid solvers, the almost-sure threshold, blind against input-aware attackers, the
k-copy reduction against a brute force in R^2, and the command line. Our formulation of the problem posed in
Yi, Mudumbai and Xu 2020 (docs/method.md section 13)."""
import csv
import json

import numpy as np
import pytest

import optimal_mi_attack
from tests.helpers import assert_one_line_error, run_script
from utils import optimal_mi as om
from utils.errors import UserError

BINARY = dict(px=[0.5, 0.5], xs=[-1.0, 1.0])


def plane(points=61, half_width=1.2):
    axis = np.linspace(-half_width, half_width, points)
    return np.array(np.meshgrid(axis, axis)).reshape(2, -1).T


# ---------------------------------------------------------------------------------------------------------
# 1-3, 5: Gaussian closed forms

def test_gaussian_attack_spends_the_budget_and_leaves_half_log_variance_over_budget():
    sigma2, P = 2.0, 0.5
    attack = om.gaussian_attack(sigma2, P)
    assert attack.exact
    assert attack.a ** 2 * sigma2 + attack.w_var == pytest.approx(P, rel=1e-12)  # E D^2
    assert (1 - attack.a) ** 2 * sigma2 + attack.w_var == pytest.approx(sigma2 - P, rel=1e-12)  # Var(X + D)
    assert attack.mi == pytest.approx(0.5 * np.log(sigma2 / P), rel=1e-12)
    assert om.gaussian_attack(sigma2, sigma2).mi == 0 and om.gaussian_attack(sigma2, 3 * sigma2).mi == 0

    rng = np.random.default_rng(0)
    x = rng.normal(0, np.sqrt(sigma2), 100_000)
    delta = -attack.a * x + rng.normal(0, np.sqrt(attack.w_var), x.size)
    assert np.mean(delta ** 2) == pytest.approx(P, rel=0.02)
    assert np.mean(x * delta) == pytest.approx(-P, rel=0.02)


def test_blahut_arimoto_on_a_discretised_gaussian_traces_its_rate_distortion_curve():
    xs, px = om.discretized_gaussian(1.0, 601, 6.0)
    for point, beta in zip(om.rd_curve(px, xs, xs, [1, 2, 5]), [1, 2, 5]):
        assert point.cost == pytest.approx(1 / (2 * beta), abs=2e-3)
        assert point.mi == pytest.approx(0.5 * np.log(1 / point.cost), abs=2e-3)
    attack = om.rd_attack(px, xs, xs, 0.25)
    assert attack.cost == pytest.approx(0.25, rel=1e-9)
    assert attack.mi == pytest.approx(0.5 * np.log(4), abs=2e-3)


def test_gaussian_with_observation_noise_is_exact_only_where_the_linear_attack_is_feasible():
    attack = om.gaussian_attack(1.0, 0.3, noise_var=0.1)
    assert attack.exact and attack.mi == pytest.approx(0.5 * np.log(2.5), abs=1e-6)
    assert attack.mi == pytest.approx(0.458145, abs=1e-6)
    assert attack.a ** 2 + attack.w_var == pytest.approx(0.3)
    shrink = om.gaussian_attack(1.0, 0.1, noise_var=0.3)  # (P+s)(1-(P+s)) = 0.24 < s: infeasible
    assert not shrink.exact and shrink.w_var == 0 and shrink.a == pytest.approx(np.sqrt(0.1))
    assert shrink.mi == pytest.approx(0.5 * np.log1p((1 - np.sqrt(0.1)) ** 2 / 0.3))
    assert shrink.mi > 0.5 * np.log(1 / 0.4)  # above the lower bound R(P + s)


def test_reverse_water_filling_spends_the_budget_on_the_weak_directions():
    lam, P = np.array([4.0, 1.0, 0.25]), 1.5
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(3, 3)))
    cov = rotation @ np.diag(lam) @ rotation.T
    attack = om.gaussian_vector_attack(cov, P)
    assert attack.water_level == pytest.approx(0.625, abs=1e-9)
    assert sorted(attack.distortions) == pytest.approx([0.25, 0.625, 0.625])
    assert attack.mi == pytest.approx(1.163151, abs=1e-6)
    # E|D|^2 of D = -A X + W, and the information of the Gaussian channel it defines, from A and W alone
    assert np.trace(attack.A @ cov @ attack.A.T) + np.trace(attack.w_cov) == pytest.approx(P, rel=1e-9)
    attacked = (np.eye(3) - attack.A) @ cov @ (np.eye(3) - attack.A).T + attack.w_cov
    kept = rotation[:, lam > 0.625]  # the erased direction (lambda = 0.25 <= theta) carries nothing
    info = 0.5 * np.log(np.linalg.det(kept.T @ attacked @ kept) / np.linalg.det(kept.T @ attack.w_cov @ kept))
    assert info == pytest.approx(attack.mi, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# 4: binary antipodal signal

@pytest.mark.parametrize("P, q, b, bits", [(0.36, 0.1, 0.8, 0.531004), (0.75, 0.25, 0.5, 0.188722),
                                           (0.19, 0.05, 0.9, 0.713603)])
def test_binary_attack_matches_its_formula_and_blahut_arimoto(P, q, b, bits):
    attack = om.binary_attack(P, bits=True)
    assert (attack.q, attack.b, attack.mi) == (pytest.approx(q), pytest.approx(b), pytest.approx(bits, abs=1e-6))
    assert 4 * attack.q * (1 - attack.q) == pytest.approx(P)  # E D^2 of the two-point law
    solved = om.rd_attack(**BINARY, outputs=np.linspace(-1.2, 1.2, 481), budget=P, max_iter=2000)
    assert solved.cost == pytest.approx(P, rel=1e-9)
    assert solved.mi_bits() == pytest.approx(bits, abs=1e-3)
    assert om.binary_attack(1.0).mi == 0 and om.binary_attack(1e-4).mi < np.log(2)  # any budget > 0 helps


# ---------------------------------------------------------------------------------------------------------
# 6: almost-sure budget

@pytest.mark.parametrize("levels, eps, bits", [(3, 0.5, 2 / 3), (4, 0.5, 1.0), (2, 0.5, 0.0), (5, 1.0, 0.8)])
def test_support_attack_on_pam(levels, eps, bits):
    xs, px = om.pam(levels)
    attack = om.support_attack(px, xs, om.attack_grid(xs, 0.05, eps), eps)
    assert attack.mi_bits() == pytest.approx(bits, abs=1e-3)
    assert attack.max_norm() <= eps + 1e-9


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_almost_sure_budgets_below_half_the_class_spacing_leave_all_the_information(spacing):
    xs, px = om.pam(3, spacing)
    below = spacing / 2 * (1 - 1e-3)
    for eps in (0.25 * spacing, below):
        assert om.support_attack(px, xs, om.attack_grid(xs, 0.05, eps), eps).mi == pytest.approx(np.log(3), abs=1e-12)
    at_half = spacing / 2
    assert om.support_attack(px, xs, om.attack_grid(xs, 0.05, at_half), at_half).mi_bits() == pytest.approx(2 / 3, abs=1e-3)


# ---------------------------------------------------------------------------------------------------------
# 7: observation noise

def test_noisy_attack_under_an_almost_sure_budget_is_the_shrink():
    grid = np.round(np.arange(-1.5, 1.5 + 1e-9, 0.02), 10)
    attack = om.noisy_attack(**BINARY, outputs=grid, noise_std=0.5, eps=0.5)
    assert om.binary_awgn_mi(0.5, 0.5, bits=True) == pytest.approx(0.4859, abs=1e-4)
    assert attack.mi_bits() == pytest.approx(0.4859, abs=2e-3)
    assert attack.mi_bits() == pytest.approx(om.binary_awgn_mi(0.5, 0.5, bits=True), abs=2e-3)
    deltas, probs = attack.perturbations(1, 1e-3)
    assert deltas[np.argmax(probs), 0] == pytest.approx(-0.5) and probs.max() > 0.99
    assert om.binary_awgn_mi(1.0, 0.5, bits=True) == pytest.approx(0.9128, abs=1e-4)  # clean


# ---------------------------------------------------------------------------------------------------------
# 8: k copies

@pytest.mark.parametrize("P", [0.40, 0.065])
def test_k_copies_under_an_expected_budget_match_a_brute_force_in_the_plane(P):
    lifted = om.redundant_attack(**BINARY, outputs=np.linspace(-1.2, 1.2, 481), k=2, budget=P, max_iter=2000)
    brute = om.rd_attack([0.5, 0.5], [[-1, -1], [1, 1]], plane(), P, max_iter=2000)
    assert lifted.cost == pytest.approx(P, rel=1e-9) and brute.cost == pytest.approx(P, rel=1e-9)
    assert lifted.mi_bits() == pytest.approx(brute.mi_bits(), abs=1e-3)
    assert lifted.mi_bits() == pytest.approx(om.binary_attack(P / 2, bits=True).mi, abs=1e-3)


def test_k_copies_protect_against_l2_but_not_linf_almost_sure_budgets():
    xs, px = om.pam(3)
    pair = np.repeat(xs[:, None], 2, axis=1)
    grid = np.round(np.arange(-0.75, 2.75 + 1e-9, 0.05), 10)
    square = np.array(np.meshgrid(grid, grid)).reshape(2, -1).T
    for p, eps, bits in ((np.inf, 0.5, 2 / 3), (2, 0.5, np.log2(3)), (2, 0.5 * np.sqrt(2), 2 / 3)):
        brute = om.support_attack(px, pair, square, eps, p)
        lifted = om.redundant_attack(px, xs, om.attack_grid(xs, 0.05, eps), 2, eps, "almost-sure", p)
        assert brute.mi_bits() == pytest.approx(bits, abs=1e-3) and lifted.mi_bits() == pytest.approx(bits, abs=1e-3)
        assert lifted.max_norm(p) <= eps + 1e-9


def test_redundant_budget_scaling():
    assert om.redundant_budget(0.8, 4) == pytest.approx(0.2)
    assert om.redundant_budget(0.8, 4, "almost-sure", 2) == pytest.approx(0.4)
    assert om.redundant_budget(0.8, 4, "almost-sure", 1) == pytest.approx(0.2)
    assert om.redundant_budget(0.8, 4, "almost-sure", np.inf) == 0.8
    for k in (1, 2, 8):
        assert om.redundant_gaussian_attack(1.0, 0.3, k).mi == pytest.approx(0.5 * np.log(k / 0.3))
    assert om.redundant_gaussian_attack(1.0, 0.3, 4, 0.1).mi == pytest.approx(1.1513, abs=1e-4)


# ---------------------------------------------------------------------------------------------------------
# 9: blind noise

def test_blind_noise_never_beats_the_input_aware_attack():
    deltas = np.round(np.arange(-4, 4 + 1e-9, 0.1), 10)
    grid = np.linspace(-1, 1, 201)
    for P in (0.1, 0.5):
        blind = om.blind_noise_attack(**BINARY, deltas=deltas, budget=P)
        aware = om.rd_attack(**BINARY, outputs=grid, budget=P, max_iter=1000)
        assert blind.cost == pytest.approx(P, rel=1e-6)
        assert blind.mi > aware.mi + 0.05 and aware.mi >= om.binary_attack(P).mi - 1e-6
        p = P / 4  # the solver's law on this lattice: +-2 with probability P/8 each (a regression value)
        assert blind.mi / om.LN2 == pytest.approx(1 + om.binary_entropy(p / 2) - om.binary_entropy(p) - p, abs=1e-3)


def test_blind_noise_on_a_gaussian_approaches_the_gaussian_worst_noise():
    lattice = np.round(np.arange(-6, 6 + 1e-9, 0.2), 10)
    px = np.exp(-lattice ** 2 / 2) / np.exp(-lattice ** 2 / 2).sum()
    for P in (0.25, 1.0):
        blind = om.blind_noise_attack(px, lattice, lattice[np.abs(lattice) <= 4], P)
        assert blind.mi == pytest.approx(om.blind_gaussian_mi(1.0, P), abs=1e-2)
        assert blind.mi > om.gaussian_attack(1.0, P).mi + 0.1


# ---------------------------------------------------------------------------------------------------------
# The command line

def test_cli_json_has_the_minimum_the_budget_and_the_law(capsys):
    optimal_mi_attack.main(["binary", "--budget", "0.36", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["mi_bits"] == pytest.approx(0.531004, abs=1e-6) and report["mi_nats"] == pytest.approx(0.531004 * np.log(2), abs=1e-6)
    assert (report["budget"], report["constraint"]) == (0.36, "expected")
    upper = report["distribution"]["per_point"][1]
    assert upper["x"] == 1 and upper["deltas"] == pytest.approx([-0.2, -1.8]) and upper["probs"] == pytest.approx([0.9, 0.1])

    optimal_mi_attack.main(["discrete", "--points", "0", "1", "2", "--budget", "0.5", "--constraint", "almost-sure",
                            "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["mi_bits"] == pytest.approx(2 / 3, abs=1e-3) and report["constraint"] == "almost-sure"
    middle = report["distribution"]["per_point"][1]
    assert sorted(atom["delta"] for atom in middle["atoms"]) == pytest.approx([-0.5, 0.5])

    optimal_mi_attack.main(["gaussian", "--budget", "0.3", "--noise-var", "0.1", "--bits"])
    assert "0.660964 bits" in capsys.readouterr().out  # 1/2 log2(2.5)


def test_cli_bad_input_is_one_line_on_stderr():
    assert_one_line_error(run_script("optimal_mi_attack.py", ["binary", "--budget", "-1"]), "--budget")
    with pytest.raises(UserError, match="probs"):
        optimal_mi_attack.main(["discrete", "--points", "0", "1", "--probs", "0.3", "--budget", "1"])


def test_cli_figures_writes_the_five_experiments(tmp_path):
    optimal_mi_attack.main(["figures", "--quick", "--out", str(tmp_path)])
    names = ["fig1_mi_vs_budget", "fig2_discrete_signals", "fig3_noisy_binary", "fig4_mi_vs_copies",
             "fig5_budget_vs_copies"]
    for name in names:
        with open(tmp_path / f"{name}.csv") as handle:
            rows = list(csv.DictReader(handle))
        assert rows and set(rows[0]) == {"series", "x_name", "x", "y_name", "y"}
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
