#!/usr/bin/env python3
"""Stage 1: train a target model with Standard AT (Madry et al.), TRADES or MART, or naturally; with a
softmax head or one of the seed talk's heads (MM-LDA, MMC, an ADP ensemble: defenses/__init__.py).

Examples (Fashion-MNIST, SmallCNN, a subset; run on a laptop CPU):
    python train_standard.py --dataset fashion-mnist --train-limit 10000 --epochs 10
    python train_standard.py --dataset fashion-mnist --train-limit 10000 --epochs 10 --head mmc          # AT-MMC-10
    python train_standard.py --dataset fashion-mnist --train-limit 10000 --loss natural --head adp      # ADP_{2,0.5}
    python train_standard.py --dataset fashion-mnist --train-limit 10000 --loss iat   # for test_mixup_inference.py
"""
import sys
from pathlib import Path

from utils.cli import (ArgumentParser, add_attack_args, add_data_args, add_model_args, add_optimizer_args,
                       add_runtime_args, nonnegative_number, positive_number, resolve_dataset_defaults,
                       unit_interval)
from utils.data import dataset_info
from utils.errors import UserError, run_main
from utils.losses import MIXUP_LOSSES, OBJECTIVES, TRAINING_LOSSES, check_head_supports
from utils.training import make_adversarial_step, train_target_model

STAGE = "standard"


def build_parser():
    parser = ArgumentParser(description="Stage 1: training of the target model (Standard AT / TRADES / MART, or natural "
                                        "training), with a softmax, MM-LDA, MMC or ADP-ensemble head.")
    add_data_args(parser)
    add_model_args(parser)
    add_optimizer_args(parser)
    add_attack_args(parser)
    group = parser.add_argument_group("objective")
    group.add_argument("--loss", choices=TRAINING_LOSSES, default="at",
                       help="at: Standard AT (Madry; with --head mmc its attack ascends the CW margin, with adp it trains on "
                            "x~ and x as the ADP paper's AT); trades: TRADES; mart: MART; natural: no attack, the head's "
                            "own loss on clean images (best.pt is then selected on validation clean accuracy); mixup: mixup "
                            "training (best.pt on validation clean accuracy); iat: interpolated adversarial training "
                            "(PGD at --epsilon / --num-steps / --step-size against the model's predicted labels, then "
                            "mixup of the adversarial and of the clean batch). Both train models for mixup inference "
                            "(test_mixup_inference.py), softmax head only")
    group.add_argument("--at-attack-loss", choices=("ce", "cw"), default=None,
                       help="at: the loss the training PGD ascends, cross-entropy or the CW margin (default: the head's, "
                            "ce for softmax, mm-lda, adp and rce, cw for mmc). cw with the softmax head separates "
                            "AT-MMC's margin attack from its head")
    group.add_argument("--beta", type=nonnegative_number, default=6.0, help="weight of the KL term of TRADES / MART")
    group.add_argument("--mixup-alpha", type=positive_number, default=1.0,
                       help="mixup / iat: lambda ~ Beta(alpha, alpha) per example (the mixup inference authors' 1)")
    group.add_argument("--iat-adv-ratio", type=unit_interval, default=0.5,
                       help="iat: weight r of the adversarial mix, loss = r CE(adv mix) + (1 - r) CE(clean mix) "
                            "(the authors' 0.5)")
    add_runtime_args(parser, "checkpoints/standard_<dataset>_<arch>[_<head>]_<loss>_<norm>_seed<seed>", fast_path=True)
    return parser


def parse_args(argv=None):
    args = resolve_dataset_defaults(build_parser().parse_args(argv))
    if args.model_dir is None:
        head = "" if args.head == "softmax" else f"_{args.head}"
        args.model_dir = f"checkpoints/{STAGE}_{args.dataset}_{args.arch}{head}_{args.loss}_{args.norm}_seed{args.seed}"
    if args.norm == "linf" and args.epsilon >= 1:
        raise UserError(f"--epsilon {args.epsilon} is not an L-inf budget in [0, 1] pixel units (try 8/255)")
    check_head_supports(args.head, args.loss, args.at_attack_loss)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    objective = OBJECTIVES[args.loss]

    def make_step(model, schedule, generator, head):
        if args.loss in MIXUP_LOSSES:
            from defenses.mixup_inference import make_mixup_step
            return make_mixup_step(model, args.loss, dataset_info(args.dataset).num_classes, schedule, generator,
                                   args.mixup_alpha, args.iat_adv_ratio)
        return make_adversarial_step(model, objective, schedule, args.beta, generator, bn_stats=args.bn_stats, head=head)

    train_target_model(args, argv, Path(__file__).name, STAGE, objective, make_step)
    return 0


if __name__ == "__main__":
    run_main(main)
