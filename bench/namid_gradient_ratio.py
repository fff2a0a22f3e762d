#!/usr/bin/env python3
"""How strongly NAMID's MI term pulls against the base loss on a given target: per training batch, the norm of
the gradient of L_mi (alpha = 1) over the norm of the gradient of L_base, on a trained stage-1 target with the
stage-2 estimators trained on it. Used to choose alpha for a head whose loss has another scale than
cross-entropy (the MMC loss is ~C^2/4 = 25 where cross-entropy is ~0.7): docs/method.md section 12.

    python bench/namid_gradient_ratio.py --target T/best.pt --estimators E/estimators.pt --data-dir data
"""
import statistics

import torch

from common import target_and_estimators_parser  # puts the repository on sys.path
from defenses import head_for  # noqa: E402
from utils.attacks import PGDConfig  # noqa: E402
from utils.data import load_splits  # noqa: E402
from utils.estimator_training import load_estimators  # noqa: E402
from utils.losses import OBJECTIVES  # noqa: E402
from utils.namid import make_namid_step  # noqa: E402
from utils.training import load_model  # noqa: E402


def step_gradient(model, estimators, checkpoint, head, attack, x, y, seed, alpha):
    """The parameter gradient of one NAMID (AT base) step's loss, and its extras; the attack seeded by `seed`,
    so that two calls differing in alpha see the same adversarials."""
    step = make_namid_step(model, estimators, OBJECTIVES["at"], lambda index: attack, torch.Generator().manual_seed(seed),
                           beta=6.0, alpha=alpha, lam=0.1, measure=checkpoint["estimator_spec"]["measure"], head=head)
    loss, _, _, extras = step(x, y, 0)
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]), extras


def main():
    parser = target_and_estimators_parser(__doc__)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    model, checkpoint = load_model(args.target, "cpu")
    estimators, estimator_checkpoint = load_estimators(args.estimators, "cpu")
    head = head_for(checkpoint["model_spec"])
    attack_of = estimator_checkpoint["attack"]
    attack = OBJECTIVES["at"].training_attack(PGDConfig(attack_of["norm"], attack_of["epsilon"], attack_of["step_size"],
                                                        attack_of["num_steps"]), head)
    count = args.batches * args.batch_size
    splits = load_splits(checkpoint["model_spec"]["dataset"], args.data_dir, val_size=0, train_limit=count,
                         test_limit=10, seed=0)
    xs, ys = zip(*(splits.train[i] for i in range(count)))
    x, y = torch.stack(xs), torch.tensor(ys)
    ratios = []
    for b in range(args.batches):
        part = slice(b * args.batch_size, (b + 1) * args.batch_size)
        base, extras = step_gradient(model, estimators, estimator_checkpoint, head, attack, x[part], y[part], b, 0.0)
        full, extras = step_gradient(model, estimators, estimator_checkpoint, head, attack, x[part], y[part], b, 1.0)
        ratios.append(((full - base).norm() / base.norm()).item())
        print(f"batch {b}: L_base {extras['base_loss'].item():.3f}, L_mi {extras['mi_loss'].item():.3f}, "
              f"|X'| {int(extras['selected'])}, |grad L_mi| / |grad L_base| {ratios[-1]:.4f}")
    print(f"head {head.name}: median ratio {statistics.median(ratios):.4f} over {len(ratios)} batches")


if __name__ == "__main__":
    main()
