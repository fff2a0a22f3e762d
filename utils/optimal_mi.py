"""Information-theoretically optimal attacks: the law of a perturbation D that minimises the mutual
information between a signal X and its attacked version X + D, under a budget on D.

This is our formulation of the problem posed in Yi, Mudumbai and Xu, "Derivation of Information-Theoretically
Optimal Adversarial Attacks with Applications to Robust Machine Learning" (arXiv:2007.14042, 2020), solved from
first principles (docs/method.md section 13). The closed forms and solvers are ours; none of them is a theorem
or a number taken from that paper.

The problems (N: optional observation noise, independent of X and D):

    P1  min I(X; X + D)      over P(D|X), E|D|^2 <= P         rd_attack; gaussian_attack, gaussian_vector_attack,
                                                                 binary_attack (closed forms)
    P2  min I(X; X + D)      over P(D|X), |D|_p <= eps a.s.   support_attack
    P3  min I(X; X + D + N)  over P(D|X), either budget        noisy_attack; gaussian_attack(noise_var=...)
    P4  min I(X; X + D)      over P(D), D independent of X     blind_noise_attack
    k copies: the observer sees X*1_k + D, D in R^k            redundant_budget, redundant_attack,
                                                                 redundant_gaussian_attack

P1 is the rate-distortion function of X under squared error: the optimal attack is the test channel
Q(x~|x) from each signal value to attacked values x~ = x + d. Every problem is convex in the law of D (the
mutual information is convex in the channel, which is linear in that law, and the budgets are linear), so the
solvers below find the optimum on their grid; all but blind_noise_attack return a useful certificate (`gap`)
of how close they got.

Mutual information is in nats; functions with a `bits` flag return bits when it is set.

Why hand-written: rate-distortion solvers exist (dit's `dit.rate_distortion.blahut_arimoto`), but they work at a
fixed trade-off beta, with the reconstruction alphabet equal to the source alphabet, and without a way to meet a
given budget; none that we know of handles the support constraint of P2, the observation noise of P3 or the
signal-independent perturbation of P4. The algorithms are short (Blahut-Arimoto, its support-restricted
variant, exponentiated gradient), so they are written here with numpy and scipy only.
"""
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import numpy as np
from scipy import integrate, special

LN2 = np.log(2.0)
_TINY = 1e-250  # floor for grid masses: a point whose mass underflowed to 0 could never come back


# ---------------------------------------------------------------------------------------------------------
# Information measures

def _to_unit(nats, bits: bool):
    return nats / LN2 if bits else nats


def mutual_information(px, W, bits: bool = False) -> float:
    """I(X; Y) for the input pmf px (n,) and the channel W (n, m), whose rows sum to 1."""
    px, W = np.asarray(px, float), np.asarray(W, float)
    used = px > 0
    px, W = px[used], W[used]
    py = px @ W
    # rel_entr(w, py) = w ln(w / py), 0 where w = 0, even where py = 0
    return _to_unit(float(px @ special.rel_entr(W, py[None, :]).sum(axis=1)), bits)


def entropy(p, bits: bool = False) -> float:
    p = np.asarray(p, float)
    return _to_unit(float(special.entr(p).sum()), bits)


def binary_entropy(q, base: float = 2):
    """h(q) = -q log q - (1-q) log(1-q), in bits by default (base=np.e: nats)."""
    q = np.asarray(q, float)
    return (special.entr(q) + special.entr(1 - q)) / np.log(base)


# ---------------------------------------------------------------------------------------------------------
# Closed forms

class GaussianAttack(NamedTuple):
    """D = -a X + W with W ~ N(0, w_var) independent of X. exact: mi is the minimum over all attacks;
    otherwise it is the best linear attack's value, an upper bound on the minimum."""
    a: float
    w_var: float
    mi: float
    exact: bool


def gaussian_attack(variance: float, budget: float, noise_var: float = 0.0, bits: bool = False) -> GaussianAttack:
    """min I(X; X + D + N) over P(D|X) with E D^2 <= budget, for X ~ N(0, variance), N ~ N(0, noise_var).

    Any attack has E (X - (X + D + N))^2 <= budget + noise_var, so I >= R_X(budget + noise_var)
    = 1/2 ln(variance / (budget + noise_var)). The linear attack a = (budget + noise_var) / variance,
    Var W = budget - a^2 variance attains it whenever Var W >= 0 (always without noise). Otherwise the best
    linear attack is the pure shrink a = sqrt(budget / variance), W = 0, and exact is False.
    """
    sigma2, P, s = float(variance), float(budget), float(noise_var)
    if P >= sigma2:  # D = -X erases the signal
        return GaussianAttack(1.0, 0.0, 0.0, True)
    if s == 0:
        a = P / sigma2
        return GaussianAttack(a, P * (1 - a), _to_unit(0.5 * np.log(sigma2 / P), bits), True)
    total = P + s
    a = total / sigma2
    w_var = P - a * a * sigma2
    if w_var >= 0:
        return GaussianAttack(a, w_var, _to_unit(0.5 * np.log(sigma2 / total), bits), True)
    a = np.sqrt(P / sigma2)
    mi = 0.5 * np.log1p((np.sqrt(sigma2) - np.sqrt(P)) ** 2 / s)
    return GaussianAttack(float(a), 0.0, _to_unit(mi, bits), False)


def blind_gaussian_mi(variance: float, budget: float, noise_var: float = 0.0, bits: bool = False) -> float:
    """I(X; X + D + N) when D ~ N(0, budget) is independent of X ~ N(0, variance): 1/2 ln(1 + variance / (P + s)).
    Gaussian noise is the worst independent noise of a given power for a Gaussian signal (Ihara 1978;
    Diggavi and Cover 2001), so this is the minimum of P4 for Gaussian X."""
    return _to_unit(0.5 * np.log1p(variance / (budget + noise_var)), bits)


class VectorGaussianAttack(NamedTuple):
    """D = -A X + W, W ~ N(0, w_cov); distortions D_i = min(water_level, lambda_i) per eigen-direction."""
    A: np.ndarray
    w_cov: np.ndarray
    distortions: np.ndarray
    water_level: float
    mi: float


def reverse_water_level(eigenvalues, budget: float, tol: float = 1e-14) -> float:
    """theta with sum_i min(theta, lambda_i) = budget, by bisection (budget < sum lambda_i)."""
    lam = np.asarray(eigenvalues, float)
    lo, hi = 0.0, float(lam.max())
    while hi - lo > tol * max(hi, 1.0):
        mid = 0.5 * (lo + hi)
        if np.minimum(mid, lam).sum() < budget:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def gaussian_vector_attack(cov, budget: float, bits: bool = False) -> VectorGaussianAttack:
    """min I(X; X + D) over P(D|X) with E|D|_2^2 <= budget, for X ~ N(0, cov): reverse water-filling.

    In the eigenbasis cov = U diag(lambda) U^T, direction i receives distortion D_i = min(theta, lambda_i)
    with sum D_i = budget, and the minimum is sum_i 1/2 ln(lambda_i / D_i). The attacker spends its energy on
    the weak directions first and erases every direction with lambda_i <= theta.
    """
    cov = np.atleast_2d(np.asarray(cov, float))
    lam, U = np.linalg.eigh(cov)
    lam = np.clip(lam, 0.0, None)
    if budget >= lam.sum():
        theta, D = float(lam.max()), lam.copy()
    else:
        theta = reverse_water_level(lam, budget)
        D = np.minimum(theta, lam)
    ratio = np.divide(D, lam, out=np.ones_like(lam), where=lam > 0)
    A = U @ np.diag(ratio) @ U.T
    w_cov = U @ np.diag(D * (1 - ratio)) @ U.T
    positive = lam > 0
    mi = 0.5 * np.log(lam[positive] / D[positive]).sum()
    return VectorGaussianAttack(A, w_cov, D, theta, _to_unit(float(mi), bits))


class BinaryAttack(NamedTuple):
    """X = +-A: the attacked value is sign * b, X's sign kept with probability 1 - q and flipped with q, i.e.
    D = -2q X with probability 1 - q and D = -(2 - 2q) X with probability q."""
    q: float
    b: float
    mi: float


def binary_attack(budget: float, amplitude: float = 1.0, bits: bool = False) -> BinaryAttack:
    """min I(X; X + D) over P(D|X) with E D^2 <= budget, for X = +-amplitude with equal probabilities.

    With D = budget / A^2 < 1: q = (1 - sqrt(1 - D)) / 2, b = A (1 - 2q) = A sqrt(1 - D), and the minimum is
    ln 2 - h(q) (1 - h(q) bits); it costs E D^2 = 4 q (1 - q) A^2 = budget. For D >= 1 the minimum is 0
    (every value sent to 0). Any budget > 0 lowers the information.
    """
    D = budget / amplitude ** 2
    if D >= 1:
        return BinaryAttack(0.5, 0.0, 0.0)
    q = (1 - np.sqrt(1 - D)) / 2
    mi_bits = 1 - float(binary_entropy(q))
    return BinaryAttack(float(q), float(amplitude * np.sqrt(1 - D)), mi_bits if bits else mi_bits * LN2)


def binary_awgn_mi(amplitude: float, noise_std: float, bits: bool = False) -> float:
    """I(X; X + N) for X = +-amplitude equiprobable and N ~ N(0, noise_std^2), by quadrature:
    ln 2 - E ln(1 + exp(-2 A Y / s^2)) with Y ~ N(A, s^2). With an almost-sure budget eps < A the
    deterministic shrink D = -eps X gives this at amplitude A - eps."""
    if amplitude <= 0:
        return 0.0
    A, s = float(amplitude), float(noise_std)

    def integrand(y):
        return np.exp(-0.5 * ((y - A) / s) ** 2) / (s * np.sqrt(2 * np.pi)) * np.logaddexp(0.0, -2 * A * y / s ** 2)

    loss, _ = integrate.quad(integrand, A - 12 * s, A + 12 * s, limit=200, epsabs=1e-13)
    return _to_unit(LN2 - loss, bits)


# ---------------------------------------------------------------------------------------------------------
# Signals and grids

def as_points(values) -> np.ndarray:
    """Scalars or vectors as an (n, d) array."""
    values = np.asarray(values, float)
    return values[:, None] if values.ndim == 1 else values


def pam(levels: int, spacing: float = 1.0):
    """Uniform M-PAM: points 0, spacing, ..., (M-1) spacing with equal probabilities."""
    return spacing * np.arange(levels, dtype=float), np.full(levels, 1.0 / levels)


def discretized_gaussian(variance: float = 1.0, points: int = 601, width: float = 6.0):
    """N(0, variance) on `points` equally spaced values over +-width standard deviations."""
    xs = np.linspace(-width, width, points) * np.sqrt(variance)
    px = np.exp(-0.5 * xs ** 2 / variance)
    return xs, px / px.sum()


def attack_grid(xs, step: float, margin: float = 0.0) -> np.ndarray:
    """Attacked values for a scalar signal: a grid of `step` over [min x - margin, max x + margin], plus every
    signal point, every x +- margin and every midpoint between two signal points (the optimal attacks of P2
    sit on the edges of the balls and where they meet).

    Under squared error the optimal attacked values of P1 lie in [min x, max x] (projecting onto it lowers
    every cost and, as a function of the attacked value, cannot raise the information), so margin 0 suffices
    there; P2 with a small eps needs no more either.
    """
    xs = np.asarray(xs, float).ravel()
    lo, hi = xs.min() - margin, xs.max() + margin
    count = max(int(round((hi - lo) / step)), 1)
    grid = np.linspace(lo, hi, count + 1)
    midpoints = (xs[:, None] + xs[None, :]).ravel() / 2
    merged = np.sort(np.concatenate([grid, xs, xs - margin, xs + margin, midpoints]))
    keep = np.concatenate([[True], np.diff(merged) > 1e-9 * max(1.0, step)])
    return merged[keep]


def squared_distance(xs, outputs) -> np.ndarray:
    """|x~ - x|_2^2 for every signal point (rows) and attacked value (columns)."""
    xs, outputs = as_points(xs), as_points(outputs)
    return ((outputs[None, :, :] - xs[:, None, :]) ** 2).sum(axis=2)


def norm_distance(xs, outputs, p: float = 2) -> np.ndarray:
    xs, outputs = as_points(xs), as_points(outputs)
    return np.linalg.norm(outputs[None, :, :] - xs[:, None, :], ord=p, axis=2)


# ---------------------------------------------------------------------------------------------------------
# Results of the numerical solvers

@dataclass
class AttackResult:
    """An attack found on a grid: the channel Q(x~|x) from each signal point to attacked values.

    mi: I(X; X~) in nats, or I(X; X~ + N) for noisy_attack. cost: E|D|_2^2. multiplier: the Lagrange multiplier
    (beta) of the expected budget, nan where there is none. gap: the solver's certificate: the objective it
    minimised (I + multiplier * cost; I alone under an almost-sure budget) is within gap nats of its minimum on
    the grid. A budget met by mixing two solutions reports the larger of their gaps.
    """
    mi: float
    cost: float
    xs: np.ndarray
    px: np.ndarray
    outputs: np.ndarray
    channel: np.ndarray
    multiplier: float = float("nan")
    gap: float = 0.0
    iterations: int = 0

    def mi_bits(self) -> float:
        return self.mi / LN2

    def perturbations(self, i: int, min_prob: float = 1e-6):
        """(deltas (k, d), probabilities (k,)) of the perturbation applied to signal point i, its small masses
        dropped and the rest renormalised."""
        row = self.channel[i]
        keep = row >= min_prob
        return self.outputs[keep] - self.xs[i], row[keep] / row[keep].sum()

    def max_norm(self, p: float = 2, min_prob: float = 1e-9) -> float:
        """The largest |D|_p the attack uses with probability at least min_prob."""
        used = self.channel >= min_prob
        return float(norm_distance(self.xs, self.outputs, p)[used].max())


def _result(px, xs, outputs, channel, cost_matrix, **extra) -> AttackResult:
    return AttackResult(mi=mutual_information(px, channel), cost=float(px @ (channel * cost_matrix).sum(axis=1)),
                        xs=xs, px=px, outputs=outputs, channel=channel, **extra)


def _prepare(px, xs, outputs):
    px = np.asarray(px, float)
    if px.ndim != 1 or np.any(px < 0) or not np.isclose(px.sum(), 1.0):
        raise ValueError("px must be a probability vector")
    xs, outputs = as_points(xs), as_points(outputs)
    if len(xs) != len(px):
        raise ValueError(f"{len(xs)} signal points but {len(px)} probabilities")
    if xs.shape[1] != outputs.shape[1]:
        raise ValueError("signal points and attacked values have different dimensions")
    return px / px.sum(), xs, outputs


def _channel_mixer(cost_matrix, information=None):
    """mix(first, second, weight): the attack that uses `first` with probability weight and `second` otherwise
    (time sharing); information(channel) re-measures its MI when the objective is not I(X; X~)."""
    def mix(first: AttackResult, second: AttackResult, weight: float) -> AttackResult:
        channel = weight * first.channel + (1 - weight) * second.channel
        mixed = _result(first.px, first.xs, first.outputs, channel, cost_matrix,
                        multiplier=float(np.sqrt(first.multiplier * second.multiplier)),
                        gap=max(first.gap, second.gap), iterations=first.iterations + second.iterations)
        if information is not None:
            mixed.mi = information(channel)
        return mixed
    return mix


def _meet_budget(solve: Callable, budget: float, multiplier: float, mix: Callable, rtol: float = 1e-2,
                 max_solves: int = 60):
    """Minimise I + multiplier * cost for the multiplier whose solution spends `budget` exactly.

    solve(multiplier, warm) returns a solution (with .cost and .multiplier), warm-started from the previous
    one. Cost decreases with the multiplier: bracket the budget by factors of 4, narrow the bracket by
    interpolating log cost linearly in log multiplier (kept inside the bracket's middle 80 %), then mix the two
    bracketing solutions so that the expected cost equals the budget. Cost is linear and the information
    convex in the law of the perturbation, so the mixture is no worse than the chord between the two points of
    the (convex) curve; this also covers a budget that falls on a straight segment of the curve, which no
    single multiplier spends.
    """
    above = below = point = None  # above: spends more than the budget; below: within it
    for _ in range(max_solves):
        point = solve(multiplier, point)
        if point.cost > budget:
            above = point
        else:
            below = point
        if above is None:
            multiplier /= 4
            if multiplier < 1e-12:
                return below  # the budget does not bind on this grid
        elif below is None:
            multiplier *= 4
        elif (above.cost - below.cost <= rtol * budget or min(above.cost - budget, budget - below.cost)
              <= rtol * 0.1 * budget or below.multiplier / above.multiplier < 1 + rtol):
            break
        else:
            high, low = np.log(above.cost), np.log(max(below.cost, 1e-300))
            fraction = np.clip((high - np.log(budget)) / (high - low), 0.1, 0.9)
            multiplier = float(above.multiplier * (below.multiplier / above.multiplier) ** fraction)
    if below is None:
        raise RuntimeError("no multiplier met the budget")
    if above is None or below.cost == budget:
        return below
    return mix(above, below, (budget - below.cost) / (above.cost - below.cost))


# ---------------------------------------------------------------------------------------------------------
# P1: expected budget, input-aware (Blahut-Arimoto)

STALL_WINDOW = 100  # iterations over which a solver must still improve its objective by tol


def _stalled(history, value, tol) -> bool:
    """Record value; True once STALL_WINDOW iterations together lowered it by less than tol."""
    history.append(value)
    return len(history) > STALL_WINDOW and history[-STALL_WINDOW - 1] - value < tol


def _blahut_arimoto(px, kernel, q, tol, max_iter):
    """Minimise F(q) = -sum_x p(x) ln sum_x~ q(x~) K(x, x~) over output laws q by q <- q c, with
    c(x~) = sum_x p(x) K(x, x~) / sum_x~' q(x~') K(x, x~') (Blahut 1972).

    With K = exp(-beta d), F(q) bounds from above the Lagrangian I + beta E d of the channel q defines, and the
    two minima agree; with K the indicator of the allowed attacked values, F(q) is the information of the best
    channel with that output law. By Jensen's inequality F(q) - min F <= ln max c: that is the returned gap.
    Stops at gap < tol, or once the iterations stall (points of negligible mass can keep the gap large long
    after the value has converged). Returns (q, gap, iterations).
    """
    history = []
    for iteration in range(1, max_iter + 1):
        z = kernel @ q
        c = kernel.T @ (px / z)
        gap = float(np.log(c.max()))
        if gap < tol or _stalled(history, float(-px @ np.log(z)), tol):
            break
        q = np.maximum(q * c, _TINY)
        q /= q.sum()
    return q, gap, iteration


def _warm_start(q, weight=0.1):
    # BA grows a mass by at most a factor c per iteration: a warm start that left some attacked values with
    # almost no mass could take very long to move it back, so a little of the uniform law is mixed in
    return (1 - weight) * q + weight / len(q)


def _rd_point(px, xs, outputs, distortion, beta, q0, tol, max_iter) -> tuple:
    # exp(-beta d) with each row shifted by its minimum: the shift cancels in the normalisation, and no row
    # underflows to all zeros at large beta
    kernel = np.exp(-beta * (distortion - distortion.min(axis=1, keepdims=True)))
    q, gap, iterations = _blahut_arimoto(px, kernel, q0, tol, max_iter)
    channel = kernel * q[None, :]
    channel /= channel.sum(axis=1, keepdims=True)
    return _result(px, xs, outputs, channel, distortion, multiplier=beta, gap=gap, iterations=iterations), q


def rd_curve(px, xs, outputs, betas, cost=squared_distance, tol: float = 1e-8, max_iter: int = 5000):
    """Points (AttackResult) of the curve min I(X; X~) + beta E d(X, X~) for each beta, warm-started in order."""
    px, xs, outputs = _prepare(px, xs, outputs)
    distortion = cost(xs, outputs)
    q = np.full(len(outputs), 1.0 / len(outputs))
    results = []
    for beta in betas:
        result, q = _rd_point(px, xs, outputs, distortion, beta, _warm_start(q), tol, max_iter)
        results.append(result)
    return results


def rd_attack(px, xs, outputs, budget: float, cost=squared_distance, tol: float = 1e-8,
              max_iter: int = 5000) -> AttackResult:
    """P1: min I(X; X + D) over P(D|X) with E cost(X, X + D) <= budget, X discrete (points xs, pmf px), the
    attacked values restricted to `outputs` (a grid; (m,) or (m, d)).

    The rate-distortion function of X at distortion `budget`, by Blahut-Arimoto at the trade-off beta whose
    solution spends the budget (see _meet_budget). A budget at least min_x~ E cost(X, x~) is met by sending
    every point to that x~, with no information left.
    """
    px, xs, outputs = _prepare(px, xs, outputs)
    distortion = cost(xs, outputs)
    expected = px @ distortion
    best = int(np.argmin(expected))
    if budget >= expected[best]:
        channel = np.zeros_like(distortion)
        channel[:, best] = 1.0
        return _result(px, xs, outputs, channel, distortion, multiplier=0.0)
    state = {"q": np.full(len(outputs), 1.0 / len(outputs))}

    def solve(beta, warm):
        result, state["q"] = _rd_point(px, xs, outputs, distortion, beta, _warm_start(state["q"]), tol, max_iter)
        return result

    return _meet_budget(solve, budget, 1.0 / (2 * budget), _channel_mixer(distortion))


# ---------------------------------------------------------------------------------------------------------
# P2: almost-sure budget, input-aware (support-restricted Blahut-Arimoto)

def support_attack(px, xs, outputs, eps: float, p: float = 2, tol: float = 1e-10,
                   max_iter: int = 100000) -> AttackResult:
    """P2: min I(X; X + D) over P(D|X) with |D|_p <= eps almost surely, the attacked values restricted to
    `outputs`.

    For a fixed output law r the best channel is r restricted to the ball around x, so the minimum is
    min_r -sum_x p(x) ln r(ball(x)), solved by q <- q c, c(x~) = sum_{x: x~ in ball(x)} p(x) / q(ball(x))
    (Blahut-Arimoto at beta = 0 on the allowed set).
    Balls around distinct points that do not meet leave I = H(X): below half the smallest distance between
    signal points, an almost-sure budget cannot lower the information of a noiseless signal at all.
    """
    px, xs, outputs = _prepare(px, xs, outputs)
    allowed = norm_distance(xs, outputs, p) <= eps * (1 + 1e-9) + 1e-12
    if not allowed.any(axis=1).all():
        raise ValueError(f"the grid has no attacked value within {eps} of every signal point")
    kernel = allowed.astype(float)
    q, gap, iterations = _blahut_arimoto(px, kernel, kernel.any(axis=0) / kernel.any(axis=0).sum(), tol, max_iter)
    channel = kernel * q[None, :]
    channel /= channel.sum(axis=1, keepdims=True)
    return _result(px, xs, outputs, channel, squared_distance(xs, outputs), gap=gap, iterations=iterations)


# ---------------------------------------------------------------------------------------------------------
# Exponentiated gradient, for P3 and P4 (no alternating closed form)

def _exponentiated_gradient(weights, Q, objective, allowed, tol, max_iter):
    """Minimise a convex objective(Q) -> (value, gradient) over row-stochastic Q (rows weighted by `weights`,
    zero outside `allowed`) by Q <- Q exp(-eta G), the step eta adapted so that the objective never rises.

    The Frank-Wolfe gap sum_rows w (sum_j Q G - min_j G) bounds the distance to the optimum (convexity): it is
    the returned gap. Stops at gap < tol or once the iterations stall. Returns (Q, gap, iterations).
    """
    value, grad = objective(Q)
    eta, history = 1.0, []
    for iteration in range(1, max_iter + 1):
        grad = np.where(allowed, grad, 0.0)
        lowest = np.where(allowed, grad, np.inf).min(axis=1, keepdims=True)
        gap = float(weights @ ((Q * grad).sum(axis=1) - lowest[:, 0]))
        if gap < tol or _stalled(history, value, tol):
            break
        while True:
            trial = np.maximum(Q * np.exp(-eta * (grad - lowest)), _TINY) * allowed
            trial /= trial.sum(axis=1, keepdims=True)
            trial_value, trial_grad = objective(trial)
            if trial_value <= value or eta < 1e-12:
                break
            eta /= 2
        Q, value, grad = trial, trial_value, trial_grad
        eta = min(eta * 1.5, 1e3)
    return Q, gap, iteration


# ---------------------------------------------------------------------------------------------------------
# P3: observation noise, input-aware

def _noise_matrix(outputs, noise_std, y_step, width=8.0):
    """Rows: the observation's pmf on a y grid for each attacked value (Gaussian noise, bins of y_step)."""
    ys = np.arange(outputs.min() - width * noise_std, outputs.max() + width * noise_std + y_step / 2, y_step)
    density = np.exp(-0.5 * ((ys[None, :] - outputs[:, None]) / noise_std) ** 2)
    return density / density.sum(axis=1, keepdims=True)


def noisy_attack(px, xs, outputs, noise_std: float, budget: Optional[float] = None, eps: Optional[float] = None,
                 multiplier: Optional[float] = None, y_step: Optional[float] = None, tol: float = 1e-7,
                 max_iter: int = 20000) -> AttackResult:
    """P3: min I(X; X + D + N) over P(D|X), scalar X (points xs, pmf px), N ~ N(0, noise_std^2) independent of
    (X, D) and unseen by the attacker, the attacked values X + D restricted to `outputs`.

    Exactly one budget: eps (|D| <= eps almost surely), budget (E D^2 <= budget, met through the multiplier as in
    rd_attack), or multiplier (the Lagrangian I + multiplier E D^2 itself). The observation is discretised in
    bins of y_step (default noise_std / 25). Solved by exponentiated gradient on Q(x~|x).
    """
    if sum(value is not None for value in (budget, eps, multiplier)) != 1:
        raise ValueError("give exactly one of budget, eps, multiplier")
    px, xs, outputs = _prepare(px, xs, outputs)
    if xs.shape[1] != 1:
        raise ValueError("noisy_attack takes a scalar signal")
    noise = _noise_matrix(outputs[:, 0], noise_std, y_step or noise_std / 25)
    distortion = squared_distance(xs, outputs)
    allowed = np.abs(outputs[None, :, 0] - xs[:, :1]) <= eps * (1 + 1e-9) + 1e-12 if eps is not None else \
        np.ones_like(distortion, dtype=bool)
    if not allowed.any(axis=1).all():
        raise ValueError(f"the grid has no attacked value within {eps} of every signal point")

    def information(Q):
        W = Q @ noise
        return float(px @ special.rel_entr(W, (px @ W)[None, :]).sum(axis=1))

    def solve(lam, warm):
        def objective(Q):
            W = Q @ noise
            log_ratio = np.log(np.maximum(W, _TINY)) - np.log(np.maximum(px @ W, _TINY))[None, :]
            info = float(px @ (W * log_ratio).sum(axis=1))
            return info + lam * float(px @ (Q * distortion).sum(axis=1)), log_ratio @ noise.T + lam * distortion

        uniform = allowed / allowed.sum(axis=1, keepdims=True)
        Q0 = uniform if warm is None else 0.9 * warm.channel + 0.1 * uniform
        Q, gap, iterations = _exponentiated_gradient(px, Q0, objective, allowed, tol, max_iter)
        return AttackResult(mi=information(Q), cost=float(px @ (Q * distortion).sum(axis=1)), xs=xs, px=px,
                            outputs=outputs, channel=Q, multiplier=lam, gap=gap, iterations=iterations)

    if budget is None:
        return solve(multiplier or 0.0, None)
    return _meet_budget(solve, budget, 1.0, _channel_mixer(distortion, information))


# ---------------------------------------------------------------------------------------------------------
# P4: blind noise (D independent of X)

@dataclass
class BlindResult:
    """A perturbation law independent of the signal: D = deltas[j] with probability probs[j]. gap: the
    Frank-Wolfe gap, a valid but very loose bound here (the gradient has a ln r term, unbounded below near
    r = 0), so the solver in practice stops when it stalls."""
    mi: float
    cost: float
    deltas: np.ndarray
    probs: np.ndarray
    multiplier: float = float("nan")
    gap: float = 0.0
    iterations: int = 0


def blind_noise_attack(px, xs, deltas, budget: float, tol: float = 1e-9, max_iter: int = 1000) -> BlindResult:
    """P4: min I(X; X + D) over laws of D on the grid `deltas`, D independent of X, with E D^2 <= budget
    (scalar X: points xs, pmf px).

    Values x + d that coincide (to 1e-9 of the grid's scale) are one observation, so noise on the signal's
    lattice can merge signal points while off-lattice noise cannot. Solved by exponentiated gradient on the
    law of D, the budget met through its multiplier as in rd_attack. The adversary of P1 may use anything
    this one can, so its minimum is never above this one's.
    """
    px = np.asarray(px, float)
    xs, deltas = np.asarray(xs, float).ravel(), np.asarray(deltas, float).ravel()
    scale = max(np.abs(xs).max(), np.abs(deltas).max(), 1.0)
    _, observed = np.unique(np.round((xs[:, None] + deltas[None, :]) / (scale * 1e-9)), return_inverse=True)
    observed = observed.reshape(len(xs), len(deltas))
    weights = np.tile(px[:, None], (1, len(deltas)))
    cost = deltas ** 2

    def information(r):
        p_out = np.bincount(observed.ravel(), weights=(weights * r[None, :]).ravel())
        log_p_out = np.log(np.maximum(p_out, _TINY))[observed]  # (n, m): ln p(x + d_j)
        log_r = np.log(np.maximum(r, _TINY))
        return float(r @ (log_r - px @ log_p_out)), log_r - px @ log_p_out

    def solve(lam, warm):
        def objective(R):
            info, grad = information(R[0])
            return info + lam * float(R[0] @ cost), (grad + lam * cost)[None, :]

        R0 = np.full((1, len(deltas)), 1.0 / len(deltas))
        if warm is not None:
            R0 = 0.9 * warm.probs[None, :] + 0.1 * R0
        R, gap, iterations = _exponentiated_gradient(np.ones(1), R0, objective, np.ones_like(R0, dtype=bool),
                                                     tol, max_iter)
        r = R[0]
        return BlindResult(information(r)[0], float(r @ cost), deltas, r, lam, gap, iterations)

    def mix(first, second, weight):
        r = weight * first.probs + (1 - weight) * second.probs
        return BlindResult(information(r)[0], float(r @ cost), deltas, r,
                           float(np.sqrt(first.multiplier * second.multiplier)), max(first.gap, second.gap),
                           first.iterations + second.iterations)

    return _meet_budget(solve, budget, 1.0 / budget, mix)


# ---------------------------------------------------------------------------------------------------------
# Redundancy: k copies of the signal

def redundant_budget(budget: float, k: int, constraint: str = "expected", p: float = 2) -> float:
    """The single-copy budget equivalent to `budget` on k copies (our Theorem R, docs/method.md section 13).

    The observer sees X 1_k + D. By data processing it learns at least as much as from the copies' mean
    X + mean(D), and mean(D) obeys a reduced budget: E mean(D)^2 <= P / k under E|D|_2^2 <= P
    (Cauchy-Schwarz), |mean(D)| <= eps k^(-1/p) under |D|_p <= eps (Hoelder). The same perturbation on every
    copy leaves exactly the mean's information (x -> x 1_k is one-to-one), so the bound is attained. L2
    budgets thus shrink with k (P / k, eps / sqrt(k)) while L-inf budgets do not (eps): redundancy protects
    against the former only.
    """
    if k < 1:
        raise ValueError("k must be >= 1")
    if constraint == "expected":
        return budget / k
    if constraint == "almost-sure":
        return budget * k ** (-1.0 / p) if np.isfinite(p) else budget
    raise ValueError(f"unknown constraint {constraint!r}")


def lift_to_copies(result: AttackResult, k: int) -> AttackResult:
    """The single-copy attack applied to each of k copies: signal points x 1_k, attacked values x~ 1_k."""
    xs, outputs = np.repeat(result.xs, k, axis=1), np.repeat(result.outputs, k, axis=1)
    return AttackResult(mi=result.mi, cost=k * result.cost, xs=xs, px=result.px, outputs=outputs,
                        channel=result.channel, multiplier=result.multiplier, gap=result.gap,
                        iterations=result.iterations)


def redundant_attack(px, xs, outputs, k: int, budget: float, constraint: str = "expected", p: float = 2,
                     **solver_options) -> AttackResult:
    """min I(X; X 1_k + D) over P(D|X), D in R^k, scalar X on the points xs, under E|D|_2^2 <= budget
    (constraint "expected") or |D|_p <= budget almost surely ("almost-sure"): the single-copy optimum at the
    reduced budget (redundant_budget), applied to every copy. `outputs`: the single-copy grid."""
    reduced = redundant_budget(budget, k, constraint, p)
    if constraint == "expected":
        single = rd_attack(px, xs, outputs, reduced, **solver_options)
    else:
        single = support_attack(px, xs, outputs, reduced, **solver_options)
    return lift_to_copies(single, k)


def redundant_gaussian_attack(variance: float, budget: float, k: int, noise_var: float = 0.0,
                              bits: bool = False) -> GaussianAttack:
    """X ~ N(0, variance) seen k times, each copy with its own noise N(0, noise_var), E|D|_2^2 <= budget: the
    single-copy problem at budget / k and noise_var / k, exact where that one is. The copies' mean sees
    X + mean(D) + N(0, noise_var / k) with E mean(D)^2 <= budget / k, which bounds the information from below;
    with the same perturbation on every copy the mean is a sufficient statistic, which attains the bound.
    Noiseless: 1/2 ln(k variance / budget)."""
    return gaussian_attack(variance, redundant_budget(budget, k), noise_var / k, bits)
