#!/usr/bin/env python3
"""Synthetic feature-compression benchmark: does a small trained MLP use k redundant noisy copies of a binary
signal the way the optimal classifier does (L2 robustness radius ~ sqrt(k)), or "compress" them (radius O(1))?

Data: X uniform on {-1, +1}, the classifier sees Y = X 1_k + N, N ~ N(0, sigma_N^2 I_k), sigma_N = 0.5.
The optimal (Bayes) classifier is sign(mean(Y)); the distance from Y to its boundary is |sum(Y)| / sqrt(k),
so its robustness radius is about sqrt(k) (N(sqrt(k), sigma_N^2) on the correctly classified samples), and
under the worst L2 attack of norm eps (delta = -eps X 1_k / sqrt(k)) its accuracy is
Phi((sqrt(k) - eps) / sigma_N). A classifier that reads one copy only has radius |Y_1| = O(1) and accuracy
Phi((1 - eps) / sigma_N). Per k, this script
  - checks the closed form against Monte-Carlo (the worst attack on sign(mean(Y)), --mc-samples samples),
  - trains the tests' small MLP (one hidden layer of --hidden ReLUs, two logits; cross-entropy, Adam),
  - measures per test sample the L2 radius that flips it: bisection over eps, at each eps an L2 PGD
    (on the logit margin, with two classes the cross-entropy's direction; zero start, --pgd-steps steps of
    2.5 eps / steps; the sample counts as flipped if any iterate is misclassified; no box constraint),
    radius 0 for samples misclassified clean,
  - also the first flip on the line y - t X 1_k / sqrt(k) (the optimal classifier's worst attack): PGD gets
    stuck where every ReLU of the MLP is off (constant logits between the classes), so the flip radius kept
    is per sample the smaller of the two attacks' (both are upper bounds on the smallest flipping norm),
  - measures PGD's radius on the optimal classifier (a check of the radius measurement: it must find
    |sum(Y)| / sqrt(k)),
  - derives from the radii the accuracy and the label MI I(Y; Y^) (bits) under the L2 attack at each
    --epsilons, against the optimal classifier's closed forms.
Writes results.json and results.md into --out-dir (default bench/results/feature_compression).

    OMP_NUM_THREADS=1 python bench/feature_compression.py
"""
import argparse
import json
import math
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.attacks import project  # noqa: E402
from utils.label_mi import hard_label_mi  # noqa: E402
from utils.runtime import package_versions  # noqa: E402

SIGMA_N = 0.5


def normal_cdf(value: float) -> float:
    return 0.5 * math.erfc(-value / math.sqrt(2.0))


def optimal_accuracy(k: int, epsilon: float, sigma: float = SIGMA_N) -> float:
    """Accuracy of sign(mean(Y)) under the worst L2 attack of norm epsilon: Phi((sqrt(k) - epsilon) / sigma)."""
    return normal_cdf((math.sqrt(k) - epsilon) / sigma)


def compressed_accuracy(epsilon: float, sigma: float = SIGMA_N) -> float:
    """Accuracy of sign(Y_1) (one copy) under the worst L2 attack of norm epsilon: Phi((1 - epsilon) / sigma)."""
    return normal_cdf((1.0 - epsilon) / sigma)


def binary_entropy_bits(p: float) -> float:
    return 0.0 if p <= 0 or p >= 1 else -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def optimal_label_mi_bits(k: int, epsilon: float, sigma: float = SIGMA_N) -> float:
    """I(X; Y^) of sign(mean(Y)) under the worst attack: a binary symmetric channel, 1 - h(error) bits."""
    return 1.0 - binary_entropy_bits(1.0 - optimal_accuracy(k, epsilon, sigma))


def sample(n: int, k: int, sigma: float, generator: torch.Generator):
    """(Y, labels): X = 2 label - 1, Y = X 1_k + sigma N; the two classes as balanced as n allows (H(Y) = 1 bit
    for even n), in random order."""
    labels = (torch.arange(n) % 2)[torch.randperm(n, generator=generator)]
    x = (2 * labels - 1).float()
    return x[:, None] + sigma * torch.randn(n, k, generator=generator), labels


def worst_attack(y: torch.Tensor, labels: torch.Tensor, epsilon: float) -> torch.Tensor:
    """The worst L2 perturbation of norm epsilon against sign(mean(Y)): -epsilon X 1_k / sqrt(k)."""
    x = (2 * labels - 1).float()
    return -epsilon * x[:, None] * torch.ones_like(y) / math.sqrt(y.shape[1])


def monte_carlo_optimal_accuracy(k: int, epsilon: float, samples: int, seed: int, sigma: float = SIGMA_N) -> float:
    """The accuracy of sign(mean(Y)) on Y + worst_attack, by sampling."""
    generator = torch.Generator().manual_seed(seed)
    y, labels = sample(samples, k, sigma, generator)
    attacked = y + worst_attack(y, labels, epsilon)
    return ((attacked.mean(dim=1) > 0).long() == labels).float().mean().item()


class OptimalClassifier(nn.Module):
    """sign(mean(Y)) as two logits (-s mean, +s mean): the L2 distance to its boundary is |sum(Y)| / sqrt(k)."""

    def __init__(self, scale: float = 4.0):
        super().__init__()
        self.scale = scale

    def forward(self, y):
        m = self.scale * y.mean(dim=1, keepdim=True)
        return torch.cat([-m, m], dim=1)


def small_mlp(k: int, hidden: int) -> nn.Module:
    """The tests' small MLP (tests/test_adaptive_attacks.py): Linear(k, hidden), ReLU, Linear(hidden, 2)."""
    return nn.Sequential(nn.Linear(k, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def train(model, y, labels, epochs: int, batch_size: int, lr: float, weight_decay: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(epochs):
        for index in torch.randperm(len(y), generator=generator).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(y[index]), labels[index]).backward()
            optimizer.step()
    return model.eval()


def flipped_within(model, y, labels, epsilon: torch.Tensor, steps: int) -> torch.Tensor:
    """Per sample, whether L2 PGD (zero start, steps of 2.5 eps / steps) within its own radius epsilon[i] finds a
    misclassified point (any iterate). It ascends the margin z_other - z_true: with two classes, the direction of
    the cross-entropy's gradient, without its saturation (an exactly zero gradient on very confident logits).
    Where the gradient is exactly zero (a region where every ReLU is off: constant logits, which the trained
    MLPs have between the two classes) the step keeps the last direction instead of stopping there."""
    eps = epsilon[:, None]
    step = 2.5 * eps / steps
    delta = torch.zeros_like(y)
    direction = torch.zeros_like(y)
    flipped = torch.zeros(len(y), dtype=torch.bool)
    for _ in range(steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            logits = model(y + delta)
            loss = (logits.gather(1, (1 - labels)[:, None]) - logits.gather(1, labels[:, None])).sum()
            grad, = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            norm = grad.norm(dim=1, keepdim=True)
            direction = torch.where(norm > 0, grad / norm.clamp_min(1e-30), direction)
            delta = project(delta + step * direction, "l2", eps)
            flipped |= model(y + delta).argmax(dim=1) != labels
    return flipped


def flip_radius(model, y, labels, steps: int, bisections: int) -> torch.Tensor:
    """Per sample, the smallest L2 radius at which PGD flips it (bisection; 0 when misclassified clean).
    The upper end starts at sqrt(k) + 4 and doubles until every sample is flipped (at most 8 times)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with torch.no_grad():
        correct = model(y).argmax(dim=1) == labels
    high = torch.full((len(y),), math.sqrt(y.shape[1]) + 4.0)
    for _ in range(8):
        missing = ~flipped_within(model, y, labels, high, steps) & correct
        if not missing.any():
            break
        high[missing] *= 2
    low = torch.zeros(len(y))
    for _ in range(bisections):
        middle = (low + high) / 2
        flipped = flipped_within(model, y, labels, middle, steps)
        high = torch.where(flipped, middle, high)
        low = torch.where(flipped, low, middle)
    return torch.where(correct, high, torch.zeros_like(high))


def line_search_radius(model, y, labels, points: int = 1000) -> torch.Tensor:
    """Per sample, the first radius t on a grid of `points` in (0, 3 sqrt(k) + 4] at which the model misclassifies
    y - t X 1_k / sqrt(k) (the worst attack on the optimal classifier; inf if never): another upper bound on the
    flip radius, to check PGD's (0 when misclassified clean)."""
    k = y.shape[1]
    direction = -(2 * labels - 1).float()[:, None] * torch.ones(k) / math.sqrt(k)
    first = torch.full((len(y),), float("inf"))
    with torch.no_grad():
        for t in torch.linspace(0, 3 * math.sqrt(k) + 4, points + 1).flip(0):
            first = torch.where(model(y + t * direction).argmax(dim=1) != labels, t, first)
    return first


def under_attack(radius: torch.Tensor, labels: torch.Tensor, clean_predictions: torch.Tensor, epsilon: float):
    """Predictions under the L2 attack of norm epsilon, from the flip radii: flipped (radius <= epsilon) means the
    other class of two, otherwise the clean prediction."""
    return torch.where(radius <= epsilon, 1 - labels, clean_predictions)


def median(values: torch.Tensor) -> float:
    return values.median().item()


def run_k(k: int, args) -> dict:
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed * 1000 + k)
    train_y, train_labels = sample(args.train, k, args.sigma, generator)
    test_y, test_labels = sample(args.test, k, args.sigma, generator)
    torch.manual_seed(args.seed)
    model = train(small_mlp(k, args.hidden), train_y, train_labels, args.epochs, args.batch_size, args.lr,
                  args.weight_decay, args.seed)
    optimal = OptimalClassifier().eval()
    with torch.no_grad():
        predicted = model(test_y).argmax(dim=1)
        optimal_predicted = optimal(test_y).argmax(dim=1)
    pgd_radius = flip_radius(model, test_y, test_labels, args.pgd_steps, args.bisections)
    line_radius = line_search_radius(model, test_y, test_labels)
    radius = torch.minimum(pgd_radius, line_radius)
    optimal_radius = flip_radius(optimal, test_y, test_labels, args.pgd_steps, args.bisections)
    exact_radius = test_y.sum(dim=1).abs() / math.sqrt(k)
    resolution = (3 * math.sqrt(k) + 4) / 1000
    optimal_correct = optimal_predicted == test_labels
    # How the MLP reads the copies: |cos| between its margin's input gradient at each test point and 1_k (1 for the
    # optimal classifier; 1 / sqrt(k) for one that reads a single copy), and its first layer's share of squared
    # weight along 1_k.
    points = test_y.clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(points)
        gradient, = torch.autograd.grad((logits[:, 1] - logits[:, 0]).sum(), points)
    cosine = (gradient.sum(dim=1) / math.sqrt(k)).abs() / gradient.norm(dim=1).clamp_min(1e-30)
    weight = model[0].weight.detach()
    along = (weight @ torch.ones(k) / math.sqrt(k)).pow(2).sum() / weight.pow(2).sum()
    per_epsilon = []
    for epsilon in args.epsilons:
        attacked = under_attack(radius, test_labels, predicted, epsilon)
        per_epsilon.append({
            "epsilon": epsilon,
            "mlp_accuracy": (attacked == test_labels).float().mean().item(),
            "mlp_label_mi_bits": hard_label_mi(attacked, test_labels, 2),
            "optimal_accuracy_closed_form": optimal_accuracy(k, epsilon, args.sigma),
            "optimal_accuracy_monte_carlo": monte_carlo_optimal_accuracy(k, epsilon, args.mc_samples, args.seed + k,
                                                                         args.sigma),
            "optimal_accuracy_measured": ((optimal_radius > epsilon) & optimal_correct).float().mean().item(),
            "optimal_label_mi_bits_closed_form": optimal_label_mi_bits(k, epsilon, args.sigma),
            "compressed_accuracy_closed_form": compressed_accuracy(epsilon, args.sigma),
        })
    correct = predicted == test_labels
    return {
        "k": k, "seconds": round(time.perf_counter() - started, 2),
        "mlp_clean_accuracy": correct.float().mean().item(),
        "optimal_clean_accuracy_closed_form": normal_cdf(math.sqrt(k) / args.sigma),
        "mlp_median_radius": median(radius[correct]),
        "mlp_mean_radius": radius[correct].mean().item(),
        "mlp_radius_quartiles": [radius[correct].quantile(q).item() for q in (0.25, 0.75)],
        "mlp_median_radius_pgd": median(pgd_radius[correct]),
        "mlp_median_radius_line_search": median(line_radius[correct]),
        "mlp_share_line_search_below_pgd": (line_radius < pgd_radius - resolution)[correct].float().mean().item(),
        "optimal_median_radius_measured": median(optimal_radius[optimal_correct]),
        "optimal_median_radius_exact": median(exact_radius[optimal_correct]),
        "optimal_radius_max_error": (optimal_radius - exact_radius)[optimal_correct].abs().max().item(),
        "sqrt_k": math.sqrt(k),
        "mlp_first_layer_share_along_ones": along.item(),
        "mlp_median_gradient_cosine_with_ones": median(cosine[correct]),
        "per_epsilon": per_epsilon,
    }


def log_slope(ks, values) -> float:
    """Least-squares slope of log(value) against log(k)."""
    xs, ys = [math.log(k) for k in ks], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def markdown(report: dict) -> str:
    args, rows = report["settings"], report["rows"]
    lines = ["# Feature compression: the L2 radius of a small MLP on k noisy copies of a binary signal", "",
             f"Command: `{report['command']}`", "",
             f"Machine: {report['machine']}. Wall time {report['wall_seconds']:.1f} s. Seed {args['seed']} "
             f"(data of k: seed * 1000 + k; Monte-Carlo of k: seed + k).", "",
             f"X uniform on {{-1, +1}}, Y = X 1_k + N, N ~ N(0, {args['sigma']}^2 I_k); {args['train']} training and "
             f"{args['test']} test samples per k. MLP: Linear(k, {args['hidden']}), ReLU, Linear({args['hidden']}, 2), "
             f"cross-entropy, Adam lr {args['lr']}, weight decay {args['weight_decay']}, {args['epochs']} epochs of "
             f"batches of {args['batch_size']}. Flip radius, per sample the smaller of two attacks': PGD (bisection, "
             f"{args['bisections']} halvings, over the L2 budget, L2 PGD of {args['pgd_steps']} steps of 2.5 eps / "
             f"steps at each) and the first flip along -X 1_k (a grid of 1000 radii); medians over the correctly "
             f"classified test samples. Optimal classifier: sign(mean(Y)), radius |sum(Y)| / sqrt(k).", "",
             "| k | sqrt(k) | MLP clean acc | MLP median radius (IQR) | MLP radius / sqrt(k) | MLP: PGD / along -X 1_k "
             "| optimal median radius (PGD / exact) | MLP gradient: median abs cos with 1_k | MLP first-layer share "
             "along 1_k |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        q1, q3 = row["mlp_radius_quartiles"]
        lines.append(f"| {row['k']} | {row['sqrt_k']:.2f} | {100 * row['mlp_clean_accuracy']:.1f} % | "
                     f"{row['mlp_median_radius']:.3f} ({q1:.2f}-{q3:.2f}) | "
                     f"{row['mlp_median_radius'] / row['sqrt_k']:.3f} | {row['mlp_median_radius_pgd']:.3f} / "
                     f"{row['mlp_median_radius_line_search']:.3f} | "
                     f"{row['optimal_median_radius_measured']:.3f} / {row['optimal_median_radius_exact']:.3f} | "
                     f"{row['mlp_median_gradient_cosine_with_ones']:.3f} | "
                     f"{row['mlp_first_layer_share_along_ones']:.3f} |")
    lines += ["", f"Log-log slope of the median radius against k: MLP {report['mlp_radius_slope']:.3f}, optimal "
                  f"{report['optimal_radius_slope']:.3f} (sqrt(k): 0.5; compression: 0). The PGD radius of the optimal "
                  f"classifier is within {report['optimal_radius_max_error']:.2g} of the exact one on every sample. On the MLP the "
                  f"line y - t X 1_k / sqrt(k) flips a sample at a smaller radius than PGD for up to "
                  f"{100 * report['max_share_line_search_below_pgd']:.1f} % of the samples of one k (PGD stalls where "
                  f"every ReLU is off). Both are attacks, so the radii are upper bounds on the smallest flipping "
                  f"norm.", "",
              "Under the L2 attack of norm eps (accuracy %, and label MI I(Y; Y^) in bits): the MLP's from its flip "
              "radii; the optimal classifier's closed form Phi((sqrt(k) - eps) / sigma_N), its Monte-Carlo check "
              f"({args['mc_samples']} samples, worst attack -eps X 1_k / sqrt(k)) and 1 - h(error); a one-copy "
              "classifier's Phi((1 - eps) / sigma_N).", "",
              "| k | eps | MLP acc | MLP label MI | optimal acc: closed form / Monte-Carlo | optimal label MI | "
              "one-copy acc |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for entry in row["per_epsilon"]:
            lines.append(f"| {row['k']} | {entry['epsilon']:g} | {100 * entry['mlp_accuracy']:.1f} | "
                         f"{entry['mlp_label_mi_bits']:.3f} | {100 * entry['optimal_accuracy_closed_form']:.2f} / "
                         f"{100 * entry['optimal_accuracy_monte_carlo']:.2f} | "
                         f"{entry['optimal_label_mi_bits_closed_form']:.3f} | "
                         f"{100 * entry['compressed_accuracy_closed_form']:.2f} |")
    lines += ["", f"Largest |closed form - Monte-Carlo| over k and eps: {report['max_monte_carlo_gap']:.4f}.", "",
              "## Reading", "", report["reading"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--sigma", type=float, default=SIGMA_N, help="sigma_N, the noise of each copy")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--test", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--bisections", type=int, default=12)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--mc-samples", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(REPO / "bench" / "results" / "feature_compression"))
    parser.add_argument("--machine", default=f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread(s)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows = []
    for k in args.ks:
        rows.append(run_k(k, args))
        row = rows[-1]
        print(f"k {k}: MLP clean {row['mlp_clean_accuracy']:.3f}, median radius {row['mlp_median_radius']:.3f} "
              f"(sqrt(k) {row['sqrt_k']:.3f}, optimal {row['optimal_median_radius_measured']:.3f}), "
              f"{row['seconds']:.1f} s", flush=True)
    mlp_slope = log_slope(args.ks, [row["mlp_median_radius"] for row in rows])
    optimal_slope = log_slope(args.ks, [row["optimal_median_radius_measured"] for row in rows])
    ratios = [row["mlp_median_radius"] / row["sqrt_k"] for row in rows]
    verdict = ("follows sqrt(k)" if mlp_slope > 0.4 else
               "compresses (its radius stays O(1))" if mlp_slope < 0.1 else "sits between the two")
    last = rows[-1]
    setting = f"{args.train} training samples, sigma_N {args.sigma:g}, plain cross-entropy training"
    reading = (f"The MLP's median flip radius grows as k^{mlp_slope:.2f} against the optimal classifier's "
               f"k^{optimal_slope:.2f}: in this setting ({setting}) it {verdict}, at {min(ratios):.2f}-"
               f"{max(ratios):.2f} times sqrt(k) over k = {args.ks[0]}-{args.ks[-1]}. At k = {last['k']} its margin's "
               f"input gradient has a median |cos| of {last['mlp_median_gradient_cosine_with_ones']:.2f} with 1_k "
               f"(optimal classifier 1, one copy {1 / math.sqrt(last['k']):.2f}) although its first layer puts only "
               f"{100 * last['mlp_first_layer_share_along_ones']:.0f} % of its squared weight along 1_k: the rest, mostly "
               f"left from the random initialisation, contributes comparatively little to the input gradient.")
    report = {
        "command": shlex.join(["python", "bench/feature_compression.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": args.machine, "settings": {k: v for k, v in vars(args).items() if k not in ("out_dir", "machine")},
        "rows": rows, "mlp_radius_slope": mlp_slope, "optimal_radius_slope": optimal_slope,
        "optimal_radius_max_error": max(row["optimal_radius_max_error"] for row in rows),
        "max_share_line_search_below_pgd": max(row["mlp_share_line_search_below_pgd"] for row in rows),
        "max_monte_carlo_gap": max(abs(e["optimal_accuracy_closed_form"] - e["optimal_accuracy_monte_carlo"])
                                   for row in rows for e in row["per_epsilon"]),
        "reading": reading, "wall_seconds": round(time.perf_counter() - started, 1),
        "versions": package_versions(),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "results.md").write_text(markdown(report))
    print(reading)
    return report


if __name__ == "__main__":
    main()
