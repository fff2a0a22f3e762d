"""The command-line groups every stage script shares: same flag names, same parsing, same defaults."""
import argparse
import copy
import sys
from fractions import Fraction

from defenses import HEAD_NAMES
from models import ARCHITECTURES, DEFAULT_WIDTH
from utils.attacks import NORMS
from utils.checkpoint import checkpoint_in
from utils.data import DATASETS
from utils.training import BN_POLICIES

# Settings of the paper (docs/method.md section 2) for colour data; MNIST-like data trains a SmallCNN instead.
# A flag left at None on the command line takes its value from the dataset's row here.
PAPER_DEFAULTS = dict(arch="resnet18", epochs=100, batch_size=1024, lr=0.1, weight_decay=2e-4,
                      warmup_epochs=0, eps_ramp_epochs=0, hsize=2048, num_steps=10, bn_stats="base", grad_clip=0.0)
# SmallCNN adversarial training from scratch on MNIST-like data sits at chance for a long time and
# can collapse under momentum SGD at lr 0.05 (docs/method.md section 9): a clean warm-up epoch followed by
# an epsilon ramp trains reliably (measured in bench/results/, see README).
# The MI estimators of MNIST-like data are narrower (hsize 256): at the paper's 2048 an estimator
# step costs several times the PGD attack on a SmallCNN (bench/results/estimator_step.json).
MNIST_LIKE_DEFAULTS = dict(arch="small-cnn", epochs=20, batch_size=128, lr=0.05, weight_decay=2e-4,
                           warmup_epochs=1, eps_ramp_epochs=3, hsize=256, num_steps=10, bn_stats="base", grad_clip=0.0)
DATASET_DEFAULTS = {name: (MNIST_LIKE_DEFAULTS if name in ("mnist", "fashion-mnist") else PAPER_DEFAULTS)
                    for name in DATASETS}
# The seed talk's heads train with their authors' optimisers (docs/method.md section 12): MMC and MM-LDA with
# SGD at lr 0.01 (their logits scale with the centers' norm 10: at the SmallCNN's lr 0.05 both diverged within
# an epoch), ADP with Adam at lr 1e-3. They come before the dataset's defaults. MMC's gradient is clipped at 10:
# on a SmallCNN (no BatchNorm, unlike the authors' ResNets) MMC at lr 0.01 unclipped stayed at 16 % clean
# accuracy after 2 epochs on 1000 Fashion-MNIST images, and 62 % clipped.
HEAD_DEFAULTS = {"mm-lda": dict(optimizer="sgd", lr=0.01), "mmc": dict(optimizer="sgd", lr=0.01, grad_clip=10.0),
                 "adp": dict(optimizer="adam", lr=0.001), "softmax": dict(optimizer="sgd"),
                 "rce": dict(optimizer="sgd", lr=0.1)}
# RCE: its authors' SGD (momentum 0.9) at lr 0.1. The reverse cross-entropy's gradient in Z, softmax(Z) - R_y, is
# about L-1 times smaller than cross-entropy's: a SmallCNN on 1000 Fashion-MNIST images reached 49 % clean accuracy
# after 3 epochs at the MNIST-like lr 0.05, and 66 % at 0.1.


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already says its default; options
    whose default depends on other flags (None here) must say it in their help."""

    @staticmethod
    def _default_text(action):
        """The default to show, or None when the help already says it or there is none to show."""
        if (not action.option_strings or action.nargs == 0 or action.default in (None, argparse.SUPPRESS)
                or "default" in (action.help or "").lower()):
            return None
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return str(default).replace("%", "%%")

    def _get_help_string(self, action):
        default = self._default_text(action)
        return action.help if default is None else f"{action.help} (default: {default})"

    def _format_action(self, action):
        default = self._default_text(action)
        if not action.help and default is not None:  # argparse prints no help line for an option without help
            action = copy.copy(action)
            action.help = f"default: {default}"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as a single line on stderr (exit status 2) and shows every
    option's effective default in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def number(text: str) -> float:
    """A float or a fraction such as 8/255."""
    try:
        return float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (examples: 0.1, 8/255)") from None


def positive_number(text: str) -> float:
    value = number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def nonnegative_number(text: str) -> float:
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def unit_interval(text: str) -> float:
    """A number in [0, 1]."""
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def mixing_lambda(text: str) -> float:
    """A mixing weight in (0, 1] (mixup inference's lambda: 1 is the input itself)."""
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _integer(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def nonnegative_int(text: str) -> int:
    return _integer(text, 0)


def add_data_args(parser, dataset_from: str = None):
    """dataset_from: whose dataset a stage takes when --dataset is not given (stage 2: "the target's")."""
    group = parser.add_argument_group("data")
    if dataset_from:
        group.add_argument("--dataset", default=None, choices=sorted(DATASETS), help=f"default: {dataset_from}")
    else:
        group.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    group.add_argument("--data-dir", default="data", help="where datasets live, in torchvision's layout")
    group.add_argument("--val-size", type=nonnegative_int, default=1000,
                       help="validation images carved from the training set (they select checkpoints)")
    group.add_argument("--train-limit", type=positive_int, default=None,
                       help="class-balanced training subset of this size (default: the whole training set)")
    group.add_argument("--test-limit", type=positive_int, default=None,
                       help="class-balanced test subset of this size (default: the whole test set)")
    group.add_argument("--workers", type=nonnegative_int, default=0, help="DataLoader worker processes")
    return group


def add_model_args(parser):
    group = parser.add_argument_group("model")
    group.add_argument("--arch", choices=ARCHITECTURES, default=None,
                       help="default: resnet18 (paper); small-cnn on mnist / fashion-mnist")
    group.add_argument("--width", type=positive_int, default=None,
                       help="first-stage channels of the ResNets (default: the papers' 64 for resnet18/34, 16 for "
                            "resnet20/32)")
    group.add_argument("--depth", type=positive_int, default=34, help="depth of --arch wideresnet")
    group.add_argument("--widen-factor", type=positive_int, default=10, help="widen factor of --arch wideresnet")
    group.add_argument("--bn-stats", choices=BN_POLICIES, default=None,
                       help="which training batches update BatchNorm running statistics. base (default): those the "
                            "base loss trains on (AT: adversarial only; TRADES/MART: clean and adversarial), so NAMID's "
                            "extra clean forward leaves them alone; mixed: clean and adversarial in every run (the "
                            "published NAMID code; Standard AT then adds a clean forward). No effect without BN")
    group = parser.add_argument_group("classifier head (the seed talk's defenses; softmax: the usual linear layer)")
    group.add_argument("--head", choices=HEAD_NAMES, default=None,
                       help="mm-lda: logits z.mu on fixed Max-Mahalanobis centers; mmc: logits -||z-mu||^2 with the MMC "
                            "loss; adp: an ensemble of --members networks with the ADP regulariser; rce: reverse cross-entropy, "
                            "logits -Z (test_detection.py evaluates its detectors). Default: softmax "
                            "(stage 3: the head of the target the estimators were trained on)")
    group.add_argument("--feature-dim", type=positive_int, default=256,
                       help="mm-lda / mmc: dimension d of the feature z (the authors' Dense(256) after pooling)")
    group.add_argument("--mm-scale", type=positive_number, default=10.0,
                       help="mm-lda / mmc: norm C_MM of the Max-Mahalanobis centers (the authors' MMC-10)")
    group.add_argument("--members", type=positive_int, default=3, help="adp: ensemble members (the ADP paper's 3)")
    group.add_argument("--adp-alpha", type=nonnegative_number, default=2.0,
                       help="adp: weight of the ensemble entropy (ADP_{2,0.5}: 2; 0 and --adp-beta 0: the plain ensemble)")
    group.add_argument("--adp-beta", type=nonnegative_number, default=0.5,
                       help="adp: weight of the log ensemble diversity (ADP_{2,0.5}: 0.5; ADP_{2,0}: 0)")
    return group


def add_optimizer_args(parser):
    group = parser.add_argument_group("optimisation (paper: SGD, 100 epochs, lr 0.1 / 10 at 75 and 90)")
    group.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                       help="sgd: with --momentum (the paper's); adam: Adam, --momentum ignored. Default: adam for "
                            "--head adp (its authors'), sgd otherwise")
    group.add_argument("--epochs", type=positive_int, default=None, help="default 100; 20 on MNIST-like data")
    group.add_argument("--batch-size", type=positive_int, default=None, help="default 1024; 128 on MNIST-like data")
    group.add_argument("--lr", type=positive_number, default=None,
                       help="default 0.1; 0.05 on MNIST-like data; 0.01 with --head mm-lda or mmc, 0.001 with adp, 0.1 with rce")
    group.add_argument("--momentum", type=nonnegative_number, default=0.9)
    group.add_argument("--weight-decay", type=nonnegative_number, default=None, help="default 2e-4")
    group.add_argument("--milestones", type=positive_int, nargs="*", default=None,
                       help="epochs where the lr is divided by 10 (default: 75%% and 90%% of --epochs)")
    group.add_argument("--lr-gamma", type=positive_number, default=0.1)
    group.add_argument("--grad-clip", type=nonnegative_number, default=None,
                       help="clip the gradient's global L2 norm to this (0: off, the paper's setting). Default: 0; "
                            "10 with --head mmc")
    return group


def add_threat_model_args(parser, title="threat model and training attack (paper: PGD-10, step eps/4)"):
    group = parser.add_argument_group(title)
    group.add_argument("--norm", choices=NORMS, default=None, help="default linf (stage 2 and 3: the target's)")
    group.add_argument("--epsilon", type=positive_number, default=None,
                       help="budget in [0,1] pixel units, fractions accepted (default: 8/255 colour, "
                            "0.3 mnist, 0.1 fashion-mnist under linf; 0.5 colour under l2)")
    group.add_argument("--num-steps", type=positive_int, default=None, help="PGD steps of the training attack (default 10)")
    group.add_argument("--step-size", type=positive_number, default=None, help="default epsilon / 4")
    return group


def add_attack_args(parser):
    """The threat model plus stage 1's evaluation attack and curriculum (warm-up, epsilon ramp)."""
    group = add_threat_model_args(parser)
    group.add_argument("--eval-steps", type=positive_int, default=20, help="PGD steps of the validation/test attack")
    group.add_argument("--eval-step-size", type=positive_number, default=None, help="default epsilon / 4")
    group.add_argument("--eps-ramp-epochs", type=nonnegative_int, default=None,
                       help="grow the training epsilon linearly over this many epochs after the warm-up "
                            "(default 0; 3 on MNIST-like data)")
    group.add_argument("--warmup-epochs", type=nonnegative_int, default=None,
                       help="clean (non-adversarial) epochs before adversarial training (default 0; 1 on MNIST-like data)")
    return group


def add_fast_path_args(parser):
    """Stages 1 and 3: the speed options, each on, off, or (unset) the device's default (utils.runtime.
    resolve_fast_path); config.json records which were in effect ("fast_path")."""
    group = parser.add_argument_group("speed (defaults change results by float rounding at most, bf16 for --amp; "
                                      "config.json's fast_path says which were in effect)")
    switch = dict(action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--amp", **switch,
                       help="bf16 autocast of the target and the attacks; the MI estimators stay float32. CUDA only; "
                            "default: on with CUDA")
    group.add_argument("--channels-last", **switch,
                       help="the model in channels_last memory format. Default: on with CUDA, and on the CPU for "
                            "small-cnn (an AT step with PGD-10 1.2x faster on one core); off otherwise")
    group.add_argument("--device-data", **switch,
                       help="hold the data as uint8 on the training device and crop and flip it there; the batches are "
                            "the host loader's, bit for bit. Default: on unless --workers > 0 or the dataset is read "
                            "from image files (tiny-imagenet)")
    group.add_argument("--compile", **switch,
                       help="torch.compile the model and the PGD update (the first epoch pays the compilation, minutes). "
                            "Default: off")
    return group


def add_runtime_args(parser, default_model_dir_hint="checkpoints/<stage>_<dataset>_<arch>_...", fast_path=False):
    """fast_path: the speed options of add_fast_path_args (stages 1 and 3), whose --amp is on by default with
    CUDA; without, a plain --amp switch (off by default)."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--seed", type=nonnegative_int, default=0)
    group.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    group.add_argument("--model-dir", "--model_dir", dest="model_dir", default=None,
                       help=f"output folder (default {default_model_dir_hint})")
    group.add_argument("--resume", action="store_true", help="continue the run in --model-dir from its last.pt")
    if not fast_path:
        group.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (ignored elsewhere)")
    group.add_argument("--tensorboard", action="store_true", help="also log to <model-dir>/tensorboard")
    group.add_argument("--eval-batch-size", type=positive_int, default=None,
                       help="batch size of validation/test attacks (default: the training batch size)")
    if fast_path:
        add_fast_path_args(parser)
    return group


def resolve_dataset_defaults(args):
    """Fill every flag left at None from the dataset's defaults; epsilon and step sizes follow the norm."""
    from utils.data import dataset_info

    info = dataset_info(args.dataset)
    if getattr(args, "head", "") is None:
        args.head = "softmax"
    for key, value in HEAD_DEFAULTS.get(getattr(args, "head", None), {}).items():
        if getattr(args, key, None) is None and hasattr(args, key):
            setattr(args, key, value)
    for key, value in DATASET_DEFAULTS[args.dataset].items():
        if getattr(args, key, None) is None and hasattr(args, key):
            setattr(args, key, value)
    if getattr(args, "width", 0) is None:
        args.width = DEFAULT_WIDTH.get(args.arch, 64)
    if getattr(args, "norm", "") is None:
        args.norm = "linf"
    if getattr(args, "epsilon", 0) is None:
        args.epsilon = info.epsilon_linf if args.norm == "linf" else info.epsilon_l2
    for key in ("step_size", "eval_step_size"):
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, args.epsilon / 4)
    if hasattr(args, "milestones") and args.milestones is None:
        args.milestones = sorted({max(1, round(0.75 * args.epochs)), max(1, round(0.9 * args.epochs))})
    if hasattr(args, "eval_batch_size") and args.eval_batch_size is None:
        args.eval_batch_size = args.batch_size
    return args


def add_checkpoints_to_evaluate(parser, checkpoints_help: str, labels_help: str):
    """The evaluation scripts' "what to evaluate" group with --checkpoints and --labels (parse_evaluation_args
    checks them); the script adds its own flags to the group it returns."""
    group = parser.add_argument_group("what to evaluate")
    group.add_argument("--checkpoints", nargs="+", required=True, metavar="CHECKPOINT", help=checkpoints_help)
    group.add_argument("--labels", nargs="+", default=None, metavar="LABEL", help=labels_help)
    return group


def parse_evaluation_args(parser, argv, script: str):
    """The evaluation scripts' common start: parse, one --labels entry per checkpoint, and each run folder
    given to --checkpoints replaced by the best.pt it holds."""
    args = parser.parse_args(argv)
    if args.labels is not None and len(args.labels) != len(args.checkpoints):
        parser.error(f"--labels needs one label per checkpoint ({len(args.checkpoints)}), got {len(args.labels)}")
    args.checkpoints = [checkpoint_in(path, "best.pt", script) for path in args.checkpoints]
    return args
