#!/usr/bin/env python3
"""The whole study from one command: every stage, every defense, every seed, then the comparison table.

For each seed, in dependency order (independent stages run side by side with --jobs):
    train_standard.py               Standard AT, TRADES, MART (and the transfer surrogate); the seed talk's
                                    SCE, MM-LDA, MMC-10, AT-MM-LDA, AT-MMC-10, the baseline ensemble,
                                    ADP_{2,0}, ADP_{2,0.5} and AT + ADP_{2,0.5}; Mixup, IAT; RCE, AT-RCE
    train_MI_estimator.py           the NAMID estimators, on the Standard AT target (for NAMID on MMC or ADP:
                                    on AT-MMC-10 or AT + ADP_{2,0.5}, trained even when not a row)
    train_MI_estimator_only_max.py  the WMIM estimators, on the same targets
    train_MIAT.py                   NAMID, NAMID-T, NAMID-M, WMIM, NAMID (MMC-10), NAMID (ADP_{2,0.5})
    test_comparison.py              every defense under the preset's attacks (once per evaluation variant
                                    of the preset, e.g. per budget), and PGD at several budgets; or the
                                    preset's own evaluation script (eval_script): test_mixup_inference.py
                                    evaluates each defense as itself and wrapped in mixup inference,
                                    test_detection.py its detectors (confidence, non-ME, K-density)
then results.md / .csv / .json (the paper's Table 1 layout, mean +- std over seeds, and the preset's published
table for orientation) and the figures. Re-running the same command skips finished stages and resumes an
interrupted one.

Defenses (--defenses): standard-at, namid, trades, namid-t, mart, namid-m, wmim (the NAMID paper's); sce, mm-lda,
mmc, at-mm-lda, at-mmc, ensemble, adp-2-0, adp, at-adp, namid-mmc, namid-adp (the seed talk's: softmax
cross-entropy, the Max-Mahalanobis heads, ADP ensembles, each alone, with adversarial training, and with NAMID);
mixup, iat (mixup training and interpolated adversarial training, for mixup inference); rce, at-rce (reverse
cross-entropy training, naturally and with adversarial training, for the RCE paper's detectors).

Presets (--preset): cifar10-paper, cifar10-reference, tiny-imagenet-paper, mnist, fashion-mnist,
fashion-mnist-cpu, demo (NAMID's study at various scales); seed-talk-fashion-mnist-cpu (the talk's MMC
comparison with ADP and NAMID on an MMC head, CPU-sized) and adp-mnist-cpu (the ADP paper's MNIST Table 2 at
CPU scale, under the authors' attack protocol and ours, at eps 0.1 and 0.15); mixup-fashion-mnist-cpu (Standard
AT, Mixup and IAT, each alone and wrapped in mixup inference OL / PL, evaluated by test_mixup_inference.py:
a table row per defense and predictor); rce-fashion-mnist-cpu and rce-mnist-cpu (CE and RCE evaluated by
test_detection.py: the RCE paper's AUC of confidence, non-ME and K-density, and accuracy with rejection).
reproduce.py --help describes each.

Examples:
    python reproduce.py --preset demo                        # about 10 minutes on 2 CPU cores
    python reproduce.py --preset cifar10-paper --jobs 2      # the paper's study (GPU)
    python reproduce.py --preset fashion-mnist --seeds 0 1 2 --set train.epochs=10 eval.test-limit=1000
    python reproduce.py --preset adp-mnist-cpu --data-dir data   # MNIST in torchvision's layout under data/
"""
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from utils.checkpoint import atomic_write_json
from utils.cli import ArgumentParser, nonnegative_int, positive_int, positive_number
from utils.errors import UserError, run_main
from utils.pipeline import (DEFENSES, ESTIMATOR_RUNS, Launch, build_plan, check_command_lines, default_jobs, execute,
                            recorded_seconds, resolve_config, resolve_launch, reuse_finished_stages,
                            task_state)
from utils.presets import PRESETS
from utils.slurm import RESULTS, require_finished_stages, run_only_stage, study_arguments, submit_study


def build_parser():
    described = " ".join(f"[{name}] {preset['description']}" for name, preset in PRESETS.items())
    parser = ArgumentParser(description="Run the whole NAMID study from a preset and print the comparison table.",
                            epilog=f"Presets: {described}")
    group = parser.add_argument_group("study")
    group.add_argument("--preset", required=True, choices=list(PRESETS))
    group.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="[SECTION.]FLAG=VALUE",
                       help="override a stage flag: SECTION is standard, estimators, only-max, namid, eval or surrogate "
                            "(or train = standard + namid, mi = both estimator stages); without SECTION, every stage "
                            "script that has FLAG. Lists are space-separated: eval.attacks='pgd aa'. Switches: true/false.")
    group.add_argument("--seeds", type=nonnegative_int, nargs="+", default=None, help="default: the preset's")
    group.add_argument("--defenses", nargs="+", default=None, metavar="DEFENSE",
                       help=f"default: the preset's; any of {', '.join(DEFENSES)} (NAMID on MMC / ADP also trains "
                            "its target, at-mmc / at-adp, and its estimators on it)")
    group.add_argument("--epsilons", type=budget_as_written, nargs="*", default=None,
                       help="L-inf budgets of the robust-accuracy-against-epsilon curve (default: the preset's; the flag "
                            "alone: no curve)")
    group.add_argument("--namid-estimators", choices=ESTIMATOR_RUNS, default=None,
                       help="the stage-2 run NAMID, NAMID-T, NAMID-M and NAMID on MMC / ADP read: "
                            "train_MI_estimator.py's (estimators) or train_MI_estimator_only_max.py's (default: the "
                            "preset's; WMIM always reads only-max)")
    group.add_argument("--curve-steps", type=positive_int, default=None,
                       help="PGD steps of that curve (default: the table's, eval.pgd-steps, so that both agree)")
    group = parser.add_argument_group("runtime")
    group.add_argument("--out", default=None, help="study folder (default checkpoints/reproduce_<preset>)")
    group.add_argument("--jobs", type=positive_int, default=None,
                       help="stages run at once (default: one per --gpus-per-stage GPUs of --devices when there are "
                            "GPUs, else the preset's; on the CPU each gets cores / jobs threads)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (with GPUs, --devices says which)")
    group.add_argument("--devices", nargs="+", default=None, metavar="ID",
                       help="the GPUs to share out: each running stage sees only its own through CUDA_VISIBLE_DEVICES "
                            "(default: every visible CUDA device when --device is auto or cuda; none on the CPU)")
    group.add_argument("--gpus-per-stage", type=positive_int, default=1, metavar="K",
                       help="run each stage under torchrun with K processes, one per GPU of its share (stage 4 shards "
                            "the test images over them); on the CPU, K gloo processes")
    group.add_argument("--data-dir", default="data", help="where datasets live, in torchvision's layout")
    group.add_argument("--tensorboard", action="store_true", help="every stage also logs to <its folder>/tensorboard")
    group.add_argument("--reuse", nargs="+", default=[], metavar="STUDY_FOLDER",
                       help="before running, copy in each stage that one of these earlier study folders finished with "
                            "the same command line (folders aside) and the same inputs, e.g. fashion-mnist-cpu's "
                            "Standard AT for mixup-fashion-mnist-cpu; the copy's reproduce_stage.json names its source")
    group.add_argument("--dry-run", action="store_true", help="print the resolved configuration and the plan; run nothing")
    group = parser.add_argument_group("cluster")
    group.add_argument("--launcher", choices=("local", "slurm"), default="local",
                       help="local: run the stages here; slurm: submit each stage as a SLURM job (after the jobs of "
                            "the stages it reads) and a final job that writes the table, then return. Needs --device "
                            "cuda (each job asks for --gres=gpu:K, K = --gpus-per-stage) or --device cpu")
    group.add_argument("--slurm-args", default="", metavar="'FLAGS'",
                       help="sbatch flags for every job, e.g. --slurm-args='--partition=gpu --account=lab "
                            "--time=24:00:00' (default: none)")
    group.add_argument("--cpus-per-stage", type=positive_int, default=None, metavar="N",
                       help="--cpus-per-task of each stage's job (default: the cluster's)")
    group.add_argument("--wait", action="store_true", help="with --launcher slurm: return when the final job has ended")
    group.add_argument("--only-stage", default=None, metavar="STAGE",
                       help="run only this stage of the plan, here (skipped when done, resumed when interrupted), or "
                            f"only write the table from the finished stages ({RESULTS}); what each SLURM job runs "
                            "(default: every stage, then the table)")
    return parser


def record_study_config(out: Path, config: dict, argv: list):
    """config.json: the study as the command that runs it (or submits it) resolved it. A table-only run
    (--only-stage results, perhaps over a subset of seeds or defenses) leaves it alone: that table's own
    configuration and command are in its results.json and results.md."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**config, "command": shlex.join(["reproduce.py", *argv])})


def previous_invocation(out: Path):
    """The invocation recorded in an earlier results.json of the study folder, if any."""
    try:
        return json.loads((out / "results.json").read_text())["invocation"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def budget_as_written(text: str) -> str:
    """A positive budget, kept as the user wrote it (2/255 names its folder curve-eps2-255)."""
    positive_number(text)
    return text.strip()


def describe_plan(tasks, launch: Launch, copies: dict) -> str:
    lines = []
    for task in tasks:
        try:
            state = f"copy of {copies[task.name]}" if task.name in copies else task_state(task)
        except UserError as error:
            state = f"conflict: {error}"
        lines.append(f"[{state}] {task.name}: {shlex.join(['python3', *launch.command(task)[1:]])}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    runner = {"seeds": args.seeds, "defenses": args.defenses, "jobs": args.jobs, "curve_steps": args.curve_steps,
              "epsilons": args.epsilons, "namid_estimators": args.namid_estimators}
    config = resolve_config(args.preset, args.overrides, runner)
    out = Path(args.out or f"checkpoints/reproduce_{args.preset}")
    # a SLURM job, and the submission, take the GPUs the scheduler gives: only a local run shares out this machine's
    shares_gpus = args.launcher == "local" and args.only_stage is None
    launch = (resolve_launch(args.device, args.devices, args.gpus_per_stage) if shares_gpus
              else Launch(per_stage=args.gpus_per_stage))
    if args.jobs is None:
        config["jobs"] = default_jobs(launch, config["jobs"])
    config["launch"] = {"devices": list(launch.devices), "gpus_per_stage": launch.per_stage}
    tasks = build_plan(config, out, args.device, args.data_dir, args.tensorboard)
    check_command_lines(tasks)
    for source in args.reuse:
        if not Path(source).is_dir():
            raise UserError(f"--reuse {source}: no such study folder")
    copies = {}  # a single stage (--only-stage, a SLURM job) copies nothing: the submission did
    if args.only_stage is None:
        copies = reuse_finished_stages(tasks, out, args.reuse, dry_run=args.dry_run)
    if not args.dry_run:
        for name, source in copies.items():
            print(f"{name}: copied from {source}", file=sys.stderr)
    if args.launcher == "slurm":
        if not args.dry_run and args.only_stage is None:
            record_study_config(out, config, argv)
        return submit_study(tasks, out, argv, args)
    if args.dry_run:
        print(json.dumps(config, indent=2))
        print(describe_plan(tasks, launch, copies))
        return 0
    if args.only_stage == RESULTS:  # the final SLURM job: the table from the finished stages, never a stage itself
        require_finished_stages(tasks)
        argv = study_arguments(argv)
    elif args.only_stage is not None:
        return run_only_stage(tasks, args.only_stage, out / "logs", args.gpus_per_stage)
    if args.only_stage is None or not (out / "config.json").exists():
        record_study_config(out, config, argv)
    started = time.perf_counter()
    try:
        ran = execute(tasks, config["jobs"], out / "logs", launch)
    except KeyboardInterrupt:
        print("reproduce.py: interrupted; run the same command again to finish the study (finished stages are "
              "skipped, the interrupted one resumes)", file=sys.stderr)
        sys.exit(130)
    invocation = {"command": shlex.join(["reproduce.py", *argv]), "seconds": round(time.perf_counter() - started, 1),
                  "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {args.device})"}
    previous = previous_invocation(out)
    if not ran and previous and previous.get("command") == invocation["command"]:
        invocation = previous  # every stage was already done: the invocation that did the work stays on record
    from utils.study import write_study  # matplotlib only once everything has run
    summary = write_study(config, tasks, out, recorded_seconds(tasks), invocation)
    print(summary["caption"])
    print(summary["table"], end="")
    if summary["paired"]:
        print("each row against its baseline, on the same test images (points; exact McNemar p):")
        print(summary["paired"])
    warnings = summary["warnings"]
    print(f"{len(warnings)} warning(s) from the stages (also in results.md):" if warnings else "no warnings from any stage")
    for warning in warnings:
        print(f"  {warning['stage']}: {warning['message']}")
    print(f"results in {out}/results.md, results.csv, results.json and the figures beside them")
    return 0


if __name__ == "__main__":
    run_main(main)
