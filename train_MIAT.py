#!/usr/bin/env python3
"""Stage 3: train a fresh target model with NAMID (paper Eq. 9), its TRADES/MART variants, or the WMIM baseline.

    L_all = L_base + alpha * L_mi,  L_mi = Lcos(I_N(x'; h(x~')), I_N(x'; h(x'))) + Lcos(I_A(n'; h(x~')), I_A(n'; h(x')))
                                          + lambda * mean_X' [I_A(n'; h(x~')) - I_N(x'; h(x~'))]

with frozen estimators from stage 2 (train_MI_estimator.py). Example:
    python train_MIAT.py --estimators checkpoints/estimators_paper_fashion-mnist_dv_seed0/estimators.pt
"""
import sys
from pathlib import Path

from utils.cli import (ArgumentParser, add_attack_args, add_data_args, add_model_args, add_optimizer_args,
                       add_runtime_args, nonnegative_number, positive_int, resolve_dataset_defaults)
from utils.data import dataset_info
from utils.errors import UserError, run_main
from utils import distributed
from utils.checkpoint import checkpoint_in, file_sha256
from utils.estimator_training import load_estimators, read_informativeness, uninformative_reason
from utils.losses import BASE_LOSSES, OBJECTIVES, check_head_supports
from utils.namid import MI_MODES, make_namid_step
from utils.run_warnings import RunWarnings
from utils.training import train_target_model

STAGE = "namid"
# Flags left unset take the preset's value, then the dataset's default (utils/cli.py).
PRESETS = {
    "paper": dict(lam=0.1),  # docs/method.md section 2: ResNet-18, batch 1024, PGD-10 step eps/4, alpha 5, lambda 0.1
    # The published code's settings (docs/method.md sections 2 and 8), for comparing with its numbers.
    "reference": dict(arch="wrn-34-10", batch_size=256, num_steps=40, lam=0.0, warmup_epochs=2, bn_stats="mixed"),
}


def build_parser():
    parser = ArgumentParser(description="Stage 3: NAMID training of a fresh target model with frozen MI estimators.")
    group = parser.add_argument_group("NAMID (paper: alpha 5, lambda 0.1)")
    group.add_argument("--estimators", required=True,
                       help="stage-2 estimators.pt, or the run folder holding it (train_MI_estimator*.py)")
    group.add_argument("--base-loss", choices=BASE_LOSSES, default="at",
                       help="at: NAMID; trades: NAMID-T; mart: NAMID-M")
    group.add_argument("--beta", type=nonnegative_number, default=6.0, help="weight of the KL term of TRADES / MART")
    group.add_argument("--alpha", type=nonnegative_number, default=5.0, help="weight of L_mi")
    group.add_argument("--lambda", dest="lam", type=nonnegative_number, default=None,
                       help="weight of the MI-gap term (default 0.1; 0 in the reference preset)")
    group.add_argument("--alpha-warmup-epochs", type=nonnegative_number, default=0.0,
                       help="grow alpha linearly from 0 over this many adversarial epochs (per batch); 0: the paper's "
                            "constant alpha")
    group.add_argument("--min-selected", type=positive_int, default=1,
                       help="switch L_mi on in a batch only when X' holds at least this many samples (1: the paper's)")
    group.add_argument("--mi-mode", choices=MI_MODES, default="namid",
                       help="namid: L_mi above; wmim: worst-case MI maximisation baseline (use only-max estimators)")
    group.add_argument("--no-adv-mi", action="store_true", help="ablation: drop the adversarial-MI cosine term")
    group.add_argument("--no-nat-mi", action="store_true", help="ablation: drop the natural-MI cosine term")
    group.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                       help="paper: docs/method.md section 2; reference: the published code's (WRN-34-10, batch 256, "
                            "PGD-40, lambda 0, 2 warm-up epochs, --bn-stats mixed)")
    group.add_argument("--allow-uninformative-estimators", action="store_true",
                       help="train on estimators whose stage-2 report (mi_report.json) does not judge them informative; "
                            "the run then warns and says so in config.json and its results")
    group.add_argument("--allow-arch-mismatch", action="store_true",
                       help="train another architecture than the one whose logits the estimators were trained on")
    add_data_args(parser, dataset_from="the estimators'")
    add_model_args(parser)
    add_optimizer_args(parser)
    add_attack_args(parser)
    add_runtime_args(parser, "checkpoints/namid_<mi-mode>_<dataset>_<arch>_<base-loss>_<norm>_seed<seed>", fast_path=True)
    return parser


def check_estimators_fit(args, checkpoint, warnings):
    """Dataset, normalisation, architecture and threat model must match the estimators'."""
    spec, target = checkpoint["estimator_spec"], checkpoint["target_spec"]
    info = dataset_info(args.dataset)
    if spec["dataset"] != args.dataset:
        raise UserError(f"--estimators were trained on {spec['dataset']}, not --dataset {args.dataset}")
    if (spec["in_channels"], spec["num_classes"], spec["image_size"]) != (info.in_channels, info.num_classes, info.image_size):
        raise UserError(f"--estimators {args.estimators} do not match {args.dataset}'s images and classes")
    if list(target["mean"]) != list(info.mean) or list(target["std"]) != list(info.std):
        raise UserError(f"--estimators were trained on a target with another normalisation than {args.dataset}'s")
    target_head = target.get("head", "softmax")
    if target_head != args.head:
        raise UserError(f"--estimators were trained on the logits of a target with the {target_head} head, not --head "
                        f"{args.head}: estimators read one logit convention and cannot be reused for another")
    if target["arch"] != args.arch and not args.allow_arch_mismatch:
        raise UserError(f"--estimators were trained on the logits of a {target['arch']}, not a {args.arch} "
                        f"(pass --allow-arch-mismatch to do it anyway)")
    if checkpoint["attack"]["norm"] != args.norm:
        raise UserError(f"--estimators were trained under {checkpoint['attack']['norm']}, not --norm {args.norm} "
                        f"(the published code mixed them: docs/method.md section 8)")
    if args.mi_mode == "wmim" and checkpoint.get("objective") != "only-max":
        warnings.warn(f"WMIM expects only-max estimators (train_MI_estimator_only_max.py); these were trained with the "
                      f"{checkpoint.get('objective')} objective")


def check_estimators_informative(args, warnings) -> bool:
    """Estimators that measure nothing make L_mi compare noise (docs/method.md section 5): refused unless
    --allow-uninformative-estimators. WMIM reads only E_n, so only E_n is judged for it."""
    needed = ("natural",) if args.mi_mode == "wmim" else ("natural", "adversarial")
    reason = uninformative_reason(args.estimators, needed)
    if reason is None:
        return True
    if not args.allow_uninformative_estimators:
        raise UserError(f"the estimators are not judged informative, so NAMID would train on noise: {reason}; "
                        f"pass --allow-uninformative-estimators to train anyway")
    warnings.warn(f"training on estimators not judged informative (--allow-uninformative-estimators): {reason}")
    return False


def resolve_args(args, estimator_checkpoint):
    """Preset, then the estimators' dataset and threat model, then the dataset's defaults."""
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    attack = estimator_checkpoint["attack"]
    args.dataset = args.dataset or estimator_checkpoint["estimator_spec"]["dataset"]
    args.head = args.head or estimator_checkpoint["target_spec"].get("head", "softmax")
    args.norm = args.norm or attack["norm"]
    if args.epsilon is None and args.norm == attack["norm"]:
        args.epsilon = attack["epsilon"]
    resolve_dataset_defaults(args)
    check_head_supports(args.head, args.base_loss)
    if args.model_dir is None:
        ablation = "".join(f"_{flag}" for flag, on in (("no-adv-mi", args.no_adv_mi), ("no-nat-mi", args.no_nat_mi)) if on)
        head = "" if args.head == "softmax" else f"_{args.head}"
        args.model_dir = (f"checkpoints/{STAGE}_{args.mi_mode}{ablation}_{args.dataset}_{args.arch}{head}_{args.base_loss}_"
                          f"{args.norm}_seed{args.seed}")
    # Stored among the arguments so that --resume refuses changed estimators.
    args.estimators_sha256 = file_sha256(args.estimators)
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.estimators = checkpoint_in(args.estimators, "estimators.pt", Path(__file__).name)
    # On this process's own device: cuda:LOCAL_RANK under torchrun, where train_target_model puts the target.
    estimators, checkpoint = load_estimators(args.estimators, distributed.process_device(args.device))
    resolve_args(args, checkpoint)
    warnings = RunWarnings()
    check_estimators_fit(args, checkpoint, warnings)
    informative = check_estimators_informative(args, warnings)
    objective = OBJECTIVES[args.base_loss]
    measure = checkpoint["estimator_spec"]["measure"]

    def make_step(model, schedule, generator, head):
        return make_namid_step(model, estimators, objective, schedule, generator, beta=args.beta, alpha=args.alpha,
                               lam=args.lam, measure=measure, mi_mode=args.mi_mode, use_nat=not args.no_nat_mi,
                               use_adv=not args.no_adv_mi, bn_stats=args.bn_stats,
                               alpha_warmup_epochs=args.alpha_warmup_epochs, min_selected=args.min_selected, head=head)

    metadata = {"estimators_checkpoint": str(Path(args.estimators).resolve()), "estimator_spec": checkpoint["estimator_spec"],
                "estimator_objective": checkpoint.get("objective"), "estimators_informative": informative,
                "estimators_informativeness": read_informativeness(args.estimators)}
    train_target_model(args, argv, Path(__file__).name, STAGE, objective, make_step, metadata, warnings)
    return 0


if __name__ == "__main__":
    run_main(main)
