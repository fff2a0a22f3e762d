#!/usr/bin/env python3
"""Stage 2b: train the natural-MI and adversarial-MI estimators by plain MI maximisation (the paper's Eq. 4).

E_n maximises I_N(x; h(x)) over correctly classified natural samples; E_a maximises I_A(n; h(x~)) over
samples whose adversarial is misclassified; the target is frozen. The WMIM baseline uses these estimators.

Example:
    python train_MI_estimator_only_max.py --target-model checkpoints/standard_fashion-mnist_small-cnn_at_linf_seed0/best.pt
"""
import sys
from pathlib import Path

from utils.cli import ArgumentParser
from utils.errors import run_main
from utils.estimator_training import add_estimator_args, train_estimators
from utils.mi import only_max_objective


def build_parser():
    parser = ArgumentParser(description="Stage 2b: MI estimators trained by plain MI maximisation (Eq. 4).")
    add_estimator_args(parser, default_epochs=50, model_dir_hint="checkpoints/estimators_only-max_<dataset>_<measure>_seed<seed>")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    return train_estimators(args, argv, Path(__file__).name, only_max_objective, "only-max")


if __name__ == "__main__":
    run_main(main)
