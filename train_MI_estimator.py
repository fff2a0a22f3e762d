#!/usr/bin/env python3
"""Stage 2a: train the natural-MI and adversarial-MI estimators with the paper's Eq. 5, bounded (or as written, or the published code's objective).

On the selected set X' (correct when natural, fooled when attacked), E_n maximises
I_N(x; h(x)) - beta I_N(x; h(x~)) and E_a maximises I_A(n; h(x~)) - beta I_A(n; h(x)); the target is frozen.

Example:
    python train_MI_estimator.py --target-model checkpoints/standard_fashion-mnist_small-cnn_at_linf_seed0/best.pt
"""
import sys
from functools import partial
from pathlib import Path

from utils.cli import ArgumentParser, nonnegative_number
from utils.errors import run_main
from utils.estimator_training import add_estimator_args, train_estimators
from utils.mi import paper_objective, reference_objective


def build_parser():
    parser = ArgumentParser(description="Stage 2a: MI estimators trained with the paper's Eq. 5.")
    add_estimator_args(parser, default_epochs=25, model_dir_hint="checkpoints/estimators_<loss>_<dataset>_<measure>_seed<seed>")
    group = parser.add_argument_group("objective")
    group.add_argument("--estimator-loss", choices=("paper-bounded", "paper", "reference"), default="paper-bounded",
                       help="paper-bounded: Eq. 5 with each subtracted estimate clamped at 0 (a constant critic's score); "
                            "paper: Eq. 5 as written, which diverges; reference: the published code's objective with "
                            "cosine terms (docs/method.md section 5)")
    group.add_argument("--beta", type=nonnegative_number, default=1.0, help="weight of the subtracted MI in Eq. 5")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.estimator_loss in ("paper", "paper-bounded"):
        objective = partial(paper_objective, beta=args.beta, bounded=args.estimator_loss == "paper-bounded")
    else:
        objective = reference_objective
    return train_estimators(args, argv, Path(__file__).name, objective, args.estimator_loss)


if __name__ == "__main__":
    run_main(main)
