"""Stage 2 (docs/method.md section 5): train the natural-MI and adversarial-MI estimators against a frozen target.

Shared by train_MI_estimator.py (Eq. 5, bounded or literal, or the published code's objective) and
train_MI_estimator_only_max.py (Eq. 4); the scripts differ only in their objective and defaults.
"""
import json
import math
from pathlib import Path

import numpy
import torch
from tqdm import tqdm

from models.estimators import build_estimators
from defenses import head_for
from utils.attacks import PGDConfig, pgd_attack
from utils import distributed
from utils.checkpoint import atomic_write_json, checkpoint_in, file_sha256, load_checkpoint, load_state_dict_checked
from utils.cli import (add_data_args, add_runtime_args, add_threat_model_args, positive_int, positive_number,
                       resolve_dataset_defaults)
from utils.data import make_loader
from utils.errors import UserError
from utils.mi import (MI_MEASURES, QUANTITIES, QUANTITY_LABELS, derangement, full_precision, local_encodings, masked_mean,
                      mi_quantities, select_misled)
from utils.plots import plot_mi_distributions
from utils.run_warnings import RunWarnings
from utils.runtime import attack_generator, autocast, seed_everything
from utils.training import (RunDirectory, TrainingRun, freeze, load_model, load_splits_rank_zero_first, seed_process,
                            splits_from_args, train_epoch)

STAGE = "estimators"
ESTIMATOR_FILE = "estimators.pt"
MI_VALUES_FILE = "mi_values.npz"
SELECT_KEY = "val_mi_selection"  # maximised_estimates(): what estimators.pt is chosen on
REPORT_FILE = "mi_report.json"

# The informativeness check (docs/method.md section 5). Each estimator is judged on its own pairs over the
# samples it is meant for: E_n on (x, h(x)) over all held-out samples, E_a on (n, h(x~)) over those whose
# adversarial fools the target. Its mean estimate must exceed both references, the constant critic's 0
# and the same estimator on pairs shuffled across the batch, by SE_MARGIN standard errors and by at least
# MIN_GAIN_NATS: 3 standard errors make a chance pass rare (0.13 % one-sided, normal approximation); the
# floor keeps a gain too small to matter from passing on thousands of samples, whose standard error is a
# few thousandths of a nat.
SE_MARGIN = 3.0
MIN_GAIN_NATS = 0.05
JUDGED = {"natural": ("E_n", "nat_mi_clean", None, "all held-out samples"),
          "adversarial": ("E_a", "adv_mi_adv", "fooled", "held-out samples whose adversarial fools the target")}
SHUFFLED = tuple(quantity for _, quantity, _, _ in JUDGED.values())


def add_estimator_args(parser, default_epochs: int, model_dir_hint: str):
    """Every stage-2 option except the objective: estimators, optimiser, data, threat model, runtime."""
    group = parser.add_argument_group("MI estimators (published code: Adam, lr 1e-2, divided by 10 at 40% and 80%)")
    group.add_argument("--target-model", required=True,
                       help="stage-1 checkpoint (best.pt), or its run folder, of the frozen target")
    group.add_argument("--hsize", type=positive_int, default=None,
                       help="feature size of the local/global encodings (default 2048, the paper's; 256 on MNIST-like data)")
    group.add_argument("--mi-measure", choices=MI_MEASURES, default="dv", help="Donsker-Varadhan, Jensen-Shannon or InfoNCE")
    group.add_argument("--epochs", type=positive_int, default=default_epochs)
    group.add_argument("--batch-size", type=positive_int, default=None, help="default: the dataset's (1024 colour, 128 MNIST-like)")
    group.add_argument("--lr", type=positive_number, default=1e-2,
                       help="the MNIST-like presets use 1e-3 with no milestone: informative estimators where this "
                            "schedule stalled them (docs/method.md section 9)")
    group.add_argument("--milestones", type=positive_int, nargs="*", default=None,
                       help="epochs where the lr is divided by 10 (default: 40%% and 80%% of --epochs; the flag "
                            "alone: a constant lr)")
    group.add_argument("--lr-gamma", type=positive_number, default=0.1)
    group.add_argument("--report-only", action="store_true",
                       help="no training: rewrite mi_report.json and the plot from --model-dir's estimators.pt")
    add_data_args(parser, dataset_from="the target's")
    add_threat_model_args(parser, "threat model of the attack on the target (default: the target's)")
    add_runtime_args(parser, model_dir_hint)


def resolve_against_target(args, target_checkpoint: dict):
    """Dataset and threat model default to the target's; a different dataset is an error."""
    spec, config = target_checkpoint["model_spec"], target_checkpoint.get("config", {})
    if args.dataset is None:
        args.dataset = spec["dataset"]
    elif args.dataset != spec["dataset"]:
        raise UserError(f"--dataset {args.dataset} does not match the target model, trained on {spec['dataset']}")
    if args.norm is None:
        args.norm = config.get("norm", "linf")
    if args.epsilon is None and config.get("norm") == args.norm:
        args.epsilon = config.get("epsilon")
    if args.num_steps is None:
        args.num_steps = config.get("num_steps")
    if args.milestones is None:
        args.milestones = sorted({max(1, round(0.4 * args.epochs)), max(1, round(0.8 * args.epochs))})
    resolve_dataset_defaults(args)
    return args


def load_frozen_target(path, device):
    """The stage-1 target in eval mode with every parameter frozen; a non-target checkpoint is an error."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("stage") not in ("standard", "namid") or "model_spec" not in checkpoint:
        raise UserError(f"--target-model {path} is a {checkpoint.get('stage')} checkpoint, not a trained target model "
                        f"(pass the best.pt of train_standard.py)")
    model, _ = load_model(path, device)
    return freeze(model), checkpoint


def estimator_spec(args, info) -> dict:
    return {"kind": "mi-estimators", "dataset": info.name, "in_channels": info.in_channels,
            "num_classes": info.num_classes, "image_size": info.image_size, "hsize": args.hsize,
            "measure": args.mi_measure}


def load_estimators(path, device):
    """Frozen estimators from an estimators.pt, with its checkpoint dict (for the metadata)."""
    checkpoint = load_checkpoint(path)
    if checkpoint.get("stage") != STAGE or "estimators" not in checkpoint:
        raise UserError(f"{path} is not an estimators.pt of train_MI_estimator*.py")
    spec = checkpoint["estimator_spec"]
    estimators = build_estimators(spec["in_channels"], spec["num_classes"], spec["hsize"])
    load_state_dict_checked(estimators, checkpoint["estimators"], path, what="estimator pair")
    return freeze(estimators.to(device)), checkpoint


def read_informativeness(estimators_path):
    """The informativeness section of the mi_report.json next to an estimators.pt, or None if there is none
    (no report, or one written before the check existed)."""
    report = Path(estimators_path).parent / REPORT_FILE
    try:
        verdicts = json.loads(report.read_text()).get("informativeness")
    except (OSError, ValueError, AttributeError):
        return None
    return verdicts if isinstance(verdicts, dict) else None


def uninformative_reason(estimators_path, needed=tuple(JUDGED)):
    """Why the estimators at this path must not steer a training, or None when each of `needed` is informative."""
    verdicts = read_informativeness(estimators_path)
    folder = Path(estimators_path).parent
    if verdicts is None:
        return (f"{folder / REPORT_FILE} holds no informativeness verdict (rewrite it with the stage-2 script's "
                f"--report-only --model-dir {folder} --target-model ...)")
    if not all(isinstance(verdicts.get(name), dict) and "verdict" in verdicts[name] for name in JUDGED):
        return f"{folder / REPORT_FILE} has an unreadable informativeness section (rewrite it with --report-only)"
    if all(verdicts[name]["verdict"] == "informative" for name in needed):
        return None
    return f"{folder / REPORT_FILE}: {verdict_line(verdicts)}"


def adversarial_batch(target, x, y, attack, generator):
    """x~ from the frozen target, and its logits for x and x~ from one no-grad forward."""
    x_adv = pgd_attack(target, x, y, attack, generator)
    with torch.no_grad():
        logits_nat, logits_adv = target(torch.cat([x, x_adv])).chunk(2)
    return x_adv, logits_nat, logits_adv


def make_estimator_step(estimators, target, objective, attack, generator, measure):
    """One stage-2 step. The estimators train in train mode; the global head sees h(x) and h(x~) in one
    pass (utils.mi.global_encodings), so its BatchNorm statistics are those of both batches together."""
    def step(x, y, index):
        x_adv, logits_nat, logits_adv = adversarial_batch(target, x, y, attack, generator)
        estimators.train()
        local_nat, local_adv = local_encodings(estimators, x, x_adv)
        with full_precision(local_nat):
            q = mi_quantities(estimators, local_nat, local_adv, logits_nat, logits_adv, measure)
            loss = objective(q, logits_nat.float(), logits_adv.float(), y)
        selected = select_misled(logits_nat, logits_adv, y).float().mean()
        return loss, logits_nat, logits_adv, {"train_selected": selected}
    return step


@torch.no_grad()
def collect_mi(estimators, target, loader, attack, objective, device, seed, measure, amp=False, desc="held-out"):
    """Per-sample quantities over a loader, with the selection masks, the judged quantities on shuffled
    pairs (`<quantity>_shuffled`: sample i's local encoding replaced by another sample's of the batch) and
    the batch-weighted objective."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + 7907 * distributed.rank())
    shuffler = torch.Generator().manual_seed(seed)  # its own stream: the attack's stays that of the training
    estimators.eval()
    parts = {name: [] for name in (*QUANTITIES, *(f"{q}_shuffled" for q in SHUFFLED), "selected", "correct", "fooled")}
    objective_sum, count = 0.0, 0
    for x, y in tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main()):
        x, y = x.to(device), y.to(device)
        with autocast(device, amp):
            x_adv, logits_nat, logits_adv = adversarial_batch(target, x, y, attack, generator)
            local_nat, local_adv = local_encodings(estimators, x, x_adv)
            q = mi_quantities(estimators, local_nat, local_adv, logits_nat, logits_adv, measure)
            pairing = derangement(len(y), shuffler).to(device)
            shuffled = mi_quantities(estimators, local_nat[pairing], local_adv[pairing], logits_nat, logits_adv, measure,
                                     which=SHUFFLED)
        objective_sum += float(objective(q, logits_nat.float(), logits_adv.float(), y)) * len(y)
        for name in SHUFFLED:
            parts[f"{name}_shuffled"].append(shuffled[name].float().cpu())
        count += len(y)
        for name in QUANTITIES:
            parts[name].append(q[name].float().cpu())
        parts["selected"].append(select_misled(logits_nat, logits_adv, y).cpu())
        parts["correct"].append((logits_nat.argmax(1) == y).cpu())
        parts["fooled"].append((logits_adv.argmax(1) != y).cpu())
    values = {name: distributed.interleave_shards(torch.cat(chunks)) for name, chunks in parts.items()}
    totals = distributed.sum_across_processes({"objective": objective_sum, "count": count}, device)
    values["objective"] = totals["objective"] / max(totals["count"], 1)
    return values


def maximised_estimates(values) -> dict:
    """The held-out means of what each estimator is trained to maximise, on the samples it is meant for:
    I_N(x; h(x)) over the correctly classified natural samples, I_A(n; h(x~)) over those whose adversarial
    fools the target (NaN where there are none), and their mean over the estimators that have samples:
    the criterion that selects estimators.pt (README, stage 2).

    Unlike the objective (for Eq. 5 a difference of two unbounded lower bounds, which kept "improving"
    while held-out I_N fell from -783 to -2095), it rises only when the estimators tell real pairs from
    shuffled ones better; a constant critic scores 0 (DV, diagonal excluded)."""
    natural = values["nat_mi_clean"][values["correct"]]
    adversarial = values["adv_mi_adv"][values["fooled"]]
    means = [float(v.mean()) if v.numel() else float("nan") for v in (natural, adversarial)]
    present = [m for m, v in zip(means, (natural, adversarial)) if v.numel()]
    return {"nat_mi_correct": means[0], "adv_mi_fooled": means[1],
            "mi_selection": sum(present) / len(present) if present else float("nan")}


def _mean_and_se(tensor):
    return float(tensor.mean()), float(tensor.std() / math.sqrt(tensor.numel()))


def judge_estimator(real, shuffled) -> dict:
    """The verdict on one estimator from its per-sample estimates on real and on shuffled pairs (nats)."""
    n = real.numel()
    if n < 2:
        return {"n": n, "verdict": "not informative", "reason": f"{n} sample(s) to judge it on"}
    mean, se = _mean_and_se(real)
    shuffled_mean, shuffled_se = _mean_and_se(shuffled)
    gain, gain_se = _mean_and_se(real - shuffled)  # paired: the same samples, the same batches
    margin_constant, margin_shuffled = max(SE_MARGIN * se, MIN_GAIN_NATS), max(SE_MARGIN * gain_se, MIN_GAIN_NATS)
    verdict = {"n": n, "mean": mean, "se": se, "constant_critic": 0.0, "shuffled_mean": shuffled_mean,
               "shuffled_se": shuffled_se, "gain_over_shuffled": gain, "gain_se": gain_se,
               "margin_over_constant": margin_constant, "margin_over_shuffled": margin_shuffled,
               "verdict": "not informative"}
    if not (math.isfinite(mean) and mean >= margin_constant):
        verdict["reason"] = f"{mean:.3g} is not above the constant critic's 0 by {margin_constant:.3g}"
    elif not (math.isfinite(gain) and gain >= margin_shuffled):
        verdict["reason"] = f"it beats shuffled pairs by {gain:.3g}, not by {margin_shuffled:.3g}"
    else:
        verdict["verdict"] = "informative"
    return verdict


def informativeness(values) -> dict:
    """Each estimator's verdict (judge_estimator) on the samples it is meant for (JUDGED), and the rule."""
    report = {}
    for name, (label, quantity, subset, samples) in JUDGED.items():
        mask = values[subset] if subset else torch.ones_like(values[quantity], dtype=torch.bool)
        report[name] = {"estimator": label, "quantity": QUANTITY_LABELS[quantity], "samples": samples,
                        **judge_estimator(values[quantity][mask], values[f"{quantity}_shuffled"][mask])}
    report["informative"] = all(report[name]["verdict"] == "informative" for name in JUDGED)
    report["rule"] = (f"mean estimate above the constant critic's 0 and above the same estimator on shuffled pairs, "
                      f"each by at least {SE_MARGIN:g} standard errors and {MIN_GAIN_NATS:g} nats")
    return report


def verdict_line(report) -> str:
    """'E_n 1.58 ± 0.02 nats (shuffled -0.31): informative; E_a ...' for the console and the warnings."""
    parts = []
    for name in JUDGED:
        r = report[name]
        if "mean" not in r:
            parts.append(f"{r['estimator']}: {r['verdict']} ({r['reason']})")
        else:
            parts.append(f"{r['estimator']} {r['mean']:.3f} ± {r['se']:.3f} nats on {r['n']} samples (shuffled pairs "
                         f"{r['shuffled_mean']:.3f}): {r['verdict']}")
    return "; ".join(parts)


def held_out_row(values, verdicts, prefix="val") -> dict:
    """The selection criterion and its parts, the informativeness verdicts (informativeness(values)), the
    four MI means over all held-out samples and over the selected set X', its size and the objective."""
    row = {f"{prefix}_{key}": value for key, value in maximised_estimates(values).items()}
    for name in JUDGED:
        r, short = verdicts[name], JUDGED[name][0].replace("_", "")
        row.update({f"{prefix}_{short}_{key}": r.get(key, float("nan")) for key in ("mean", "se", "shuffled_mean")})
        row[f"{prefix}_{short}_informative"] = int(r["verdict"] == "informative")
    row.update({f"{prefix}_objective": values["objective"],
                f"{prefix}_selected": float(values["selected"].float().mean())})  # a fraction, as train_selected
    selected = values["selected"].float()
    for name in QUANTITIES:
        row[f"{prefix}_{name}"] = float(values[name].mean())
        row[f"{prefix}_sel_{name}"] = float(masked_mean(values[name], selected))
    return row


def _stats(tensor) -> dict:
    if tensor.numel() == 0:
        return {"n": 0}
    return {"n": tensor.numel(), "mean": float(tensor.mean()), "std": float(tensor.std()) if tensor.numel() > 1 else 0.0,
            "median": float(tensor.median())}


def mi_report(values) -> dict:
    """Summary statistics and the paper's Fig. 2/4 observation, tested on the selected set X'."""
    selected = values["selected"]
    report = {"quantities": QUANTITY_LABELS, "all": {}, "selected": {}}
    for name in QUANTITIES:
        report["all"][name] = _stats(values[name])
        report["selected"][name] = _stats(values[name][selected])
    n_sel = int(selected.sum())
    if n_sel == 0:
        report["observation"] = "no held-out sample is correctly classified and fooled by the attack: nothing to compare"
        return report
    adv_higher = (values["adv_mi_adv"][selected] > values["adv_mi_clean"][selected]).float().mean().item()
    nat_lower = (values["nat_mi_adv"][selected] < values["nat_mi_clean"][selected]).float().mean().item()
    s = report["selected"]
    in_means = s["adv_mi_adv"]["mean"] > s["adv_mi_clean"]["mean"] and s["nat_mi_adv"]["mean"] < s["nat_mi_clean"]["mean"]
    per_sample = adv_higher > 0.5 and nat_lower > 0.5
    verdict = ("holds, in the means and for most samples" if in_means and per_sample else
               "holds in the means only: not for most samples" if in_means else "does NOT hold")
    report["adversarial_mi_higher_for_adversarial"] = adv_higher
    report["natural_mi_lower_for_adversarial"] = nat_lower
    report["observation_holds"] = in_means and per_sample
    report["observation_holds_in_means"] = in_means
    report["observation"] = (
        f"On the {n_sel} held-out samples that are correct when natural and fooled when attacked, the adversarial MI "
        f"I_A(n; h(x~)) averages {s['adv_mi_adv']['mean']:.4f} against I_A(n; h(x)) {s['adv_mi_clean']['mean']:.4f} "
        f"(higher for the adversarial in {adv_higher:.1%} of samples), and the natural MI I_N(x; h(x~)) averages "
        f"{s['nat_mi_adv']['mean']:.4f} against I_N(x; h(x)) {s['nat_mi_clean']['mean']:.4f} (lower for the adversarial "
        f"in {nat_lower:.1%}): the paper's observation {verdict}.")
    return report


def mi_values_numpy(values) -> dict:
    return {name: values[name].numpy() for name in (*QUANTITIES, *(f"{q}_shuffled" for q in SHUFFLED), "selected",
                                                     "correct", "fooled")}


def write_mi_report(args, splits, target, estimators_path, best_epoch, objective, objective_name, attack, device,
                    warnings):
    """mi_report.json and mi_distributions.png from the selected estimators on the test split; a warning
    when the paper's observation does not hold there."""
    best, _ = load_estimators(estimators_path, device)
    test_loader = make_loader(splits.test, evaluation_batch(args), shuffle=False, workers=args.workers, seed=args.seed,
                              device=device, **shard())
    values = collect_mi(best, target, test_loader, attack, objective, device, args.seed, args.mi_measure, args.amp, "test")
    if not distributed.is_main():
        return
    report = {"split": "test", "samples": len(splits.test), "estimators": str(estimators_path), "best_epoch": best_epoch,
              "selected_on": SELECT_KEY, "objective": objective_name, "measure": args.mi_measure, "attack": vars(attack),
              "maximised_estimates": maximised_estimates(values), "informativeness": informativeness(values),
              **mi_report(values)}
    folder = Path(estimators_path).parent
    atomic_write_json(folder / REPORT_FILE, report)
    arrays = mi_values_numpy(values)
    numpy.savez_compressed(folder / MI_VALUES_FILE, **arrays)  # per-sample values, for reproduce.py's figure
    plot_mi_distributions({objective_name: arrays}, folder / "mi_distributions.png",
                          f"{objective_name} estimators, {args.dataset} test set, {attack.norm} eps {attack.epsilon:.4g}")
    tqdm.write(f"test set: {verdict_line(report['informativeness'])}")
    if not report["informativeness"]["informative"]:
        warnings.warn(f"test set: the estimators are not informative, and train_MIAT.py will refuse them: "
                      f"{verdict_line(report['informativeness'])} ({REPORT_FILE})")
    tqdm.write(report["observation"])
    if not report.get("observation_holds_in_means"):
        if "adversarial_mi_higher_for_adversarial" in report:
            warnings.warn(f"test set: the paper's Fig. 2/4 observation does not hold (on X', adversarial MI higher for "
                          f"the adversarial in {report['adversarial_mi_higher_for_adversarial']:.1%} of samples, natural "
                          f"MI lower in {report['natural_mi_lower_for_adversarial']:.1%}; mi_report.json)")
        else:
            warnings.warn(f"test set: {report['observation']}")


def report_only(args, target, objective, objective_name, device):
    """--report-only: re-analyse the estimators.pt of an existing run folder, training nothing."""
    path = Path(args.model_dir) / ESTIMATOR_FILE
    _, checkpoint = load_estimators(path, device)
    if checkpoint.get("target_sha256") != args.target_sha256:
        raise UserError(f"{path} was trained against another target than --target-model {args.target_model}")
    if checkpoint.get("objective") != objective_name:
        raise UserError(f"{path} was trained with the {checkpoint.get('objective')} objective, not {objective_name}")
    for key in ("hsize", "mi_measure"):
        setattr(args, key, checkpoint["config"][key])
    splits = splits_from_args(args)
    attack = PGDConfig(**checkpoint["attack"])
    warnings = RunWarnings()
    warnings.keep_in(args.model_dir)
    write_mi_report(args, splits, target, path, checkpoint["epoch"], objective, objective_name, attack, device, warnings)
    return 0


def shard() -> dict:
    """This process's share of a loader under torchrun (make_loader's rank and world_size)."""
    return dict(rank=distributed.rank(), world_size=distributed.world_size())


def evaluation_batch(args) -> int:
    return max(1, args.eval_batch_size // distributed.world_size())


def train_estimators(args, argv, script: str, objective, objective_name: str):
    """The whole of stage 2 for one objective(q, logits_nat, logits_adv, y) -> loss. Under torchrun,
    --batch-size is the global batch: each process attacks and scores its shard, the estimators'
    gradients are averaged over the processes, and the held-out values are gathered before judging."""
    if args.report_only:
        distributed.refuse_torchrun(f"{script} --report-only")
    try:
        return _train_estimators(args, argv, script, objective, objective_name)
    finally:
        distributed.cleanup()


def _train_estimators(args, argv, script, objective, objective_name):
    args.target_model = checkpoint_in(args.target_model, "best.pt", script)
    device = distributed.setup(args.device)
    target, target_checkpoint = load_frozen_target(args.target_model, device)
    resolve_against_target(args, target_checkpoint)
    if args.model_dir is None:
        args.model_dir = f"checkpoints/{STAGE}_{objective_name}_{args.dataset}_{args.mi_measure}_seed{args.seed}"
    # Stored among the arguments so that --resume refuses another objective or a changed target file.
    args.objective, args.target_sha256 = objective_name, file_sha256(args.target_model)
    if args.report_only:
        return report_only(args, target, objective, objective_name, device)
    if args.val_size == 0:
        raise UserError("stage 2 reports the MI on held-out data every epoch: --val-size must be > 0")
    batch_size = distributed.per_process_batch(args.batch_size)
    run_dir = RunDirectory(args.model_dir, resume=args.resume, best_name=ESTIMATOR_FILE)
    with run_dir.removed_if_setup_fails():
        warnings = RunWarnings()
        if distributed.is_main():
            warnings.keep_in(run_dir.path)
        seed_everything(args.seed)
        splits = load_splits_rank_zero_first(args)
        spec = estimator_spec(args, splits.info)
        estimators = build_estimators(spec["in_channels"], spec["num_classes"], spec["hsize"]).to(device)
        distributed.broadcast_from_main(estimators)
        optimizer = torch.optim.Adam(estimators.parameters(), lr=args.lr)
        distributed.average_gradients_before_each_step(optimizer)
        generator = attack_generator(args.seed, device)
        if not distributed.is_main():
            seed_process(args.seed, 0, generator)
        # The target's own training attack loss: the CW margin for an MMC target, whose cross-entropy is saturated.
        attack = PGDConfig(args.norm, args.epsilon, args.step_size, args.num_steps,
                           loss=head_for(target_checkpoint["model_spec"]).attack_loss)
        metadata = {"objective": objective_name, "target_spec": target_checkpoint["model_spec"],
                    "target_checkpoint": str(Path(args.target_model).resolve()), "target_sha256": args.target_sha256,
                    "attack": vars(attack)}
        run = TrainingRun(run_dir, args, STAGE, estimators, optimizer, generator, model_spec=spec,
                          select_key=SELECT_KEY, select_mode="max", model_key="estimators",
                          spec_key="estimator_spec", metadata=metadata)
        if not args.resume and distributed.is_main():
            run_dir.write_config(args, STAGE, script, argv, {**metadata, "estimator_spec": spec,
                                                             "processes": distributed.world_size()})

    def run_epoch(epoch):
        loader = make_loader(splits.train, batch_size, shuffle=True, workers=args.workers, seed=args.seed,
                             epoch=epoch, device=device, **shard())
        step = make_estimator_step(estimators, target, objective, attack, generator, args.mi_measure)
        row = train_epoch(target, loader, optimizer, step, device, epoch, run_dir, amp=args.amp)
        distributed.check_in_sync(estimators, "MI estimators", device)
        distributed.broadcast_from_main(estimators)  # one set of BatchNorm statistics, rank 0's, as saved
        val_loader = make_loader(splits.val, evaluation_batch(args), shuffle=False, workers=args.workers,
                                 seed=args.seed, device=device, **shard())
        # One attack seed for every epoch: epochs are compared on the estimators, not on attack noise.
        values = collect_mi(estimators, target, val_loader, attack, objective, device, args.seed, args.mi_measure,
                            args.amp, desc="val")
        verdicts = informativeness(values)
        row = {**row, **held_out_row(values, verdicts)}
        if distributed.is_main():
            tqdm.write(f"epoch {epoch + 1} held-out: {verdict_line(verdicts)}")
        return row

    run.fit(run_epoch)
    if run.best is None:
        raise UserError(f"no epoch gave a finite held-out {SELECT_KEY} (the estimates diverged), so "
                        f"{run_dir.best} was not written; {run_dir.last} holds the last epoch")
    write_mi_report(args, splits, target, run_dir.best, run.best["epoch"], objective, objective_name, attack, device,
                    warnings)
    if file_sha256(args.target_model) != args.target_sha256:
        raise UserError(f"the target checkpoint {args.target_model} changed during the run")  # never expected
    return 0
