#!/usr/bin/env python3
"""Stage 1: train a target model with Standard AT (Madry et al.), TRADES or MART.

Example (Fashion-MNIST, SmallCNN, a subset; runs on a laptop CPU):
    python train_standard.py --dataset fashion-mnist --train-limit 10000 --epochs 10
"""
import sys
from pathlib import Path

import torch

from utils.attacks import PGDConfig
from utils.cli import (ArgumentParser, add_attack_args, add_data_args, add_model_args, add_optimizer_args,
                       add_runtime_args, nonnegative_number, resolve_dataset_defaults)
from utils.data import load_splits, make_loader
from utils.errors import UserError, run_main
from utils.losses import BASE_LOSSES, OBJECTIVES
from utils.runtime import attack_generator, resolve_device, seed_everything
from utils.training import (RunDirectory, TrainingRun, evaluate, make_adversarial_step, model_from_spec,
                            model_spec_from_args, train_epoch, training_attack_schedule)

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
    add_runtime_args(parser, "checkpoints/standard_<dataset>_<arch>_<loss>_<norm>_seed<seed>")
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
    device = resolve_device(args.device)
    run_dir = RunDirectory(args.model_dir, resume=args.resume)
    seed_everything(args.seed)
    splits = load_splits(args.dataset, args.data_dir, val_size=args.val_size, train_limit=args.train_limit,
                         test_limit=args.test_limit, seed=args.seed)
    if len(splits.train) == 0:
        raise UserError("the training split is empty")

    spec = model_spec_from_args(args, splits.info)
    model = model_from_spec(spec).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    generator = attack_generator(args.seed, device)
    objective = OBJECTIVES[args.loss]
    train_attack = objective.training_attack(PGDConfig(args.norm, args.epsilon, args.step_size, args.num_steps))
    eval_attack = PGDConfig(args.norm, args.epsilon, args.eval_step_size, args.eval_steps)

    run = TrainingRun(run_dir, args, STAGE, model, optimizer, generator, model_spec=spec)
    if not args.resume:
        run_dir.write_config(args, STAGE, Path(__file__).name, argv, {"model_spec": spec, "train_attack": vars(train_attack),
                                           "eval_attack": vars(eval_attack)})

    def run_epoch(epoch):
        loader = make_loader(splits.train, args.batch_size, shuffle=True, workers=args.workers, seed=args.seed,
                             epoch=epoch, device=device)
        schedule = training_attack_schedule(train_attack, epoch, len(loader), args.warmup_epochs, args.eps_ramp_epochs)
        step = make_adversarial_step(model, objective, schedule, args.beta, generator)
        row = train_epoch(model, loader, optimizer, step, device, epoch, run_dir, amp=args.amp)
        for name, split in (("val", splits.val), ("test", splits.test)):
            loader = make_loader(split, args.eval_batch_size, shuffle=False, workers=args.workers, seed=args.seed,
                                 device=device)
            result = evaluate(model, loader, eval_attack, device, seed=args.seed + 1000 * epoch, amp=args.amp, desc=name)
            row[f"{name}_clean_acc"], row[f"{name}_pgd_acc"] = result["clean_acc"], result["pgd_acc"]
        return row

    run.fit(run_epoch)
    return 0


if __name__ == "__main__":
    run_main(main)
