#!/usr/bin/env python3
"""Epoch times of adversarial training, NAMID, the MI estimators and AutoAttack, plain and on the fast path.

Synthetic data shaped like CIFAR-10 (random pixels and labels: no dataset needed), served as the stage
scripts serve it (torchvision's PIL images, RandomCrop(32, 4), RandomHorizontalFlip, ToTensor), through
the project's own code: make_loader, train_epoch, make_adversarial_step, make_namid_step,
make_estimator_step, pgd_attack, prepare_model and AutoAttack's reference code. Workloads (--workloads):

  at         one Standard AT epoch: PGD-10 (8/255, step 2/255) and the training step, --images at --batch,
             on every --arch and --at-arch (ResNet-18, WRN-34-10)
  namid      one NAMID epoch (train_MIAT.py's step: alpha 5, lambda 0.1) with frozen, randomly initialised
             estimators of the dataset's width (hsize 2048 on CIFAR-10)
  estimator  one stage-2 epoch (train_MI_estimator.py's step, bounded Eq. 5) and a PGD-10 pass over the same batches
  aa         AutoAttack, version standard, on --aa-images images, labelled with the model's own predictions
             so that every image is attacked. A randomly initialised model resists the attacks (robust_acc
             says how many images survived all four); then every attack runs on every image: AutoAttack's
             worst case. Never compiled (its batch size and grad mode change with every attack)
  loader     one epoch of the training loader alone, to the device
  step       one Standard AT step of a SmallCNN on a Fashion-MNIST-shaped batch (--step-batch 128) and its
             PGD-10 attack alone, the configurations interleaved in each of --repeats rounds in one process,
             so that a shared machine's load falls on all alike; the speedups over plain are the medians
             of the per-round ratios. The CPU measurement behind --channels-last

Options, combined per configuration (--configs: comma-separated option names, or plain, default, all):

  amp            bf16 autocast of the target and the attacks; the MI estimators stay float32 (utils.mi). On
                 the CPU, where the stage scripts never autocast, the bench emulates it with CPU autocast
  channels-last  the model in channels_last memory format
  device-data    the data as a uint8 tensor on the device, cropped and flipped there (utils.data.DeviceImages)
  no-sync        the epoch loop reads its statistics back every utils.training.READBACK_BATCHES batches on
                 an accelerator (on the CPU, where a read costs nothing, every batch) instead of every batch.
                 PGD itself never reads back; on CUDA the at rows check it (pgd_reads_back, from CUDA's
                 sync debug mode)
  compile        torch.compile of the model and of the PGD update (--compile-backend)

  default = what the stage scripts use on this device (utils.runtime.resolve_fast_path); all = every option.

Each configuration prints one JSON line (device name, torch version, config, seconds, images/s); a last
line checks the issue's goals (H100) for each configuration that ran at, namid and estimator: ResNet-18
AT epoch <= 15 s, NAMID epoch <= 1.2 x AT epoch, estimator epoch <= 1.5 x the attack pass. Compilation
and cuDNN's first calls happen in a warm-up epoch over one full and one remainder batch, not timed.

On an H100 (or any CUDA GPU), one command for every workload on ResNet-18 plus the WRN-34-10 AT epoch,
each plain, with the stage scripts' defaults, and with every option (compile included):

    python bench/gpu_speed.py --out bench/results/gpu_speed_h100.json --note "H100, nothing else running"

The CPU measurement committed in bench/results/gpu_speed_cpu.json (one thread, two cores shared with other work):

    OMP_NUM_THREADS=1 python bench/gpu_speed.py --device cpu --workloads step loader --repeats 15 \\
        --configs plain channels-last compile device-data default --out bench/results/gpu_speed_cpu.json

At tiny size on the CPU (tests/test_gpu_speed.py runs every option path this way):

    python bench/gpu_speed.py --device cpu --images 24 --batch 8 --arch resnet18 --width 16 --hsize 16 --at-arch \\
        --workloads at namid estimator loader step --step-batch 8 --steps 2 --repeats 1 \\
        --compile-backend aot_eager --configs plain all default
"""
import argparse
import inspect
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from importlib import import_module
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torchvision
from common import machine_record

from models import build_model  # noqa: E402
from models.estimators import build_estimators  # noqa: E402
from utils.attacks import PGDConfig, frozen_eval, pgd_attack  # noqa: E402
from utils.cli import DATASET_DEFAULTS  # noqa: E402
from utils.data import (TRAIN_AUGMENTATION, DeviceImages, InMemoryImages, TransformedSubset, dataset_info,  # noqa: E402
                        make_loader, train_transform)
from utils.estimator_training import make_estimator_step  # noqa: E402
from utils.evaluation import Float32Logits, autoattack_module  # noqa: E402
from utils.losses import OBJECTIVES  # noqa: E402
from utils.mi import paper_objective  # noqa: E402
from utils.namid import make_namid_step  # noqa: E402
from utils.runtime import FastPath, attack_generator, resolve_device, resolve_fast_path  # noqa: E402
from utils.training import freeze, make_adversarial_step, prepare_model, readback_interval, train_epoch  # noqa: E402

WORKLOADS = ("at", "namid", "estimator", "aa", "loader", "step")
OPTIONS = ("amp", "channels-last", "device-data", "no-sync", "compile")
GOALS = {"at_epoch_s": 15.0, "namid_over_at": 1.2, "estimator_over_attack": 1.5}
NO_CHECKPOINT = SimpleNamespace(last=Path("(the bench writes no checkpoint)"))  # train_epoch names it on a NaN


@dataclass(frozen=True)
class Config:
    """A set of options, or (names None) the stage scripts' defaults, which depend on the device and architecture."""
    name: str
    names: frozenset = None

    def fast(self, arch: str, device) -> FastPath:
        if self.names is None:
            return resolve_fast_path(SimpleNamespace(arch=arch, workers=0), device, device_data_possible=True)
        return FastPath(amp="amp" in self.names, channels_last="channels-last" in self.names,
                        device_data="device-data" in self.names, compile="compile" in self.names)

    @property
    def no_sync(self) -> bool:
        return self.names is None or "no-sync" in self.names

    def options(self, arch: str, device) -> dict:
        return {**asdict(self.fast(arch, device)), "no_sync": self.no_sync}


def parse_config(text: str) -> Config:
    """plain, default (the stage scripts' options), all, or comma-separated option names."""
    if text == "default":
        return Config(text)
    names = set(OPTIONS) if text == "all" else set() if text == "plain" else set(text.split(","))
    unknown = names - set(OPTIONS)
    if unknown:
        raise SystemExit(f"gpu_speed.py: unknown option(s) {', '.join(sorted(unknown))} in --configs {text!r}; "
                         f"choose from {', '.join(OPTIONS)}, or plain, default, all")
    return Config(text, frozenset(names))


# ----------------------------------------------------------------------------------------------------------
# Synthetic data, served as the stage scripts serve the real thing


class SyntheticCIFAR10(torchvision.datasets.CIFAR10):
    """CIFAR-10 as torchvision serves it (a PIL image from a (N, 32, 32, 3) uint8 array per item), with
    random pixels and labels instead of the files."""

    def __init__(self, count: int, seed: int = 0):  # no super().__init__(): there are no files to read
        rng = np.random.default_rng(seed)
        self.data = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
        self.targets = rng.integers(0, 10, count).tolist()
        self.transform = self.target_transform = None


def synthetic_split(dataset: str, count: int, seed: int = 0) -> TransformedSubset:
    """A training split of `count` random images shaped like `dataset`, as load_splits builds its training split."""
    if dataset == "cifar10":
        base = SyntheticCIFAR10(count, seed)
    else:
        info = dataset_info(dataset)
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (count, info.in_channels, info.image_size, info.image_size), generator=generator,
                               dtype=torch.uint8)
        base = InMemoryImages(images, torch.randint(0, info.num_classes, (count,), generator=generator))
    return TransformedSubset(base, list(range(count)), train_transform(dataset))


def training_data(dataset: str, count: int, device, fast: FastPath):
    split = synthetic_split(dataset, count)
    return DeviceImages.from_split(split, device, TRAIN_AUGMENTATION.get(dataset)) if fast.device_data else split


# ----------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device) -> tuple:
    """(seconds, fn()) with the device's queue drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def in_precision(step, device, amp: bool):
    """The step under CPU bf16 autocast when amp is asked off CUDA (on CUDA train_epoch autocasts itself)."""
    if not amp or device.type == "cuda":
        return step

    def step_in_bf16(x, y, index):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return step(x, y, index)
    return step_in_bf16


def bf16(device, amp: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)


def pgd_reads_back(model, x, y, attack, device):
    """Whether a PGD attack makes the host wait for the GPU (CUDA's sync debug mode raises at each such
    read); None off CUDA, where there is no such mode."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        pgd_attack(model, x, y, attack, attack_generator(0, device))
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------------------------------------
# Workloads


class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.info = dataset_info(args.dataset)
        eps = self.info.epsilon_linf
        self.attack = PGDConfig("linf", eps, eps / 4, args.steps)
        self.hsize = args.hsize or DATASET_DEFAULTS[args.dataset]["hsize"]

    def target(self, arch: str, fast: FastPath, info=None):
        info = info or self.info
        torch.manual_seed(0)
        model = build_model(arch, info.num_classes, info.in_channels, info.image_size, info.mean, info.std,
                            width=self.args.width).to(self.device)
        return prepare_model(model, fast, self.args.compile_backend)

    def estimators(self):
        info = self.info
        return build_estimators(info.in_channels, info.num_classes, self.hsize).to(self.device)

    def epoch(self, model, optimizer, step, data, fast: FastPath, no_sync: bool) -> dict:
        """train_epoch over `data` as the stage scripts run it, with the configuration's options."""
        loader = make_loader(data, self.args.batch, shuffle=True, seed=0, epoch=0, device=self.device)
        amp = fast.amp
        return train_epoch(model, loader, optimizer, in_precision(step, self.device, amp), self.device, 0, NO_CHECKPOINT,
                           amp=amp and self.device.type == "cuda",
                           readback_every=readback_interval(self.device) if no_sync else 1)

    def warm_and_time(self, fast: FastPath, run) -> dict:
        """run(data) once over one full and one remainder batch (compilation, cuDNN's first calls), then timed
        over --images."""
        args = self.args
        warm_count = min(args.images, args.batch + args.images % args.batch)
        warmup_s, _ = timed(lambda: run(training_data(args.dataset, warm_count, self.device, fast)), self.device)
        data = training_data(args.dataset, args.images, self.device, fast)
        seconds, result = timed(lambda: run(data), self.device)
        return {"seconds": round(seconds, 3), "images_per_s": round(args.images / seconds, 1),
                "warmup_s": round(warmup_s, 3), "result": result}

    def probe_syncs(self, model, fast: FastPath) -> dict:
        x = torch.rand(self.args.batch, self.info.in_channels, self.info.image_size, self.info.image_size,
                       device=self.device)
        y = torch.randint(0, self.info.num_classes, (self.args.batch,), device=self.device)
        with bf16(self.device, fast.amp):
            return {"pgd_reads_back": pgd_reads_back(model, x, y, self.attack, self.device)}

    def at(self, arch: str, fast: FastPath, no_sync: bool) -> dict:
        model = self.target(arch, fast)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        step = make_adversarial_step(model, OBJECTIVES["at"], lambda index: self.attack, 6.0,
                                     attack_generator(0, self.device))
        row = self.warm_and_time(fast, lambda data: self.epoch(model, optimizer, step, data, fast, no_sync))
        row.pop("result")
        return {**row, **self.probe_syncs(model, fast)}

    def namid(self, arch: str, fast: FastPath, no_sync: bool) -> dict:
        model = self.target(arch, fast)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=2e-4)
        step = make_namid_step(model, freeze(self.estimators()), OBJECTIVES["at"], lambda index: self.attack,
                               attack_generator(0, self.device), beta=6.0, alpha=5.0, lam=0.1, measure="dv")
        row = self.warm_and_time(fast, lambda data: self.epoch(model, optimizer, step, data, fast, no_sync))
        mi_loss = row.pop("result").get("mi_loss")
        return {**row, "hsize": self.hsize, "mi_loss": mi_loss}

    def estimator(self, arch: str, fast: FastPath, no_sync: bool) -> dict:
        target = freeze(self.target(arch, fast))
        estimators = self.estimators()
        optimizer = torch.optim.Adam(estimators.parameters(), lr=1e-3)
        generator = attack_generator(0, self.device)
        step = make_estimator_step(estimators, target, partial(paper_objective, bounded=True), self.attack, generator,
                                   "dv")

        def attack_pass(data):
            loader = make_loader(data, self.args.batch, shuffle=True, seed=0, epoch=0, device=self.device)
            with bf16(self.device, fast.amp):
                for x, y in loader:
                    pgd_attack(target, x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True),
                               self.attack, generator)

        row = self.warm_and_time(fast, lambda data: self.epoch(target, optimizer, step, data, fast, no_sync))
        row.pop("result")
        attack = self.warm_and_time(fast, attack_pass)
        return {**row, "hsize": self.hsize, "attack_pass_s": attack["seconds"],
                "estimator_over_attack": round(row["seconds"] / attack["seconds"], 3)}

    def aa(self, arch: str, fast: FastPath, no_sync: bool) -> dict:
        # Not compiled: AutoAttack changes the batch size and the grad mode at every attack and restart,
        # each a recompilation (minutes with inductor), which is not what a compiled model is for.
        model = self.target(arch, replace(fast, compile=False)).eval()
        count, info = self.args.aa_images, self.info
        generator = torch.Generator().manual_seed(1)
        x = torch.rand(count, info.in_channels, info.image_size, info.image_size, generator=generator).to(self.device)
        with torch.no_grad(), bf16(self.device, fast.amp):
            y = model(x).argmax(1)  # every image counts as clean-correct, so every one is attacked
        module = import_module(autoattack_module())  # as utils/evaluation.py calls it: either packaging
        adversary = module.AutoAttack(Float32Logits(model), norm="Linf", eps=info.epsilon_linf, version="standard",
                                      seed=0, device=self.device)
        run = adversary.run_standard_evaluation
        size = "batch_size" if "batch_size" in inspect.signature(run).parameters else "bs"

        def attack():
            with frozen_eval(model), bf16(self.device, fast.amp):
                return run(x, y, **{size: self.args.aa_batch})
        seconds, result = timed(attack, self.device)
        x_adv = result[0] if isinstance(result, tuple) else result
        with torch.no_grad(), bf16(self.device, fast.amp):
            robust = (model(x_adv).argmax(1) == y).float().mean().item()
        return {"seconds": round(seconds, 3), "images_per_s": round(count / seconds, 2), "images": count,
                "batch": self.args.aa_batch, "robust_acc": robust, "compiled": False, "autoattack": autoattack_module()}

    def loader(self, arch: str, fast: FastPath, no_sync: bool) -> dict:
        def one_pass(data):
            loader = make_loader(data, self.args.batch, shuffle=True, seed=0, epoch=0, device=self.device)
            for x, y in loader:
                x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        setup_s, data = timed(lambda: training_data(self.args.dataset, self.args.images, self.device, fast), self.device)
        seconds, _ = timed(lambda: one_pass(data), self.device)
        return {"seconds": round(seconds, 3), "images_per_s": round(self.args.images / seconds, 1),
                "setup_s": round(setup_s, 3)}


def step_rows(bench: Bench, configs: list) -> list:
    """The step workload: the configurations interleaved in one process, --repeats rounds, medians."""
    args, device = bench.args, bench.device
    info = dataset_info("fashion-mnist")
    eps = info.epsilon_linf
    attack = PGDConfig("linf", eps, eps / 4, args.steps)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(args.step_batch, info.in_channels, info.image_size, info.image_size, generator=generator).to(device)
    y = torch.randint(0, info.num_classes, (args.step_batch,), generator=generator).to(device)
    runs = {}
    for config in configs:
        fast = config.fast("small-cnn", device)
        model = bench.target("small-cnn", fast, info)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        step = in_precision(make_adversarial_step(model, OBJECTIVES["at"], lambda index: attack, 6.0,
                                                  attack_generator(0, device)), device, fast.amp)

        def train_step(optimizer=optimizer, step=step, amp=fast.amp):
            with bf16(device, amp and device.type == "cuda"):  # off CUDA, in_precision autocasts the step
                loss = step(x, y, 0)[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        def attack_only(model=model, amp=fast.amp):
            with bf16(device, amp):
                pgd_attack(model, x, y, attack, attack_generator(0, device))
        attack_only(), train_step()  # warm-up: compilation, first calls
        runs[config.name] = {"attack": attack_only, "step": train_step, "attack_s": [], "step_s": []}
    for _ in range(args.repeats):
        for run in runs.values():
            for part in ("attack", "step"):
                run[f"{part}_s"].append(round(timed(run[part], device)[0], 4))
    rows = []
    for config in configs:
        run = runs[config.name]
        row = {"arch": "small-cnn", "dataset": "fashion-mnist", "attack_median_s": statistics.median(run["attack_s"]),
               "step_median_s": statistics.median(run["step_s"]), "attack_s": run["attack_s"], "step_s": run["step_s"]}
        row["seconds"] = row["step_median_s"]
        row["images_per_s"] = round(args.step_batch / row["step_median_s"], 1)
        rows.append((config, row))
    if "plain" in runs:  # per round, both timed under the same load: the median of those ratios
        for config, row in rows:
            for part in ("attack", "step"):
                pairs = zip(runs["plain"][f"{part}_s"], runs[config.name][f"{part}_s"])
                ratios = [plain / timed_s for plain, timed_s in pairs]
                row[f"{part}_speedup_over_plain"] = round(statistics.median(ratios), 3)
    return rows


def goal_rows(rows: list, arch: str) -> list:
    """Per configuration that ran the AT, NAMID and estimator epochs on `arch`: the issue's three goals."""
    found = {}
    for row in rows:
        if row.get("arch") == arch and row["workload"] in ("at", "namid", "estimator"):
            found.setdefault(row["config"], {})[row["workload"]] = row
    goals = []
    for config, parts in found.items():
        if len(parts) < 3:
            continue
        at_s, namid_s = parts["at"]["seconds"], parts["namid"]["seconds"]
        ratios = {"at_epoch_s": at_s, "namid_over_at": round(namid_s / at_s, 3),
                  "estimator_over_attack": parts["estimator"]["estimator_over_attack"]}
        goals.append({"goals": config, "arch": arch, **ratios,
                      "met": {key: value <= GOALS[key] for key, value in ratios.items()}, "targets": GOALS})
    return goals


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--configs", nargs="+", default=["plain", "default", "all"],
                        help="plain, default, all, or comma-separated options: " + ", ".join(OPTIONS))
    parser.add_argument("--dataset", choices=("cifar10", "fashion-mnist"), default="cifar10",
                        help="the shape of the synthetic data of the epoch, aa and loader workloads")
    parser.add_argument("--arch", nargs="+", default=["resnet18"], help="architectures of every epoch workload")
    parser.add_argument("--at-arch", nargs="*", default=["wrn-34-10"], help="further architectures of the AT epoch")
    parser.add_argument("--width", type=int, default=64, help="first-stage channels of the ResNets (tiny runs: 4)")
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="PGD steps")
    parser.add_argument("--hsize", type=int, default=None, help="estimator width (default: the dataset's)")
    parser.add_argument("--aa-images", type=int, default=1000)
    parser.add_argument("--aa-batch", type=int, default=500)
    parser.add_argument("--step-batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of the step workload")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (tests: aot_eager)")
    parser.add_argument("--note", default="", help="recorded in --out (the machine's load, ...)")
    parser.add_argument("--out", default=None, help="also write every line, with the machine, as one JSON file")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # Every compiled model shares the cache of nn.Module's compiled call, each with a few entries (train and
    # eval mode, no_grad, a dynamic batch): the bench compiles several models, more than the default 8 allow.
    torch._dynamo.config.recompile_limit = 64
    device = resolve_device(args.device)
    configs = [parse_config(text) for text in args.configs]
    bench = Bench(args, device)
    common = {"device": device_name(device), "torch": torch.__version__}
    load_before = os.getloadavg()
    rows = []

    def emit(workload, config, arch, row):
        row = {"workload": workload, "config": config.name, "options": config.options(arch, device), **common,
               "images": args.images, "batch": args.batch, "pgd_steps": args.steps, "arch": arch, **row}
        print(json.dumps(row), flush=True)
        rows.append(row)

    for workload in args.workloads:
        if workload == "step":
            for config, row in step_rows(bench, configs):
                emit(workload, config, "small-cnn", {**row, "images": args.step_batch, "batch": args.step_batch})
            continue
        archs = [None] if workload == "loader" else args.arch + (args.at_arch if workload == "at" else [])
        for arch in dict.fromkeys(archs):
            for config in configs:
                emit(workload, config, arch, getattr(bench, workload)(arch, config.fast(arch, device), config.no_sync))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    for goal in goal_rows(rows, args.arch[0]):
        print(json.dumps(goal), flush=True)
        rows.append(goal)
    if args.out:
        record = {**machine_record(device), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                  "device_name": common["device"], "note": args.note,
                  "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()}, "results": rows}
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
