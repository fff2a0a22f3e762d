#!/usr/bin/env python3
"""The information-theoretically optimal attack of a signal model: the smallest mutual information I(X; X + D)
an attacker can leave under a budget on the perturbation D, and the law of D that achieves it. This is our
formulation of the problem posed in Yi, Mudumbai and Xu 2020 (arXiv:2007.14042); docs/method.md section 13.
The quantity does not depend on any classifier: it bounds what the best possible classifier can still learn.

Examples:
    python optimal_mi_attack.py gaussian --variance 1 --budget 0.3 --noise-var 0.1
    python optimal_mi_attack.py gaussian-vector --variances 4 1 0.25 --budget 1.5
    python optimal_mi_attack.py binary --budget 0.36 --bits
    python optimal_mi_attack.py discrete --points 0 1 2 --budget 0.5 --constraint almost-sure --json
    python optimal_mi_attack.py binary --budget 0.5 --copies 4 --constraint almost-sure --norm inf
    python optimal_mi_attack.py figures --out bench/results/optimal_mi

With --json the script prints one object: mi_nats and mi_bits (the minimum), budget, constraint, attacker,
copies, exact (true: a proven minimum in closed form; false: a grid solver's value, or a closed form for the
best linear attack only), method, gap_nats (a grid solver's certificate) and distribution (the optimal law of
D: per signal point for an input-aware attacker, one law for a blind one).
"""
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.optimize import brentq

from utils import optimal_mi as om
from utils.cli import ArgumentParser, nonnegative_number, positive_int, positive_number
from utils.errors import UserError, run_main

FORMULATION = "our formulation of the problem posed in Yi, Mudumbai and Xu 2020 (arXiv:2007.14042)"
NORMS = {"1": 1.0, "2": 2.0, "inf": math.inf}


# ---------------------------------------------------------------------------------------------------------
# Command line

def build_parser():
    parser = ArgumentParser(description="Minimal mutual information I(X; X+D) between a signal and its attacked "
                                        "version, and the optimal perturbation law, under an expected or "
                                        "almost-sure budget (" + FORMULATION + ").")
    common = ArgumentParser(add_help=False)
    common.add_argument("--budget", type=positive_number, required=True,
                        help="expected: P in E|D|_2^2 <= P; almost-sure: eps in |D|_p <= eps")
    common.add_argument("--json", action="store_true", help="print one JSON object instead of the summary")
    common.add_argument("--bits", action="store_true", help="summary in bits (JSON always has both units)")
    attacker = ArgumentParser(add_help=False)
    attacker.add_argument("--attacker", choices=("input-aware", "blind"), default="input-aware",
                          help="input-aware: D may depend on X; blind: D independent of X (expected budget only)")
    copies = ArgumentParser(add_help=False)
    copies.add_argument("--copies", type=positive_int, default=1,
                        help="k: the observer sees k copies X 1_k (+ noise), the budget is on D in R^k")
    constraint = ArgumentParser(add_help=False)
    constraint.add_argument("--constraint", choices=("expected", "almost-sure"), default="expected")
    constraint.add_argument("--norm", choices=sorted(NORMS), default="2",
                            help="p of the almost-sure budget |D|_p <= eps (matters with --copies)")
    constraint.add_argument("--grid-step", type=positive_number, default=None,
                            help="spacing of the attacked values (perturbations, for a blind attacker) the solvers "
                                 "may use. Default: the signal's range / 400; / 100 with noise or a blind attacker")
    constraint.add_argument("--noise-std", type=positive_number, default=None,
                            help="observation noise N(0, s^2) added after the attack, unseen by the attacker")

    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gaussian = commands.add_parser("gaussian", parents=[common, attacker, copies],
                                   help="X ~ N(0, variance), expected budget: closed form")
    gaussian.add_argument("--variance", type=positive_number, default=1.0)
    gaussian.add_argument("--noise-var", type=nonnegative_number, default=0.0,
                          help="observation noise N(0, s) after the attack (per copy), unseen by the attacker")
    vector = commands.add_parser("gaussian-vector", parents=[common],
                                 help="X ~ N(0, C), expected budget on |D|_2^2: reverse water-filling")
    shape = vector.add_mutually_exclusive_group(required=True)
    shape.add_argument("--variances", type=positive_number, nargs="+", help="C diagonal with these entries")
    shape.add_argument("--covariance", type=float, nargs="+", help="C in full, d*d numbers row by row")
    binary = commands.add_parser("binary", parents=[common, attacker, copies, constraint],
                                 help="X = +-A equiprobable (closed form for the expected budget)")
    binary.add_argument("--amplitude", type=positive_number, default=1.0)
    discrete = commands.add_parser("discrete", parents=[common, attacker, copies, constraint],
                                   help="X on given scalar points with given probabilities: grid solvers")
    discrete.add_argument("--points", type=float, nargs="+", required=True)
    discrete.add_argument("--probs", type=float, nargs="+", default=None, help="default: equal probabilities")
    figures = commands.add_parser("figures", help="the five computational experiments: CSV and PNG files")
    figures.add_argument("--out", default="bench/results/optimal_mi", help="output folder")
    figures.add_argument("--quick", action="store_true", help="coarse grids and few points (a smoke test)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.command == "figures":
        run_figures(Path(args.out), args.quick)
        return 0
    report = SOLVERS[args.command](args)
    report = {"formulation": FORMULATION, "signal": args.command, **report}
    print(json.dumps(report, indent=2) if args.json else summary(report, args.bits))
    return 0


# ---------------------------------------------------------------------------------------------------------
# Solving one problem: each returns the report's fields

def _units(nats):
    return {"mi_nats": float(nats), "mi_bits": float(nats / om.LN2)}


def solve_gaussian(args):
    s = args.noise_var
    report = {"constraint": "expected", "budget": args.budget, "attacker": args.attacker, "copies": args.copies,
              "variance": args.variance, "noise_var": s}
    if s > 0:
        report["clean_mi_nats"] = 0.5 * math.log1p(args.copies * args.variance / s)
    if args.attacker == "blind":
        # the worst noise independent of X is Gaussian (Diggavi and Cover 2001); with k copies it is the same
        # N(0, budget / k) on every copy, which leaves the copies' mean the single-copy problem at (P / k, s / k)
        mi = om.blind_gaussian_mi(args.variance, args.budget / args.copies, s / args.copies)
        return {**report, **_units(mi), "exact": True, "method": "closed form",
                "distribution": {"kind": "independent-gaussian", "variance": args.budget / args.copies,
                                 "description": "D ~ N(0, variance) independent of X"
                                                + (", the same on every copy" if args.copies > 1 else "")}}
    attack = om.redundant_gaussian_attack(args.variance, args.budget, args.copies, s)
    return {**report, **_units(attack.mi), "exact": attack.exact, "method": "closed form",
            "distribution": {"kind": "linear-gaussian", "a": attack.a, "w_var": attack.w_var,
                             "description": "D = -a X + W, W ~ N(0, w_var) independent of X"
                                            + (", the same on every copy" if args.copies > 1 else "")}}


def solve_gaussian_vector(args):
    if args.variances:
        cov = np.diag(args.variances)
    else:
        d = int(round(math.sqrt(len(args.covariance))))
        if d * d != len(args.covariance):
            raise UserError(f"--covariance takes d*d numbers, got {len(args.covariance)}")
        cov = np.array(args.covariance).reshape(d, d)
        if not np.allclose(cov, cov.T) or np.linalg.eigvalsh(cov).min() < -1e-12:
            raise UserError("--covariance is not a symmetric positive semi-definite matrix")
    attack = om.gaussian_vector_attack(cov, args.budget)
    return {"constraint": "expected", "budget": args.budget, "attacker": "input-aware", "copies": 1,
            **_units(attack.mi), "exact": True, "method": "closed form (reverse water-filling)",
            "distribution": {"kind": "linear-gaussian-vector", "A": attack.A.tolist(), "w_cov": attack.w_cov.tolist(),
                             "distortions": attack.distortions.tolist(), "water_level": attack.water_level,
                             "description": "D = -A X + W, W ~ N(0, w_cov) independent of X; distortions per "
                                            "eigen-direction of C, ascending eigenvalues"}}


def _signal(args):
    if args.command == "binary":
        return np.array([-args.amplitude, args.amplitude]), np.array([0.5, 0.5])
    xs = np.array(args.points, float)
    if len(np.unique(xs)) != len(xs):
        raise UserError("--points must be distinct")
    if args.probs is None:
        return xs, np.full(len(xs), 1.0 / len(xs))
    px = np.array(args.probs, float)
    if len(px) != len(xs):
        raise UserError(f"{len(xs)} --points but {len(px)} --probs")
    if px.min() < 0 or abs(px.sum() - 1) > 1e-6:
        raise UserError("--probs must be non-negative and sum to 1")
    return xs, px / px.sum()


def solve_discrete(args):
    xs, px = _signal(args)
    p = NORMS[args.norm]
    report = {"constraint": args.constraint, "budget": args.budget, "attacker": args.attacker,
              "copies": args.copies, "points": xs.tolist(), "probs": px.tolist()}
    if args.constraint == "almost-sure":
        report["norm"] = args.norm
    if args.noise_std is not None:
        report["noise_std"] = args.noise_std
    if args.attacker == "blind" and (args.constraint != "expected" or args.noise_std or args.copies > 1):
        raise UserError("--attacker blind is implemented for --constraint expected, without noise or copies")
    if args.noise_std is not None and args.copies > 1:
        raise UserError("--noise-std with --copies is implemented for the gaussian signal only")
    reduced = om.redundant_budget(args.budget, args.copies, args.constraint, p)
    if args.copies > 1:
        report["single_copy_budget"] = reduced
    spread = float(xs.max() - xs.min()) or 1.0

    if args.command == "binary" and args.constraint == "expected" and args.attacker == "input-aware" \
            and args.noise_std is None:
        attack = om.binary_attack(reduced, args.amplitude)
        per_point = [{"x": float(x), "p": 0.5, "deltas": [-2 * attack.q * x, -(2 - 2 * attack.q) * x],
                      "probs": [1 - attack.q, attack.q]} for x in xs]
        return {**report, **_units(attack.mi), "clean_mi_nats": math.log(2), "exact": True, "method": "closed form",
                "distribution": {"kind": "conditional", "per_point": per_point, "q": attack.q, "b": attack.b,
                                 "description": _per_copy_note(args.copies)}}

    if args.attacker == "blind":
        step = args.grid_step or spread / 100
        reach = spread + 3 * math.sqrt(args.budget)
        deltas = step * np.arange(-math.ceil(reach / step), math.ceil(reach / step) + 1)
        result = om.blind_noise_attack(px, xs, deltas, args.budget)
        keep = result.probs >= 1e-6
        return {**report, **_units(result.mi), "clean_mi_nats": om.entropy(px), "exact": False,
                "method": f"exponentiated gradient on a grid of step {step:g}", "expected_cost": result.cost,
                "distribution": {"kind": "independent", "deltas": result.deltas[keep].tolist(),
                                 "probs": (result.probs[keep] / result.probs[keep].sum()).tolist()}}

    if args.noise_std is not None:
        step = args.grid_step or spread / 100
        margin = reduced if args.constraint == "almost-sure" else args.noise_std
        grid = om.attack_grid(xs, step, margin)
        options = {"eps": reduced} if args.constraint == "almost-sure" else {"budget": reduced}
        result = om.noisy_attack(px, xs, grid, args.noise_std, **options)
        clean = om.noisy_attack(px, xs, xs, args.noise_std, eps=0.0).mi
        method = f"exponentiated gradient on a grid of step {step:g}"
    else:
        step = args.grid_step or spread / 400
        if args.constraint == "almost-sure":
            result = om.support_attack(px, xs, om.attack_grid(xs, step, reduced), reduced, p=2)
            method = f"support-restricted Blahut-Arimoto on a grid of step {step:g}"
        else:
            result = om.rd_attack(px, xs, om.attack_grid(xs, step), reduced)
            method = f"Blahut-Arimoto on a grid of step {step:g}"
        clean = om.entropy(px)
    return {**report, **_units(result.mi), "clean_mi_nats": float(clean), "exact": False, "method": method,
            "gap_nats": result.gap, "expected_cost": args.copies * result.cost,
            "distribution": {"kind": "conditional", "per_point": _per_point(result),
                             "description": _per_copy_note(args.copies)}}


def _per_copy_note(copies):
    return "D given X = x" + (f"; the same value is added to each of the {copies} copies" if copies > 1 else "")


def _per_point(result, min_prob=1e-6):
    rows = []
    for i, (x, p) in enumerate(zip(result.xs[:, 0], result.px)):
        deltas, probs = result.perturbations(i, min_prob)
        rows.append({"x": float(x), "p": float(p), "deltas": deltas[:, 0].tolist(), "probs": probs.tolist(),
                     "atoms": _atoms(deltas[:, 0], probs, result.outputs[:, 0])})
    return rows


def _atoms(deltas, probs, grid):
    """Runs of neighbouring grid values as one atom (a grid solver spreads a point mass over a few grid
    values): its mean, total probability and range."""
    spacing = np.min(np.diff(np.sort(grid))) if len(grid) > 1 else 1.0
    order = np.argsort(deltas)
    deltas, probs = deltas[order], probs[order]
    breaks = np.flatnonzero(np.diff(deltas) > 2.5 * spacing) + 1
    atoms = []
    for run_d, run_p in zip(np.split(deltas, breaks), np.split(probs, breaks)):
        atoms.append({"delta": float(np.round(run_d @ run_p / run_p.sum(), 12)), "prob": float(run_p.sum()),
                      "from": float(run_d[0]), "to": float(run_d[-1]),
                      "flat": bool(len(run_p) > 2 and run_p.max() < 1.5 * run_p.mean())})
    return atoms


SOLVERS = {"gaussian": solve_gaussian, "gaussian-vector": solve_gaussian_vector, "binary": solve_discrete,
           "discrete": solve_discrete}


# ---------------------------------------------------------------------------------------------------------
# The summary

def summary(report, bits=False, max_atoms=6):
    unit, scale = ("bits", 1 / om.LN2) if bits else ("nats", 1.0)
    budget = (f"E|D|_2^2 <= {report['budget']:g}" if report["constraint"] == "expected"
              else f"|D|_{report.get('norm', '2')} <= {report['budget']:g} almost surely")
    copies = f", {report['copies']} copies" if report.get("copies", 1) > 1 else ""
    how = report["method"]
    if how == "closed form" and not report["exact"]:
        how += " of the best linear attack: an upper bound on the minimum"
    lines = [f"{report['signal']} signal{copies}, {report['attacker']} attacker, budget {budget}",
             f"minimal I(X; attacked observation) = {report['mi_nats'] * scale:.6f} {unit} ({how})"]
    if "clean_mi_nats" in report:
        lines.append(f"without the attack: {report['clean_mi_nats'] * scale:.6f} {unit}")
    if "gap_nats" in report:
        lines.append(f"solver certificate: within {max(report['gap_nats'], 0.0):.1e} nats of the optimum on its grid")
    distribution = report["distribution"]
    lines.append("perturbation law that attains it:")
    if distribution["kind"] == "conditional":
        for row in distribution["per_point"]:
            atoms = row.get("atoms") or [{"delta": d, "prob": p, "from": d, "to": d}
                                         for d, p in zip(row["deltas"], row["probs"])]
            kept = sorted(sorted(atoms, key=lambda atom: -atom["prob"])[:max_atoms], key=lambda atom: atom["delta"])
            text = ", ".join(_atom_text(atom) for atom in kept)
            more = f", and {len(atoms) - max_atoms} smaller atoms" if len(atoms) > max_atoms else ""
            lines.append(f"  x = {row['x']:g}: D = {text}{more}")
    elif distribution["kind"] == "independent":
        order = np.argsort(distribution["probs"])[::-1][:max_atoms]
        lines.append("  D = " + ", ".join(f"{distribution['deltas'][j]:+.4g} (p {distribution['probs'][j]:.4g})"
                                          for j in sorted(order)))
    else:
        details = {key: value for key, value in distribution.items() if key not in ("kind", "description")}
        lines.append(f"  {distribution['description']}")
        lines.extend(f"  {key} = {np.round(np.asarray(value), 6).tolist()}" for key, value in details.items())
    if distribution.get("description") and distribution["kind"] == "conditional":
        lines.append(f"  ({distribution['description']})")
    lines.append(f"({FORMULATION})")
    return "\n".join(lines)


def _atom_text(atom):
    if atom["from"] == atom["to"]:
        return f"{atom['delta']:+.4g} (p {atom['prob']:.4g})"
    if atom.get("flat"):  # the optimum is not unique: any law on this interval does as well
        return f"anywhere in [{atom['from']:+.4g}, {atom['to']:+.4g}] (p {atom['prob']:.4g})"
    return f"{atom['delta']:+.4g} (p {atom['prob']:.4g}, on grid values {atom['from']:+.4g}..{atom['to']:+.4g})"


# ---------------------------------------------------------------------------------------------------------
# The five computational experiments

class Figure:
    """Rows (series, x_name, x, y_name, y) for one CSV, and the figure drawn from them."""

    def __init__(self, name):
        self.name, self.rows = name, []

    def add(self, series, x_name, xs, y_name, ys):
        for x, y in zip(np.atleast_1d(xs), np.atleast_1d(ys)):
            self.rows.append((series, x_name, float(x), y_name, float(y)))

    def series(self, name):
        rows = [row for row in self.rows if row[0] == name]
        return np.array([row[2] for row in rows]), np.array([row[4] for row in rows])

    def write_csv(self, folder):
        with open(folder / f"{self.name}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["series", "x_name", "x", "y_name", "y"])
            writer.writerows(self.rows)


def _progress(items, desc):
    from tqdm import tqdm
    return tqdm(list(items), desc=desc, leave=False, dynamic_ncols=True, file=sys.stderr)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@dataclass
class Effort:
    """Grid sizes, solver iterations and how many solver points each experiment computes."""
    curve_points: int  # points of the closed-form curves
    max_iter: int  # per solve of rd_attack / noisy_attack / blind_noise_attack
    gaussian_points: int  # discretised N(0, 1) over +-6
    lattice: float  # step of the blind-noise lattice
    binary_points: int  # attacked values on [-1, 1] for X = +-1
    pam_step: float
    noisy_step: float
    plane_points: int  # per axis, the k = 2 brute force in R^2
    solver_points: int  # solver budgets per curve (the first ones of each list)


FULL = Effort(60, 5000, 401, 0.1, 401, 0.005, 0.02, 61, 99)
QUICK = Effort(8, 150, 61, 0.5, 21, 0.1, 0.1, 11, 1)


def experiment_budget(effort):
    """E1/E5: MI against the budget, input-aware against blind attackers. Gaussian (nats) and binary +-1 (bits)."""
    fig = Figure("fig1_mi_vs_budget")
    solver = dict(max_iter=effort.max_iter)
    budgets = np.geomspace(0.01, 1.5, effort.curve_points)
    fig.add("gaussian s=0: input-aware (closed form)", "P", budgets, "mi_nats",
            [om.gaussian_attack(1, P).mi for P in budgets])
    fig.add("gaussian s=0: blind (closed form, gaussian noise)", "P", budgets, "mi_nats",
            [om.blind_gaussian_mi(1, P) for P in budgets])
    for P in budgets:
        attack = om.gaussian_attack(1, P, 0.1)
        how = "(best linear attack)" if not attack.exact else "(closed form, optimal)" if P < 1 else "(D = -X)"
        fig.add(f"gaussian s=0.1: input-aware {how}", "P", P, "mi_nats", attack.mi)
    fig.add("gaussian s=0.1: blind (closed form, gaussian noise)", "P", budgets, "mi_nats",
            [om.blind_gaussian_mi(1, P, 0.1) for P in budgets])
    fig.add("gaussian s=0.1: clean", "P", budgets, "mi_nats", np.full(len(budgets), 0.5 * np.log1p(1 / 0.1)))

    xs, px = om.discretized_gaussian(1.0, effort.gaussian_points, 6.0)
    lattice = np.round(np.arange(-6, 6 + 1e-9, effort.lattice), 10)
    lattice_px = np.exp(-lattice ** 2 / 2) / np.exp(-lattice ** 2 / 2).sum()
    noise_grid = lattice[np.abs(lattice) <= 4]
    for P in _progress([0.05, 0.02, 0.1, 0.2, 0.35, 0.5, 0.7, 0.9][:effort.solver_points], "E1 gaussian solvers"):
        fig.add("gaussian s=0: input-aware (Blahut-Arimoto)", "P", P, "mi_nats", om.rd_attack(px, xs, xs, P, **solver).mi)
        fig.add("gaussian s=0: blind (exponentiated gradient)", "P", P, "mi_nats",
                om.blind_noise_attack(lattice_px, lattice, noise_grid, P, max_iter=effort.max_iter).mi)

    binary_budgets = np.linspace(0.01, 1.2, effort.curve_points)
    fig.add("binary: input-aware (closed form)", "P", binary_budgets, "mi_bits",
            [om.binary_attack(P, bits=True).mi for P in binary_budgets])
    fig.add("binary: noise N(0, P) independent of X", "P", binary_budgets, "mi_bits",
            [om.binary_awgn_mi(1, np.sqrt(P), bits=True) for P in binary_budgets])
    grid = np.linspace(-1, 1, effort.binary_points)
    deltas = np.round(np.arange(-4, 4 + 1e-9, 0.1), 10)
    for P in _progress([0.5, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0][:effort.solver_points], "E1 binary solvers"):
        fig.add("binary: input-aware (Blahut-Arimoto)", "P", P, "mi_bits",
                om.rd_attack([.5, .5], [-1, 1], grid, P, **solver).mi_bits())
        fig.add("binary: blind (exponentiated gradient)", "P", P, "mi_bits",
                om.blind_noise_attack([.5, .5], [-1, 1], deltas, P, max_iter=effort.max_iter).mi / om.LN2)

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw(left, fig, "gaussian", logx=True)
    left.set(xlabel="budget P = E D^2", ylabel="I (nats)", title="X ~ N(0, 1), noise s in {0, 0.1}")
    _draw(right, fig, "binary")
    right.set(xlabel="budget P = E D^2", ylabel="I (bits)", title="X = +-1")
    return fig, figure


def experiment_discrete(effort):
    """E2: discrete signals (M-PAM, spacing 1). Expected budgets lower the MI from any P > 0, almost-sure
    budgets only from half the spacing on; the optimal perturbation law of 3-PAM."""
    fig = Figure("fig2_discrete_signals")
    solver = dict(max_iter=effort.max_iter)
    for M in _progress((2, 3, 4), "E2 expected"):
        xs, px = om.pam(M)
        largest = float(px @ (xs - px @ xs) ** 2)  # from here on, sending every point to the mean costs less
        budgets = np.geomspace(0.005, largest, min(16, effort.solver_points + 1))[:-1]
        grid = om.attack_grid(xs, effort.pam_step)
        fig.add(f"{M}-PAM expected (Blahut-Arimoto)", "P", budgets, "mi_bits",
                [om.rd_attack(px, xs, grid, P, **solver).mi_bits() for P in budgets])
        fig.add(f"{M}-PAM expected (Blahut-Arimoto)", "P", largest, "mi_bits", 0.0)
    budgets = np.linspace(0.001, 0.25, effort.curve_points)
    fig.add("2-PAM expected (closed form)", "P", budgets, "mi_bits",
            [om.binary_attack(P, 0.5, bits=True).mi for P in budgets])
    epsilons = np.round(np.linspace(0.0, 1.2, 49 if effort.solver_points > 1 else 7), 10)
    for M in _progress((2, 3, 4), "E2 almost-sure"):
        xs, px = om.pam(M)
        values = [om.support_attack(px, xs, om.attack_grid(xs, 0.025, eps), eps).mi_bits()
                  if eps > 0 else om.entropy(px, bits=True) for eps in epsilons]
        fig.add(f"{M}-PAM almost-sure (support-restricted BA)", "eps", epsilons, "mi_bits", values)
    xs, px = om.pam(3)
    law = om.rd_attack(px, xs, om.attack_grid(xs, effort.pam_step), 0.1, **solver)
    for i, x in enumerate(xs):
        deltas, probs = law.perturbations(i, 1e-4)
        atoms = _atoms(deltas[:, 0], probs, law.outputs[:, 0])
        fig.add(f"3-PAM P=0.1 law of D given x={x:g}", "delta", [atom["delta"] for atom in atoms], "prob",
                [atom["prob"] for atom in atoms])

    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _draw(axes[0], fig, "expected", logx=True)
    axes[0].set(xlabel="budget P = E D^2", ylabel="I (bits)", title="expected budget (M-PAM, spacing 1)")
    _draw(axes[1], fig, "almost-sure")
    axes[1].axvline(0.5, color="grey", ls=":", label="half the spacing")
    axes[1].legend(fontsize=7)
    axes[1].set(xlabel="eps in |D| <= eps", ylabel="I (bits)", title="almost-sure budget")
    for i, x in enumerate(xs):
        d, p = fig.series(f"3-PAM P=0.1 law of D given x={x:g}")
        axes[2].bar(d + (i - 1) * 0.03, p, width=0.03, label=f"x = {x:g}")
    axes[2].set_yscale("log")
    axes[2].set(xlabel="perturbation D", ylabel="probability (log scale)",
                title="optimal law of D given x, 3-PAM, E D^2 <= 0.1")
    axes[2].legend(fontsize=7)
    return fig, figure


def experiment_noisy(effort):
    """E3: a noisy binary signal, X = +-1 seen in N(0, 0.25) noise. The shrink is optimal under an
    almost-sure budget; under an expected budget a randomised attack does slightly better."""
    fig = Figure("fig3_noisy_binary")
    sigma, solver = 0.5, dict(max_iter=effort.max_iter)
    grid = np.round(np.arange(-1.5, 1.5 + 1e-9, effort.noisy_step), 10)
    shrink = np.linspace(0, 1, effort.curve_points)
    fig.add("almost-sure: shrink D = -eps X (closed form)", "eps", shrink, "mi_bits",
            [om.binary_awgn_mi(1 - e, sigma, bits=True) for e in shrink])
    epsilons = np.linspace(0, 1, 11)[:max(2, effort.solver_points)]
    for eps in _progress(epsilons, "E3 almost-sure"):
        fig.add("almost-sure: optimum (exponentiated gradient)", "eps", eps, "mi_bits",
                om.noisy_attack([.5, .5], [-1, 1], grid, sigma, eps=eps, **solver).mi_bits())
    fig.add("expected: shrink D = -sqrt(P) X (closed form)", "P", shrink ** 2, "mi_bits",
            [om.binary_awgn_mi(1 - e, sigma, bits=True) for e in shrink])
    budgets = [0.25, 0.01, 0.02, 0.04, 0.08, 0.12, 0.16, 0.2, 0.3, 0.36, 0.5, 0.64, 0.81]
    for P in _progress(budgets[:effort.solver_points], "E3 expected"):
        result = om.noisy_attack([.5, .5], [-1, 1], grid, sigma, budget=P, **solver)
        fig.add("expected: optimum (exponentiated gradient)", "P", P, "mi_bits", result.mi_bits())
        fig.add("expected: shrink minus optimum", "P", P, "bits",
                om.binary_awgn_mi(1 - np.sqrt(P), sigma, bits=True) - result.mi_bits())
        fig.add("expected: solver gap", "P", P, "nats", result.gap)

    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    _draw(axes[0], fig, "almost-sure")
    axes[0].set(xlabel="eps in |D| <= eps", ylabel="I(X; X+D+N) (bits)", title="X = +-1, N ~ N(0, 0.5^2), almost-sure")
    _draw(axes[1], fig, "expected: ", exclude=("minus", "gap"))
    axes[1].set(xlabel="budget P = E D^2", ylabel="I(X; X+D+N) (bits)", title="expected budget")
    _draw(axes[2], fig, "shrink minus optimum", logx=True)
    axes[2].set(xlabel="budget P = E D^2", ylabel="bits", title="what randomising gains over the shrink")
    return fig, figure


COPIES = (1, 2, 4, 8, 16)


def _plane(points):
    axis = np.linspace(-1.2, 1.2, points)
    return np.array(np.meshgrid(axis, axis)).reshape(2, -1).T, np.array([[-1.0, -1.0], [1.0, 1.0]])


def experiment_copies(effort):
    """E4a: the attacked MI against the number of copies k at a fixed total budget."""
    fig = Figure("fig4_mi_vs_copies")
    solver = dict(max_iter=effort.max_iter)
    for k in COPIES:
        fig.add("gaussian s=0.1: clean", "k", k, "mi_nats", 0.5 * np.log1p(k / 0.1))
        attack = om.redundant_gaussian_attack(1, 0.3, k, 0.1)
        fig.add("gaussian s=0.1, P=0.3: attacked" + ("" if attack.exact else " (best linear)"), "k", k, "mi_nats",
                attack.mi)
        fig.add("gaussian s=0, P=0.3: attacked", "k", k, "mi_nats", om.redundant_gaussian_attack(1, 0.3, k).mi)
    grid = np.linspace(-1, 1, effort.binary_points)
    xs, px = np.array([-1.0, 1.0]), np.array([0.5, 0.5])
    for k in _progress(COPIES, "E4 binary"):
        fig.add("binary, E|D|^2 <= 0.5 (closed form)", "k", k, "mi_bits", om.binary_attack(0.5 / k, bits=True).mi)
        fig.add("binary, E|D|^2 <= 0.5 (Blahut-Arimoto at P/k)", "k", k, "mi_bits",
                om.redundant_attack(px, xs, grid, k, 0.5, **solver).mi_bits())
        for norm, p in (("L2", 2), ("Linf", np.inf)):
            fig.add(f"binary, |D|_{norm} <= 1.2 a.s. (support-restricted BA)", "k", k, "mi_bits",
                    om.redundant_attack(px, xs, om.attack_grid(xs, 0.05, 1.2), k, 1.2, "almost-sure", p).mi_bits())
    plane, pair = _plane(effort.plane_points)  # k = 2 in R^2, without the reduction to one copy
    fig.add("binary, E|D|^2 <= 0.5 (brute force in R^2, k=2)", "k", 2, "mi_bits",
            om.rd_attack(px, pair, plane, 0.5, **solver).mi_bits())
    for norm, p in (("L2", 2), ("Linf", np.inf)):
        fig.add(f"binary, |D|_{norm} <= 1.2 a.s. (brute force in R^2, k=2)", "k", 2, "mi_bits",
                om.support_attack(px, pair, plane, 1.2, p).mi_bits())

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    _draw(left, fig, "gaussian", logx=True)
    left.set(xlabel="copies k", ylabel="I (nats)", title="X ~ N(0, 1), total budget E|D|^2 <= 0.3")
    _draw(right, fig, "binary", logx=True)
    right.set(xlabel="copies k", ylabel="I (bits)", title="X = +-1, k noiseless copies")
    return fig, figure


def experiment_budget_for_mi(effort):
    """E4b: the total budget needed to bring the MI down to a fixed value, against k (log-log)."""
    fig = Figure("fig5_budget_vs_copies")
    target_bits = 0.5
    q_target = brentq(lambda q: 1 - om.binary_entropy(q) - target_bits, 1e-12, 0.5)
    single = 4 * q_target * (1 - q_target)  # E D^2 that leaves 0.5 bit of X = +-1 (binary_attack inverted)
    for k in COPIES:
        fig.add("gaussian s=0: P for I = 0.5 nats (closed form)", "k", k, "budget", k * np.exp(-1.0))
        needed = k * np.exp(-1.0) - 0.1
        if om.redundant_gaussian_attack(1, needed, k, 0.1).exact:
            fig.add("gaussian s=0.1: P for I = 0.5 nats (closed form)", "k", k, "budget", needed)
        fig.add("binary: P for I = 0.5 bits (closed form)", "k", k, "budget", k * single)
        fig.add("binary: eps of |D|_L2 for I = 0 (closed form)", "k", k, "budget", np.sqrt(k))
        fig.add("binary: eps of |D|_Linf for I = 0 (closed form)", "k", k, "budget", 1.0)
    solver = dict(max_iter=effort.max_iter)
    xs, px = np.array([-1.0, 1.0]), np.array([0.5, 0.5])
    plane, pair = _plane(effort.plane_points)
    problems = {1: (xs, np.linspace(-1, 1, effort.binary_points), om.attack_grid(xs, 0.01, 1.5)),
                2: (pair, plane, plane)}
    for k, (points, grid, wide) in _progress(problems.items(), "E5 solvers"):
        budget = brentq(lambda P: om.rd_attack(px, points, grid, P, **solver).mi_bits() - target_bits,
                        0.01 * k, 0.99 * k, rtol=1e-4)
        fig.add("binary: P for I = 0.5 bits (Blahut-Arimoto" + (", brute force in R^2)" if k == 2 else ")"),
                "k", k, "budget", budget)
        for norm, p in (("L2", 2), ("Linf", np.inf)):
            eps = _smallest_budget(lambda e: om.support_attack(px, points, wide, e, p).mi_bits(), target_bits, 3.0, 1e-3)
            fig.add(f"binary: eps of |D|_{norm} for I = 0 (support-restricted BA"
                    + (", brute force in R^2)" if k == 2 else ")"), "k", k, "budget", eps)

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5.5))
    _draw(axis, fig, "", logx=True)
    axis.set_yscale("log")
    axis.set(xlabel="copies k", ylabel="total budget needed (P = E|D|^2, or eps)",
             title="budget for a fixed MI against k: slope 1 for E|D|^2, 1/2 for L2 eps, 0 for L-inf eps")
    return fig, figure


def _smallest_budget(mi_of, target, upper, rtol):
    """The smallest budget in (0, upper] whose MI is at most target, by bisection (MI decreases with it)."""
    lower = 0.0
    while upper - lower > rtol * upper:
        middle = 0.5 * (lower + upper)
        lower, upper = (lower, middle) if mi_of(middle) <= target + 1e-9 else (middle, upper)
    return upper


def _draw(axis, fig, part, logx=False, exclude=("law of D", "gap")):
    """Every series whose name contains `part` (and none of `exclude`): solver results as markers, closed
    forms as lines."""
    colours = {}  # one colour per quantity: its closed form and its solver points alike
    for name in dict.fromkeys(row[0] for row in fig.rows):
        if part not in name or any(word in name for word in exclude):
            continue
        x, y = fig.series(name)
        order = np.argsort(x)
        colour = colours.setdefault(name.split(" (")[0], f"C{len(colours) % 10}")
        if "best linear" in name:
            axis.plot(x[order], y[order], "s", color=colour, ms=4, label=name)
        elif "brute force" in name:
            axis.plot(x[order], y[order], "x", color=colour, ms=10, mew=2, label=name)
        elif any(word in name for word in ("Blahut", "exponentiated", "support-restricted")):
            axis.plot(x[order], y[order], "o", color=colour, mfc="none", ms=7, mew=1.5, label=name)
        else:
            axis.plot(x[order], y[order], "-" if len(x) > 6 else "s-", color=colour, lw=1.4, ms=4, label=name)
    if logx:
        axis.set_xscale("log")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=6.5)


EXPERIMENTS = (experiment_budget, experiment_discrete, experiment_noisy, experiment_copies, experiment_budget_for_mi)


def run_figures(out: Path, quick: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    for experiment in EXPERIMENTS:
        start = time.time()
        fig, figure = experiment(QUICK if quick else FULL)
        fig.write_csv(out)
        figure.suptitle(f"{experiment.__doc__.split(': ', 1)[1].split('. ')[0].strip()} ({FORMULATION})", fontsize=8)
        if not quick:  # laying out the text is most of a quick run's time
            figure.tight_layout()
        figure.savefig(out / f"{fig.name}.png", dpi=50 if quick else 110)
        plt.close(figure)
        print(f"{fig.name}: {len(fig.rows)} rows, {time.time() - start:.1f} s -> {out / fig.name}.csv/.png")


if __name__ == "__main__":
    run_main(main)
