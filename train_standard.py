#!/usr/bin/env python3
"""Stage 1: train a target model with Standard AT (Madry et al.), TRADES or MART.

Example (Fashion-MNIST, SmallCNN, a subset; runs on a laptop CPU):
    python train_standard.py --dataset fashion-mnist --train-limit 10000 --epochs 10
"""
import sys
from pathlib import Path

from utils.cli import (ArgumentParser, add_attack_args, add_data_args, add_model_args, add_optimizer_args,
                       add_runtime_args, nonnegative_number, resolve_dataset_defaults)
from utils.errors import UserError, run_main
from utils.losses import BASE_LOSSES, OBJECTIVES
from utils.training import make_adversarial_step, train_target_model

STAGE = "standard"


def build_parser():
    parser = ArgumentParser(description="Stage 1: adversarial training of the target model (Standard AT / TRADES / MART).")
    add_data_args(parser)
    add_model_args(parser)
    add_optimizer_args(parser)
    add_attack_args(parser)
    group = parser.add_argument_group("objective")
    group.add_argument("--loss", choices=BASE_LOSSES, default="at",
                       help="at: Standard AT (Madry); trades: TRADES; mart: MART")
    group.add_argument("--beta", type=nonnegative_number, default=6.0, help="weight of the KL term of TRADES / MART")
    add_runtime_args(parser, "checkpoints/standard_<dataset>_<arch>_<loss>_<norm>_seed<seed>", fast_path=True)
    return parser


def parse_args(argv=None):
    args = resolve_dataset_defaults(build_parser().parse_args(argv))
    if args.model_dir is None:
        args.model_dir = f"checkpoints/{STAGE}_{args.dataset}_{args.arch}_{args.loss}_{args.norm}_seed{args.seed}"
    if args.norm == "linf" and args.epsilon >= 1:
        raise UserError(f"--epsilon {args.epsilon} is not an L-inf budget in [0, 1] pixel units (try 8/255)")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    objective = OBJECTIVES[args.loss]

    def make_step(model, schedule, generator):
        return make_adversarial_step(model, objective, schedule, args.beta, generator, bn_stats=args.bn_stats)

    train_target_model(args, argv, Path(__file__).name, STAGE, objective, make_step)
    return 0


if __name__ == "__main__":
    run_main(main)
