"""The study runner behind reproduce.py: a preset and its overrides become the stage scripts' command
lines, run in dependency order, each stage skipped when its outputs are complete and resumed when
they are not.

Every stage writes into its own folder under the study folder:
    seed<s>/<defense>            stages 1 and 3 (best.pt, last.pt, metrics.csv, config.json)
    seed<s>/estimators, seed<s>/only-max   stage 2 on the Standard AT target
    seed<s>/only-max-<target>    stage 2 on another stage-1 target (e.g. only-max-at-mmc for NAMID on MMC)
    seed<s>/surrogate
    seed<s>/eval-<defense>       stage 4: the comparison table's row (results.json)
    seed<s>/eval-<defense>-<v>   the same under the preset's evaluation variant v (eval_variants)
    seed<s>/curve-eps<e>         stage 4: PGD at one budget for every defense
and, when it finished, a reproduce_stage.json with the exact command line and the SHA-256 of the
files it read. A stage is skipped only when that record matches what would be run now.
"""
import copy
import functools
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from utils.checkpoint import atomic_write_json, file_sha256
from utils.errors import UserError
from utils.evaluators import DEFAULT_EVAL_SCRIPT, evaluator
from utils.presets import ALL_DEFENSES, PRESETS

ROOT = Path(__file__).resolve().parent.parent
MARKER = "reproduce_stage.json"
# Stage scripts; "eval" is the default evaluation script, a preset may choose another (eval_script:
# utils/evaluators.py), whose flags its eval section then holds.
SCRIPTS = {"standard": "train_standard.py", "estimators": "train_MI_estimator.py",
           "only-max": "train_MI_estimator_only_max.py", "namid": "train_MIAT.py", "eval": DEFAULT_EVAL_SCRIPT}
# Sections a --set may name, with the stage script whose flags they take.
SECTIONS = {"standard": "standard", "estimators": "estimators", "only-max": "only-max", "namid": "namid",
            "eval": "eval", "surrogate": "standard"}
ESTIMATOR_RUNS = ("estimators", "only-max")  # the two stage-2 runs (and sections)
SECTION_GROUPS = {"train": ("standard", "namid"), "mi": ESTIMATOR_RUNS}
# Flags the runner sets itself, per run: overriding them would break the study's wiring (the head, and ADP's
# weights, are what makes a defense; stage 3's head must be its estimators' target's).
RUNNER_OWNED = {"model-dir", "model_dir", "out-dir", "target-model", "estimators", "checkpoints", "surrogate",
                "resume", "seed", "loss", "base-loss", "mi-mode", "labels", "report-only", "device", "data-dir",
                "tensorboard", "head", "adp-alpha", "adp-beta"}
# The stage-1 defense whose best.pt the NAMID paper's stage-2 estimators are trained on.
DEFAULT_TARGET = "standard-at"


@dataclass(frozen=True)
class Defense:
    label: str      # as the paper's (or the talk's) tables name it
    section: str    # standard (stage 1) or namid (stage 3)
    flags: tuple    # what makes this defense, e.g. ("--loss", "trades")
    estimators: str = None  # the stage-2 run it needs
    target: str = None      # with estimators: the stage-1 defense whose best.pt that run is trained on
    baseline: str = None    # the stage-1 defense this row modifies, compared with per example (utils/paired.py)


def _namid(label, flags, estimators="estimators", target=DEFAULT_TARGET, baseline=None):
    return Defense(label, "namid", flags, estimators, target, baseline or target)


# ADP ensembles: alpha (entropy) and beta (log diversity) written out, as the labels name them.
_ADP_2_05 = ("--head", "adp", "--adp-alpha", "2", "--adp-beta", "0.5")
DEFENSES = {
    "standard-at": Defense("Standard AT", "standard", ("--loss", "at")),
    "namid": _namid("NAMID", ("--base-loss", "at")),
    "trades": Defense("TRADES", "standard", ("--loss", "trades")),
    "namid-t": _namid("NAMID-T", ("--base-loss", "trades"), baseline="trades"),
    "mart": Defense("MART", "standard", ("--loss", "mart")),
    "namid-m": _namid("NAMID-M", ("--base-loss", "mart"), baseline="mart"),
    "wmim": _namid("WMIM", ("--mi-mode", "wmim"), "only-max"),
    # the seed talk's defenses: softmax cross-entropy and the Max-Mahalanobis heads, trained naturally or with AT
    "sce": Defense("SCE", "standard", ("--loss", "natural")),
    # (each head against the softmax row it replaces, trained the same way)
    "mm-lda": Defense("MM-LDA", "standard", ("--loss", "natural", "--head", "mm-lda"), baseline="sce"),
    "mmc": Defense("MMC-10", "standard", ("--loss", "natural", "--head", "mmc"), baseline="sce"),
    "at-mm-lda": Defense("AT-MM-LDA", "standard", ("--loss", "at", "--head", "mm-lda"), baseline="standard-at"),
    "at-mmc": Defense("AT-MMC-10", "standard", ("--loss", "at", "--head", "mmc"), baseline="standard-at"),
    # the ADP paper's ensembles: its baseline (alpha = beta = 0: the sum of the members' cross-entropies),
    # ADP_{2,0}, ADP_{2,0.5} (each against the baseline ensemble), and ADP_{2,0.5} with adversarial training
    # (against Standard AT, as in the talk's AT table)
    "ensemble": Defense("Baseline ensemble", "standard",
                        ("--loss", "natural", "--head", "adp", "--adp-alpha", "0", "--adp-beta", "0")),
    "adp-2-0": Defense("ADP_{2,0}", "standard", ("--loss", "natural", "--head", "adp", "--adp-alpha", "2",
                                                 "--adp-beta", "0"), baseline="ensemble"),
    "adp": Defense("ADP_{2,0.5}", "standard", ("--loss", "natural", *_ADP_2_05), baseline="ensemble"),
    "at-adp": Defense("AT + ADP_{2,0.5}", "standard", ("--loss", "at", *_ADP_2_05), baseline="standard-at"),
    # NAMID on those heads: the estimators are trained on the AT model with the same head, and stage 3 builds
    # that head (train_MIAT.py refuses a head other than its estimators' target's)
    "namid-mmc": _namid("NAMID (MMC-10)", ("--base-loss", "at", "--head", "mmc"), target="at-mmc"),
    "namid-adp": _namid("NAMID (ADP_{2,0.5})", ("--base-loss", "at", *_ADP_2_05), target="at-adp"),
    # the talk's mixup inference presupposes mixup-trained models: mixup, and interpolated adversarial training
    "mixup": Defense("Mixup", "standard", ("--loss", "mixup")),
    "iat": Defense("IAT", "standard", ("--loss", "iat")),
    # the talk's reverse cross-entropy (RCE, NeurIPS 2018), evaluated with its detectors by test_detection.py; its
    # cross-entropy baseline is "sce" (natural softmax training)
    "rce": Defense("RCE", "standard", ("--loss", "natural", "--head", "rce")),
    "at-rce": Defense("AT-RCE", "standard", ("--loss", "at", "--head", "rce")),
}
assert tuple(DEFENSES) == ALL_DEFENSES
assert len({spec.label for spec in DEFENSES.values()}) == len(DEFENSES)  # labels name the rows and curve series
for _name, _spec in DEFENSES.items():  # stage 3 reads estimators trained on a stage-1 defense, and only there
    assert (_spec.section == "namid") == (_spec.estimators is not None) == (_spec.target is not None), _name
    assert _spec.target is None or DEFENSES[_spec.target].section == "standard", _name
    assert _spec.estimators in (None, *ESTIMATOR_RUNS), _name
    assert _spec.baseline is None or DEFENSES[_spec.baseline].section == "standard", _name


def estimator_run_name(run: str, target: str) -> str:
    """The stage-2 run's folder (and task) name: the NAMID paper's on the Standard AT target keep their names
    (estimators, only-max), those on another target carry it (only-max-at-mmc)."""
    return run if target == DEFAULT_TARGET else f"{run}-{target}"


def estimators_for(config: dict, defense: str):
    """The stage-2 run a defense reads: the NAMID variants read config["namid_estimators"] (train_MI_estimator.py's
    run, or the only-max one; resolve_config sets it), WMIM always the only-max run."""
    wanted = DEFENSES[defense].estimators
    return config["namid_estimators"] if wanted == "estimators" else wanted


def eval_variants(config: dict) -> list:
    """(variant, eval flags) per evaluation of a defense: the eval section, then each of the preset's
    eval_variants on top of it; without eval_variants one evaluation, variant None."""
    variants = config.get("eval_variants") or {}
    if not variants:
        return [(None, config["eval"])]
    return [(name, {**config["eval"], **flags}) for name, flags in variants.items()]


def defense_eval_flags(config: dict, defense: str, flags: dict) -> dict:
    """An evaluation's flags for one defense: the variant's (eval_variants), then the preset's eval_per_defense
    entry for that defense, if any (e.g. mixup inference's lambda 0.6 for IAT)."""
    return {**flags, **(config.get("eval_per_defense") or {}).get(defense, {})}


def eval_script(config: dict) -> str:
    """The study's evaluation script (the preset's eval_script, default test_comparison.py)."""
    return config.get("eval_script") or DEFAULT_EVAL_SCRIPT


def section_script(config: dict, name: str) -> str:
    """The script whose flags a section (a key of SECTIONS) takes."""
    return eval_script(config) if SECTIONS[name] == "eval" else SCRIPTS[SECTIONS[name]]


def variant_column(variant, key: str) -> str:
    """A results column's key in the study's table: the evaluation's own, prefixed by its variant if any."""
    return key if variant is None else f"{variant}:{key}"


# ----------------------------------------------------------------------------------------------
# Configuration: preset, overrides, and the flags every stage script knows


def stage_parsers(script: str = None) -> dict:
    """Per stage (the keys of SCRIPTS), the argument parser of its script; "eval": the evaluation script's
    (default test_comparison.py)."""
    import train_MI_estimator
    import train_MI_estimator_only_max
    import train_MIAT
    import train_standard

    modules = {"standard": train_standard, "estimators": train_MI_estimator, "only-max": train_MI_estimator_only_max,
               "namid": train_MIAT, "eval": evaluator(script).module}
    return {stage: module.build_parser() for stage, module in modules.items()}


def stage_flags(parsers: dict = None) -> dict:
    """Per stage script, its option names (without --) mapped to whether they are on/off switches."""
    flags = {}
    for stage, parser in (parsers or stage_parsers()).items():
        known = {}
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--"):
                    known[option[2:]] = action.nargs == 0
        flags[stage] = known
    return flags


def parse_switch(text: str, where: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise UserError(f"{where}: expected true or false, got {text!r}")


def apply_override(config: dict, item: str, flags: dict):
    """--set SECTION.FLAG=VALUE, GROUP.FLAG=VALUE (train, mi) or FLAG=VALUE (every stage that has FLAG)."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected FLAG=VALUE or SECTION.FLAG=VALUE")
    key, value = item.split("=", 1)
    key = key.strip().lstrip("-")
    section, _, flag = key.rpartition(".")
    flag = flag.replace("_", "-")
    if flag in RUNNER_OWNED:
        raise UserError(f"--set {item!r}: the runner sets --{flag} itself (seeds: --seeds, defenses: --defenses, "
                        f"device: --device)")
    if section:
        targets = SECTION_GROUPS.get(section, (section,))
        unknown = [name for name in targets if name not in SECTIONS]
        if unknown:
            raise UserError(f"--set {item!r}: no section {section!r} (sections: "
                            f"{', '.join([*SECTIONS, *SECTION_GROUPS])})")
        missing = [name for name in targets if flag not in flags[SECTIONS[name]]]
        if missing:
            raise UserError(f"--set {item!r}: {section_script(config, missing[0])} has no --{flag}")
    else:
        targets = [name for name in SECTIONS if flag in flags[SECTIONS[name]]]
        if not targets:
            raise UserError(f"--set {item!r}: no stage script has --{flag}")
    for name in targets:
        if name == "surrogate" and config.get("surrogate") is None:
            if section != "surrogate":
                continue
            config["surrogate"] = {}
        if flags[SECTIONS[name]][flag]:
            value = parse_switch(value, f"--set {item}")
        config[name][flag] = value


def resolve_config(preset: str, overrides, runner: dict) -> dict:
    """The preset with the --set overrides and the runner's flags applied; every section's flags
    final (the preset's common flags copied into each stage script that has them)."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    config = copy.deepcopy(PRESETS[preset])
    parsers = stage_parsers(config.get("eval_script"))
    flags = stage_flags(parsers)
    eval_flags = set(flags["eval"])
    common = config.pop("common", {})
    for name, script in SECTIONS.items():
        if config.get(name) is None:
            continue
        own = {key: value for key, value in common.items() if key in flags[script]}
        config[name] = {**own, **config[name]}
    for item in overrides or ():
        apply_override(config, item, flags)
    for key, value in runner.items():
        if value is not None:
            config[key] = value
    if config.get("curve_steps") is None and evaluator(eval_script(config)).curve:
        # the table's PGD, so that the curve and the table agree at equal budgets
        config["curve_steps"] = int(config["eval"].get("pgd-steps", parsers["eval"].get_default("pgd_steps")))
    config["defenses"], config["seeds"] = list(dict.fromkeys(config["defenses"])), list(dict.fromkeys(config["seeds"]))
    unknown = [name for name in config["defenses"] if name not in DEFENSES]
    if unknown:
        raise UserError(f"--defenses: unknown defense {unknown[0]!r} (defenses: {', '.join(DEFENSES)})")
    if not config["defenses"]:
        raise UserError("--defenses: name at least one defense")
    config["namid_estimators"] = config.get("namid_estimators") or "estimators"
    if config["namid_estimators"] not in ESTIMATOR_RUNS:
        raise UserError(f"--namid-estimators: choose one of {', '.join(ESTIMATOR_RUNS)}")
    for name, flags in (config.get("eval_variants") or {}).items():
        if not name or not all(c.isalnum() or c in "._-" for c in name):
            raise UserError(f"eval_variants: {name!r} names a folder (eval-<defense>-<variant>): use letters, "
                            f"digits, '.', '_' and '-'")
        owned = sorted(set(flags) & RUNNER_OWNED)
        if owned:
            raise UserError(f"eval_variants {name!r}: the runner sets --{owned[0]} itself")
    for defense, own in (config.get("eval_per_defense") or {}).items():
        if defense not in DEFENSES:
            raise UserError(f"eval_per_defense: unknown defense {defense!r} (defenses: {', '.join(DEFENSES)})")
        unknown = sorted(set(own) - eval_flags)
        if unknown:
            raise UserError(f"eval_per_defense {defense!r}: {eval_script(config)} has no --{unknown[0]}")
        owned = sorted(set(own) & RUNNER_OWNED)
        if owned:
            raise UserError(f"eval_per_defense {defense!r}: the runner sets --{owned[0]} itself")
    if config.get("epsilons") and not evaluator(eval_script(config)).curve:
        raise UserError(f"--epsilons: the robust-accuracy-against-epsilon curve runs test_comparison.py, and this "
                        f"study evaluates with {eval_script(config)}: give --epsilons alone (no curve)")
    if "transfer" in attack_list(config) and config.get("surrogate") is None:
        raise UserError("the transfer attack needs a surrogate: add --set surrogate.arch=vgg19 "
                        "(or drop transfer from eval.attacks)")
    config["eval_script"] = eval_script(config)
    config["preset"] = preset
    config["overrides"] = list(overrides or ())
    return config


def attack_list(config) -> list:
    """Every attack of the study's evaluations (of every variant)."""
    names = []
    flag_sets = [flags for _, flags in eval_variants(config)]
    flag_sets += [defense_eval_flags(config, defense, flags) for defense in (config.get("eval_per_defense") or {})
                  for flags in list(flag_sets)]
    for flags in flag_sets:
        attacks = flags.get("attacks", [])
        names += attacks.split() if isinstance(attacks, str) else list(attacks)
    return list(dict.fromkeys(names))


def flag_tokens(section_flags: dict, switches: dict) -> list:
    """A section's flags as command-line tokens: switches bare, lists and space-separated strings spread."""
    tokens = []
    for flag, value in section_flags.items():
        if switches.get(flag):
            on = value is True or (isinstance(value, str) and parse_switch(value, f"--{flag}"))
            if on:
                tokens.append(f"--{flag}")
            elif value is not None and f"no-{flag}" in switches:  # a switch whose default depends on the device
                tokens.append(f"--no-{flag}")
        elif value is None:
            continue
        elif isinstance(value, (list, tuple)):
            tokens += [f"--{flag}", *map(str, value)]
        elif isinstance(value, str):
            tokens += [f"--{flag}", *value.split()]
        else:
            tokens += [f"--{flag}", repr(value) if isinstance(value, float) else str(value)]
    return tokens


def epsilon_name(epsilon) -> str:
    """A budget as the user wrote it, fit for a folder name: 2/255 -> 2-255, 0.1 -> 0.1."""
    return str(epsilon).strip().replace("/", "-")


# ----------------------------------------------------------------------------------------------
# The plan: one task per stage run


@dataclass
class Task:
    name: str           # e.g. seed0/namid
    kind: str           # standard, estimators, only-max, namid, eval, curve
    script: str
    argv: list
    run_dir: Path
    seed: int
    deps: list = field(default_factory=list)
    inputs: list = field(default_factory=list)   # files it reads (their SHA-256 is recorded)
    defense: str = None
    variant: str = None  # an evaluation's eval_variants entry (None: the only evaluation)

    @property
    def resumable(self) -> bool:
        return self.kind not in ("eval", "curve")

    @property
    def has_eval_journal(self) -> bool:
        """An interrupted evaluation by a script that keeps a journal (utils/eval_journal.py; test_comparison.py and
        test_detection.py per batch, test_mixup_inference.py per pass): its run folder holds it, which --resume
        continues."""
        return (self.kind in ("eval", "curve") and evaluator(Path(self.script).name).journal
                and (self.run_dir / "progress").is_dir())

    @property
    def command(self) -> list:
        return [sys.executable, str(ROOT / self.script), *self.argv]


def build_plan(config: dict, out: Path, device: str, data_dir: str, tensorboard: bool = False) -> list:
    flags = stage_flags(stage_parsers(eval_script(config)))
    tasks = []
    runtime = ["--device", device, "--data-dir", data_dir] + (["--tensorboard"] if tensorboard else [])
    # an evaluation script without --tensorboard (test_mixup_inference.py) runs without it
    eval_runtime = runtime if "tensorboard" in flags["eval"] else ["--device", device, "--data-dir", data_dir]

    def section(name, drop=(), values=None):
        if values is None:  # the surrogate: stage 1's flags, then its own
            values = {**config["standard"], **config[name]} if name == "surrogate" else config[name]
        kept = {k: v for k, v in values.items() if k not in drop}
        return flag_tokens(kept, flags[SECTIONS[name]])

    attacks = attack_list(config)
    variants = eval_variants(config)
    for seed in config["seeds"]:
        folder = out / f"seed{seed}"
        seed_flags = ["--seed", str(seed)]
        defenses = config["defenses"]
        # (stage-2 run, its stage-1 target) for every NAMID-family row; each target is trained even when not a row
        estimator_runs = sorted({(estimators_for(config, d), DEFENSES[d].target) for d in defenses
                                 if DEFENSES[d].estimators})
        targets = {target for _, target in estimator_runs}
        stage1 = [d for d in ALL_DEFENSES if DEFENSES[d].section == "standard" and (d in defenses or d in targets)]

        def add(task):
            tasks.append(task)
            return task

        for defense in stage1:
            run_dir = folder / defense
            add(Task(f"seed{seed}/{defense}", "standard", SCRIPTS["standard"],
                     section("standard") + list(DEFENSES[defense].flags) + seed_flags + ["--model-dir", str(run_dir)]
                     + runtime, run_dir, seed, defense=defense))
        for run, target in estimator_runs:
            name = estimator_run_name(run, target)
            run_dir, checkpoint = folder / name, folder / target / "best.pt"
            add(Task(f"seed{seed}/{name}", run, SCRIPTS[run],
                     section(run) + ["--target-model", str(checkpoint)] + seed_flags + ["--model-dir", str(run_dir)]
                     + runtime, run_dir, seed, deps=[f"seed{seed}/{target}"], inputs=[checkpoint]))
        surrogate = None
        if "transfer" in attacks:
            run_dir = folder / "surrogate"
            surrogate = add(Task(f"seed{seed}/surrogate", "standard", SCRIPTS["standard"],
                                 section("surrogate") + ["--loss", "at"] + seed_flags + ["--model-dir", str(run_dir)]
                                 + runtime, run_dir, seed))
        for defense in defenses:
            spec = DEFENSES[defense]
            if spec.section != "namid":
                continue
            run_dir = folder / defense
            run = estimator_run_name(estimators_for(config, defense), spec.target)
            estimators = folder / run / "estimators.pt"
            add(Task(f"seed{seed}/{defense}", "namid", SCRIPTS["namid"],
                     section("namid") + ["--estimators", str(estimators)] + list(spec.flags) + seed_flags
                     + ["--model-dir", str(run_dir)] + runtime,
                     run_dir, seed, deps=[f"seed{seed}/{run}"], inputs=[estimators], defense=defense))
        for defense in defenses:
            checkpoint = folder / defense / "best.pt"
            extra, deps, inputs = [], [f"seed{seed}/{defense}"], [checkpoint]
            if surrogate is not None:
                extra = ["--surrogate", str(surrogate.run_dir / "best.pt")]
                deps.append(surrogate.name)
                inputs.append(surrogate.run_dir / "best.pt")
            for variant, eval_flags in variants:
                name = f"eval-{defense}" + ("" if variant is None else f"-{variant}")
                run_dir = folder / name
                add(Task(f"seed{seed}/{name}", "eval", eval_script(config),
                         section("eval", values=defense_eval_flags(config, defense, eval_flags))
                         + ["--checkpoints", str(checkpoint), "--labels", DEFENSES[defense].label] + extra
                         + seed_flags + ["--out-dir", str(run_dir)] + eval_runtime,
                         run_dir, seed, deps=list(deps), inputs=list(inputs), defense=defense, variant=variant))
        checkpoints = [folder / defense / "best.pt" for defense in defenses]
        for epsilon in config.get("epsilons") or ():
            run_dir = folder / f"curve-eps{epsilon_name(epsilon)}"
            add(Task(f"seed{seed}/curve-eps{epsilon_name(epsilon)}", "curve", SCRIPTS["eval"],
                     section("eval", drop=("attacks", "pgd-steps", "pgd-step-size", "epsilon"))
                     + ["--attacks", "pgd", "--pgd-steps", str(config["curve_steps"]), "--epsilon", str(epsilon),
                        "--checkpoints", *map(str, checkpoints), "--labels", *[DEFENSES[d].label for d in defenses]]
                     + seed_flags + ["--out-dir", str(run_dir)] + runtime,
                     run_dir, seed, deps=[f"seed{seed}/{d}" for d in defenses], inputs=checkpoints))
    folders = [task.run_dir for task in tasks]
    if len(set(folders)) != len(folders):  # e.g. an eval variant named so that eval-<defense>-<variant> is another's
        clash = next(folder for folder in folders if folders.count(folder) > 1)
        raise UserError(f"two stages of the plan would share the folder {clash}: rename an eval variant")
    return tasks


def check_command_lines(tasks: list):
    """Parse every planned command line with its script's parser, so that a bad value (--set lr=fast)
    stops the study before any work, in one line."""
    parsers = stage_parsers()
    by_script = {script: parsers[stage] for stage, script in SCRIPTS.items()}
    for task in tasks:
        if task.script not in by_script:  # another evaluation script (utils/evaluators.py)
            by_script[task.script] = evaluator(task.script).module.build_parser()
        parser = by_script[task.script]

        def refuse(message, task=task):
            raise UserError(f"{task.name}: {task.script}: {message}")

        parser.error = refuse
        parser.parse_args(task.argv)


# ----------------------------------------------------------------------------------------------
# Completion records and execution


@functools.lru_cache(maxsize=None)
def _sha256_of_version(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def input_hashes(task: Task) -> dict:
    """SHA-256 of each input file; a checkpoint read by several stages (every curve point reads every
    defense's best.pt) is hashed once per version of the file."""
    return {str(path): file_version_sha256(path) for path in map(Path, task.inputs) if path.is_file()}


def file_version_sha256(path: Path) -> str:
    status = path.stat()
    return _sha256_of_version(str(path), status.st_size, status.st_mtime_ns)


def differing_flags(old: list, new: list) -> str:
    old_set, new_set = set(zip(old, old[1:] + [""])), set(zip(new, new[1:] + [""]))
    changed = sorted({a for a, _ in old_set ^ new_set if a.startswith("--")})
    return ", ".join(changed[:4]) or "argument order"


def task_state(task: Task) -> str:
    """done (skip), resume, or fresh; a finished training stage run with other settings is an error,
    because re-training over it would destroy a finished result."""
    marker = task.run_dir / MARKER
    if marker.is_file():
        record = json.loads(marker.read_text())
        same_command = record.get("argv") == task.argv
        same_inputs = record.get("inputs") == input_hashes(task)
        if same_command and same_inputs:
            return "done"
        if task.resumable:
            why = (f"other settings ({differing_flags(record.get('argv', []), task.argv)})" if not same_command
                   else "inputs that have changed since (an earlier stage was re-run)")
            raise UserError(f"{task.run_dir} holds a finished run made with {why}; pass another --out, "
                            f"or delete that folder to redo it")
        return "resume" if task.has_eval_journal else "fresh"  # an evaluation is redone (continued: --resume)
    if task.resumable and (task.run_dir / "last.pt").is_file():
        return "resume"
    return "resume" if task.has_eval_journal else "fresh"


def relocated(args: list, old: str, new: str) -> list:
    """The command line with every path under the study folder `old` moved under `new`."""
    return [new + arg[len(old):] if arg == old or arg.startswith(old + os.sep) else arg for arg in args]


def reusable_twin(task: Task, out: Path, source: Path):
    """(folder, completion record) of the finished stage of the study folder `source` that is this task run
    there: the same command line once each study's folder is set aside, and inputs with the same SHA-256 (a
    file not here yet is read from the source: in a dry run, an upstream stage that would be copied first).
    None when there is none."""
    rel = task.run_dir.relative_to(out)
    twin = source / rel
    try:
        record = json.loads((twin / MARKER).read_text())
    except (OSError, ValueError):
        return None
    argv = record.get("argv") or []
    # the source's folder as its own command lines wrote it (relative, absolute, with or without ./)
    theirs = next((arg[:-len(str(rel)) - 1] for arg in argv if arg.endswith(os.sep + str(rel))), None)
    if theirs is None or relocated(task.argv, str(out), theirs) != argv:
        return None
    hashes = {}
    for path in map(Path, task.inputs):
        readable = path if path.is_file() else Path(relocated([str(path)], str(out), str(source))[0])
        if not readable.is_file():
            return None
        hashes[relocated([str(path)], str(out), theirs)[0]] = file_version_sha256(readable)
    return (twin, record) if record.get("inputs") == hashes else None


def reuse_finished_stages(tasks: list, out: Path, sources: list, dry_run: bool = False) -> dict:
    """Copy into `out` each stage not yet started here that another study folder finished with the same
    command line and inputs (presets share stages: mixup-fashion-mnist-cpu's Standard AT is
    fashion-mnist-cpu's), so that a second study does not redo hours of training. The copy's completion
    record names its source. In plan order, so that a copied training's evaluation can be copied too.
    Returns {stage: source folder}; with dry_run, what would be copied."""
    copied = {}
    for task in tasks:
        if task.run_dir.exists() and any(task.run_dir.iterdir()):
            continue  # begun or finished here: never overwritten
        for source in map(Path, sources):
            found = reusable_twin(task, out, source)
            if found is None:
                continue
            twin, record = found
            copied[task.name] = str(twin)
            if not dry_run:
                copy_stage(task, twin, record, source / "logs", out / "logs")
            break
    return copied


def copy_stage(task: Task, twin: Path, record: dict, their_logs: Path, our_logs: Path):
    staging = task.run_dir.with_name(task.run_dir.name + ".copying")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(twin, staging)
    (staging / MARKER).unlink()
    if task.run_dir.exists():
        task.run_dir.rmdir()  # empty (reuse_finished_stages)
    os.replace(staging, task.run_dir)
    log = their_logs / (task.name.replace("/", "_") + ".log")
    if log.is_file():
        our_logs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, our_logs / log.name)
    # written last: the stage counts as done only once every file is in place
    atomic_write_json(task.run_dir / MARKER, {**record, "argv": task.argv, "inputs": input_hashes(task),
                                              "copied_from": str(twin.resolve())})


class StageFailed(UserError):
    pass


@dataclass(frozen=True)
class Launch:
    """How stages are started: the GPUs shared out among running stages (none: CUDA_VISIBLE_DEVICES is
    left as it is) and the processes per stage (torchrun when more than one)."""
    devices: tuple = ()
    per_stage: int = 1

    @property
    def device_groups(self) -> list:
        """Disjoint shares of `per_stage` devices; the devices that do not fill a share stay idle."""
        k = self.per_stage
        return [self.devices[i:i + k] for i in range(0, len(self.devices) - k + 1, k)]

    def command(self, task: Task) -> list:
        if self.per_stage == 1:
            return task.command
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                str(self.per_stage), str(ROOT / task.script), *task.argv]


def visible_cuda_devices() -> tuple:
    """The CUDA devices this process may use, as ids for CUDA_VISIBLE_DEVICES: those it lists, or 0..n-1."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return tuple(item.strip() for item in listed.split(",") if item.strip())
    import torch
    return tuple(str(index) for index in range(torch.cuda.device_count()))


def resolve_launch(device: str, devices, per_stage: int) -> Launch:
    """--devices as given; otherwise every visible CUDA device when --device is auto or cuda, none on the CPU."""
    if devices is None:
        devices = visible_cuda_devices() if device in ("auto", "cuda") else ()
    elif device.startswith("cuda:"):
        raise UserError(f"--device {device} with --devices: the runner gives each stage its own GPUs; use --device cuda")
    devices = tuple(str(item) for item in devices)
    if len(set(devices)) != len(devices):
        raise UserError(f"--devices lists a device twice: {' '.join(devices)}")
    if devices and len(devices) < per_stage:
        raise UserError(f"--gpus-per-stage {per_stage} needs at least {per_stage} devices, --devices has {len(devices)}")
    return Launch(devices, per_stage)


def default_jobs(launch: Launch, preset_jobs: int) -> int:
    """One running stage per share of GPUs; the preset's count on the CPU."""
    return len(launch.device_groups) if launch.devices else preset_jobs


def run_task(task: Task, state: str, log_dir: Path, env: dict, launch: Launch = Launch()) -> float:
    command = launch.command(task) + (["--resume"] if state == "resume" else [])
    log = log_dir / (task.name.replace("/", "_") + ".log")
    started = time.perf_counter()
    with open(log, "a") as handle:
        handle.write(f"\n$ {shlex.join(command)}\n")
        handle.flush()
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - started
    if code != 0:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        last = lines[-1].split("\r")[-1].strip() if lines else ""
        raise StageFailed(f"{task.name} failed (exit status {code}): {last} [log: {log}]")
    atomic_write_json(task.run_dir / MARKER, {"argv": task.argv, "script": task.script, "inputs": input_hashes(task),
                                              "seconds": round(seconds, 1), "resumed": state == "resume",
                                              "processes": launch.per_stage,
                                              "visible_devices": env.get("CUDA_VISIBLE_DEVICES"),
                                              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return seconds


def run_stage_here(task: Task, log_dir: Path, launch: Launch = Launch()):
    """One stage, now, in this process's environment (a cluster job's): skipped when done, resumed when
    interrupted, under torchrun with launch.per_stage processes. Seconds taken, or None when skipped."""
    log_dir.mkdir(parents=True, exist_ok=True)
    state = task_state(task)
    if state == "done":
        return None
    return run_task(task, state, log_dir, child_environment(1, launch.per_stage), launch)


def child_environment(jobs: int, processes_per_job: int = 1, devices: tuple = ()) -> dict:
    """Parallel stages share the cores: each process gets cores / (jobs x processes) threads (unless
    OMP_NUM_THREADS is set), so that they do not oversubscribe the CPU (10x slower here when they do).
    With devices, the stage sees only those GPUs."""
    env = dict(os.environ)
    env.setdefault("TQDM_MININTERVAL", "10")  # progress lines in the logs, not thousands of redraws
    processes = jobs * processes_per_job
    if processes > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    if devices:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    return env


def say(line: str):
    """Progress on stderr, beside the bar: stdout carries only the final table."""
    tqdm.write(line, file=sys.stderr)


def execute(tasks: list, jobs: int, log_dir: Path, launch: Launch = Launch()) -> dict:
    """Run every task after its dependencies, up to `jobs` at a time, each running task on its own share
    of launch.devices. After a failure nothing new is started; the running stages finish, and the first
    failure is raised. Returns seconds per task run."""
    log_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:  # conflicts surface before any work starts
        if (task.run_dir / MARKER).is_file() and all(Path(p).is_file() for p in task.inputs):
            task_state(task)
    free_groups = launch.device_groups if launch.devices else [()] * jobs
    jobs = min(jobs, len(free_groups))
    pending, done, running, seconds, failure = list(tasks), set(), {}, {}, None
    bar = tqdm(total=len(tasks), desc="stages", unit="stage", dynamic_ncols=True)

    def start(task, group):
        state = task_state(task)
        if state == "done":
            return None
        where = f" on GPU {','.join(group)}" if group else ""
        say(f"{task.name}: {'resuming' if state == 'resume' else 'running'} {task.script}{where}")
        return run_task(task, state, log_dir, child_environment(jobs, launch.per_stage, group), launch)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            if failure is None:
                for task in [t for t in pending if all(d in done for d in t.deps)]:
                    if len(running) >= jobs:
                        break
                    pending.remove(task)
                    group = free_groups.pop(0)
                    running[pool.submit(start, task, group)] = (task, group)
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task, group = running.pop(future)
                free_groups.append(group)
                try:
                    took = future.result()
                except UserError as error:
                    failure = failure or error
                    continue
                done.add(task.name)
                bar.update(1)
                if took is None:
                    say(f"{task.name}: complete, skipped")
                else:
                    seconds[task.name] = took
                    say(f"{task.name}: done in {took:.0f} s")
    bar.close()
    if failure is not None:
        raise failure
    return seconds


def recorded_seconds(tasks: list) -> dict:
    """Wall time of every finished stage, from its completion record."""
    result = {}
    for task in tasks:
        marker = task.run_dir / MARKER
        if marker.is_file():
            result[task.name] = json.loads(marker.read_text()).get("seconds")
    return result
