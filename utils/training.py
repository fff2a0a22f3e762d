"""Training infrastructure shared by the stage scripts: run folders, the epoch loop with resume and
checkpoint selection, the adversarial training step, and clean/PGD evaluation."""
import csv
import io
import json
import math
import os
import platform
import shlex
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

from models import build_model
from defenses import Head, head_for
from utils.attacks import PGDConfig, compile_attack_step, frozen_eval, pgd_attack
from utils.checkpoint import (CHECKPOINT_FORMAT, atomic_torch_save, atomic_write_json, atomic_write_text,
                              load_checkpoint, load_state_dict_checked)
from utils import distributed
from utils.data import device_splits, holds_arrays, load_splits, make_loader
from utils.errors import UserError
from utils.losses import training_loss
from utils.run_warnings import RunWarnings
from utils.runtime import (FastPath, attack_generator, autocast, capture_rng_state, git_commit, package_versions,
                           resolve_fast_path, restore_rng_state, seed_everything)

# Flags that may change when a run is resumed: they do not change what the finished run computes
# (the lr schedule is a pure function of the epoch, and evaluation draws from its own random stream;
# the speed options other than --amp change it by float rounding at most).
RESUMABLE_CHANGES = {"resume", "device", "workers", "epochs", "milestones", "tensorboard", "eval_batch_size",
                     "test_limit", "model_dir", "data_dir", "channels_last", "device_data", "compile"}


class NonFiniteLoss(UserError):
    pass


SOFTMAX = Head("softmax")


# ----------------------------------------------------------------------------------------------
# Models and their specification (enough to rebuild a model from a checkpoint alone)

def model_spec_from_args(args, info) -> dict:
    """The model's specification; the head's settings only where the head has them (a spec without "head",
    from before the heads existed, is a softmax model)."""
    spec = dict(arch=args.arch, dataset=info.name, num_classes=info.num_classes, in_channels=info.in_channels,
                image_size=info.image_size, mean=list(info.mean), std=list(info.std),
                width=args.width, depth=args.depth, widen_factor=args.widen_factor, head=args.head)
    if args.head in ("mm-lda", "mmc"):
        spec.update(feature_dim=args.feature_dim, mm_scale=args.mm_scale)
    if args.head == "adp":
        spec.update(members=args.members)
    return spec


def model_from_spec(spec: dict) -> torch.nn.Module:
    head = {key: spec[key] for key in ("head", "feature_dim", "mm_scale", "members") if key in spec}
    try:
        return build_model(spec["arch"], spec["num_classes"], spec["in_channels"], spec["image_size"],
                           spec["mean"], spec["std"], width=spec["width"], depth=spec["depth"],
                           widen_factor=spec["widen_factor"], **head)
    except ValueError as error:
        raise UserError(str(error)) from None


def prepare_model(model, fast: FastPath, compile_backend: str = "inductor"):
    """The model in the memory format and compiled form the fast path asks for (--channels-last, --compile);
    its state_dict, keys and values, is unchanged, so checkpoints are the same either way."""
    if fast.channels_last:
        refuse_what_onednn_gets_wrong(model)
        model = model.to(memory_format=torch.channels_last)
    if fast.compile:
        model.compile(backend=compile_backend)  # in place: no "_orig_mod." prefix in the state_dict
        compile_attack_step(model, compile_backend)
    return model


def refuse_what_onednn_gets_wrong(model):
    """UserError for a CPU model that channels_last would break: oneDNN's backward of a 1x1 convolution
    with stride > 1 and fewer input channels than its block (8 with AVX2, 16 with AVX-512) writes out of
    bounds (uxlfoundation/oneDNN#6035: wrong weight gradients, hangs or crashes; here ResNet-18 --width 4
    crashed)."""
    for name, module in model.named_modules():
        if (isinstance(module, torch.nn.Conv2d) and module.weight.device.type == "cpu"
                and module.kernel_size == (1, 1) and max(module.stride) > 1 and module.in_channels < 16):
            raise UserError(f"--channels-last on the CPU: oneDNN's backward of {name}, a 1x1 stride-{max(module.stride)} "
                            f"convolution of {module.in_channels} input channels, writes out of bounds; use "
                            f"--no-channels-last or a --width of 16 or more")


def load_model(path, device) -> tuple:
    """The model stored in a checkpoint (best.pt or last.pt of any stage), and the checkpoint dict."""
    checkpoint = load_checkpoint(path)
    if "model_spec" not in checkpoint or "model" not in checkpoint:
        raise UserError(f"checkpoint {path} holds no target model")
    model = model_from_spec(checkpoint["model_spec"])
    load_state_dict_checked(model, checkpoint["model"], path)
    return model.to(device), checkpoint


# ----------------------------------------------------------------------------------------------
# Run folders

class RunDirectory:
    """The output folder of one run: config.json, metrics.csv, last.pt and the selected checkpoint
    (best.pt, or estimators.pt in stage 2), all written atomically."""

    def __init__(self, path, resume: bool, best_name: str = "best.pt"):
        self.path = Path(path)
        self.best = self.path / best_name
        self.created = not self.path.exists()  # by this run: then a failure before training removes it
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-test-")
            os.close(fd)
            os.unlink(probe)
        except OSError as error:
            raise UserError(f"cannot write to model directory {self.path}: {error.strerror or error}") from None
        if resume and not self.last.is_file():
            raise UserError(f"--resume: there is no {self.last} to continue from")
        if not resume and (self.last.is_file() or self.best.is_file()):
            raise UserError(f"{self.path} already holds a run; pass --resume to continue it or choose another --model-dir")

    @contextmanager
    def removed_if_setup_fails(self):
        """Until training starts, a failure (missing data, a mismatch found late) removes the folder if this
        run created it and no checkpoint is in it yet: a failed start leaves nothing behind."""
        try:
            yield
        except BaseException:
            if self.created and not self.last.exists() and distributed.is_main():
                shutil.rmtree(self.path, ignore_errors=True)
            raise

    last = property(lambda self: self.path / "last.pt")
    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.csv")

    def write_config(self, args, stage: str, script: str, argv, extra: dict = None):
        """config.json: the resolved arguments, the command as given to the script, and provenance."""
        record = {"stage": stage, "args": vars(args), "command": shlex.join([script, *argv]),
                  "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": {"host": socket.gethostname(), "platform": platform.platform(),
                              "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                              "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                              "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")},
                  "versions": package_versions(), "git_commit": git_commit()}
        record.update(extra or {})
        atomic_write_json(self.config, record)

    def record_resume(self, after_epoch: int):
        """config.json keeps, for each --resume, the epoch it continued after and the code that ran on: a run
        started by one commit and finished by another says so."""
        try:
            record = json.loads(self.config.read_text())
        except (OSError, ValueError):  # no config.json (a run older than it) or an unreadable one: nothing to add to
            return
        record.setdefault("resumes", []).append({
            "after_epoch": after_epoch, "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "host": socket.gethostname(), "git_commit": git_commit()})
        atomic_write_json(self.config, record)

    def write_metrics(self, history: list):
        """metrics.csv is rewritten from the checkpointed history, so it never holds an epoch last.pt lacks."""
        if not history:
            return
        buffer = io.StringIO()
        columns = list(dict.fromkeys(key for row in history for key in row))
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: _format_metric(v) for k, v in row.items()})
        atomic_write_text(self.metrics, buffer.getvalue())


def _format_metric(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def check_resume_compatible(saved_args: dict, args, path):
    for key, value in vars(args).items():
        if key in RESUMABLE_CHANGES or key not in saved_args:
            continue
        saved = saved_args[key]
        if isinstance(saved, list) and isinstance(value, tuple):
            value = list(value)
        if saved != value:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume: {path} was started with {flag} {saved}, not {value}; "
                            f"use the same settings or another --model-dir")


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the epoch (so a resumed run may extend --epochs)

def step_lr(base_lr: float, milestones, gamma: float, epoch: int) -> float:
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


def set_lr(optimizer, lr: float):
    for group in optimizer.param_groups:
        group["lr"] = lr


# ----------------------------------------------------------------------------------------------
# The epoch loop

class TrainingRun:
    """Runs epochs, keeps the history, selects the best epoch on validation data, and checkpoints.

    Checkpoint order per epoch: best.pt (if improved), then last.pt, then metrics.csv (derived from
    last.pt). A run killed between any two writes resumes from last.pt and redoes at most one epoch,
    rewriting identical files.
    """

    def __init__(self, run_dir: RunDirectory, args, stage: str, model, optimizer, generator, model_spec: dict = None,
                 select_key: str = "val_pgd_acc", select_mode: str = "max", model_key: str = "model",
                 spec_key: str = "model_spec", metadata: dict = None, selects: bool = True):
        self.run_dir, self.args, self.stage = run_dir, args, stage
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.model_spec, self.select_key, self.select_mode = model_spec, select_key, select_mode
        self.selects = selects  # False without validation data: then every epoch replaces the last
        self.model_key, self.spec_key = model_key, spec_key
        self.metadata = metadata or {}  # extra JSON-like fields stored in every checkpoint
        self.history, self.best, self.start_epoch = [], None, 0
        self.writer = None

    def _base_record(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "stage": self.stage, "config": vars(self.args), **self.metadata,
                self.spec_key: self.model_spec, self.model_key: self.model.state_dict()}

    def resume(self):
        checkpoint = load_checkpoint(self.run_dir.last)
        if checkpoint.get("stage") != self.stage:
            raise UserError(f"--resume: {self.run_dir.last} is a {checkpoint.get('stage')} checkpoint, not {self.stage}")
        check_resume_compatible(checkpoint.get("config", {}), self.args, self.run_dir.last)
        load_state_dict_checked(self.model, checkpoint[self.model_key], self.run_dir.last, what=self.model_key)
        try:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
        except (ValueError, KeyError) as error:
            raise UserError(f"--resume: optimizer state in {self.run_dir.last} does not fit ({error})") from None
        self.history, self.best, self.start_epoch = checkpoint["history"], checkpoint["best"], checkpoint["epoch"]
        if self.best is not None and self.best.get("key") != self.select_key:
            # A run started by an older version that selected on another value (stage 2 before issue 10).
            tqdm.write(f"--resume: {self.run_dir.last} selected its best epoch on {self.best.get('key')}; from now on "
                       f"{self.select_key} selects, starting afresh with the next epoch")
            self.best = None
        if distributed.is_main():
            restore_rng_state(checkpoint["rng"], self.generator)
            tqdm.write(f"resumed {self.run_dir.path} after epoch {self.start_epoch}")
            self.run_dir.record_resume(self.start_epoch)
        else:  # the checkpoint holds rank 0's streams; the other processes draw fresh ones per epoch
            seed_process(self.args.seed, self.start_epoch, self.generator)

    def _selection_value(self, row):
        value = row.get(self.select_key)
        return float(value) if _is_finite(value) else None

    def _is_better(self, value) -> bool:
        """Strictly better than the best so far. A missing or non-finite value (NaN, +-inf: a diverging
        epoch) is never better than anything, and anything finite beats a best that has none. Without
        validation data (selects False) every epoch replaces the last."""
        if not self.selects:
            return True
        if not _is_finite(value):
            return False
        if self.best is None or not _is_finite(self.best["value"]):
            return True
        return value > self.best["value"] if self.select_mode == "max" else value < self.best["value"]

    def _save(self, epoch: int, row: dict):
        value = self._selection_value(row)
        improved = self._is_better(value)
        if improved:
            self.best = {"epoch": epoch, "key": self.select_key, "value": value}
        if not distributed.is_main():
            return
        if improved:
            atomic_torch_save({**self._base_record(), "epoch": epoch, "metrics": row}, self.run_dir.best)
        atomic_torch_save({**self._base_record(), "epoch": epoch, "optimizer": self.optimizer.state_dict(),
                           "scheduler": {"kind": "step", "base_lr": self.args.lr, "milestones": list(self.args.milestones),
                                         "gamma": self.args.lr_gamma},
                           "rng": capture_rng_state(self.generator), "history": self.history, "best": self.best},
                          self.run_dir.last)
        self.run_dir.write_metrics(self.history)

    def _log_tensorboard(self, row):
        if not self.args.tensorboard or not distributed.is_main():
            return
        if self.writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.writer = SummaryWriter(str(self.run_dir.path / "tensorboard"))
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def fit(self, run_epoch):
        """run_epoch(epoch) -> metrics row (dict); epochs are 0-based here and 1-based in the files."""
        if self.args.resume:
            self.resume()
        if self.start_epoch >= self.args.epochs:
            if distributed.is_main():
                tqdm.write(f"{self.run_dir.path} already finished {self.start_epoch} epochs; nothing to do")
            return self.history
        for epoch in range(self.start_epoch, self.args.epochs):
            lr = step_lr(self.args.lr, self.args.milestones, self.args.lr_gamma, epoch)
            set_lr(self.optimizer, lr)
            started = time.perf_counter()
            row = {"epoch": epoch + 1, "lr": lr, **run_epoch(epoch), "seconds": round(time.perf_counter() - started, 2)}
            self.history.append(row)
            self._save(epoch + 1, row)
            distributed.barrier()
            self._log_tensorboard(row)
            if distributed.is_main():
                tqdm.write(summarise(row))
        if self.writer is not None:
            self.writer.close()
        if distributed.is_main():
            if self.best is None:
                tqdm.write(f"done: no epoch had a finite {self.select_key}, so {self.run_dir.best.name} was not written; "
                           f"files in {self.run_dir.path}")
            else:
                tqdm.write(f"done: best epoch {self.best['epoch']} ({self.select_key} {self.best['value']}); "
                           f"files in {self.run_dir.path}")
        return self.history


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def summarise(row: dict) -> str:
    parts = [f"epoch {row['epoch']}"]
    for key, value in row.items():
        if key in ("epoch",):
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


# ----------------------------------------------------------------------------------------------
# One epoch of training, and evaluation

def check_finite(loss, epoch: int, batch: int, last_good: Path, device):
    """Stop (every process together) when the loss is NaN or infinite; the last checkpoint stays as it is."""
    if distributed.any_process(not torch.isfinite(loss).item(), device):
        raise NonFiniteLoss(f"the loss became {loss.item()} at epoch {epoch + 1}, batch {batch + 1}; stopped. "
                            f"{last_good} (the last completed epoch) is intact; lower --lr or add --warmup-epochs")


READBACK_BATCHES = 20  # on an accelerator: batches between two reads of the epoch's statistics


def readback_interval(device) -> int:
    """Batches between reads of an epoch's running statistics: every batch on the CPU, where a read costs
    nothing, READBACK_BATCHES on an accelerator, where a read waits until the device has run everything
    queued, so that meanwhile the host could not queue the next batches."""
    return 1 if torch.device(device).type == "cpu" else READBACK_BATCHES


class _Batch(NamedTuple):
    index: int
    n: int
    loss: torch.Tensor
    clean_correct: torch.Tensor
    adv_correct: torch.Tensor  # None when the step made no adversarial
    extras: dict


class RunningTotals:
    """An epoch's per-batch loss, correct counts and step extras, kept as the device computed them and read
    back every `every` batches (PGD itself never reads anything back). A read adds the pending
    batches to float sums in batch order, so the totals are those of reading each batch as it ends, and
    stops the run at the first non-finite loss, naming its batch (check_finite)."""

    def __init__(self, every: int, epoch: int, last_good: Path, device):
        self.every, self.epoch, self.last_good, self.device = every, epoch, last_good, device
        self.sums = {"count": 0.0, "clean_correct": 0.0, "adv_correct": 0.0, "adv_count": 0.0}
        self.pending = []

    def add(self, index, loss, logits_nat, logits_adv, y, extras):
        clean = (logits_nat.detach().argmax(1) == y).sum()
        adv = None if logits_adv is None else (logits_adv.detach().argmax(1) == y).sum()
        self.pending.append(_Batch(index, y.shape[0], loss.detach(), clean, adv, extras))

    def due(self, index: int) -> bool:
        return (index + 1) % self.every == 0

    def read(self):
        if not self.pending:
            return
        flagged = [batch for batch in self.pending if not torch.isfinite(batch.loss)]
        checked = flagged[0] if flagged else self.pending[-1]  # every process checks at every read (a collective)
        check_finite(checked.loss, self.epoch, checked.index, self.last_good, self.device)
        sums = self.sums
        for batch in self.pending:
            sums["count"] += batch.n
            sums["clean_correct"] += batch.clean_correct.item()
            if batch.adv_correct is not None:
                sums["adv_correct"] += batch.adv_correct.item()
                sums["adv_count"] += batch.n
            for key, value in {"train_loss": batch.loss, **batch.extras}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * batch.n
        self.pending = []

    def postfix(self) -> dict:
        sums = self.sums
        return dict(loss=f"{sums['train_loss'] / sums['count']:.3f}", clean=f"{sums['clean_correct'] / sums['count']:.3f}",
                    adv=f"{sums['adv_correct'] / sums['adv_count']:.3f}" if sums["adv_count"] else "-")


def train_epoch(model, loader, optimizer, step_fn, device, epoch: int, run_dir: RunDirectory, amp=False, desc="train",
                grad_clip: float = 0.0, readback_every: int = None):
    """Train one epoch; step_fn(x, y, batch_index) -> (loss, logits_nat or None, logits_adv or None, extras dict).

    Returns the example-weighted means of the loss and of every extra, and the clean and adversarial
    accuracies on the training batches (clean from an extra no-grad eval forward when the step has none),
    summed over all processes under torchrun. grad_clip > 0 clips the gradient's global norm. The
    statistics are read back every readback_every batches (default: readback_interval(device)); a
    non-finite loss stops the run at the next read.
    """
    plain = distributed.unwrap(model)
    totals = RunningTotals(readback_every or readback_interval(device), epoch, run_dir.last, device)
    bar = tqdm(loader, desc=f"{desc} {epoch + 1}", leave=False, dynamic_ncols=True, disable=not distributed.is_main())
    for index, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            loss, logits_nat, logits_adv, extras = step_fn(x, y, index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(plain.parameters(), grad_clip)
        optimizer.step()
        if logits_nat is None:
            with torch.no_grad(), frozen_eval(plain), autocast(device, amp):
                logits_nat = plain(x)
        totals.add(index, loss, logits_nat, logits_adv, y, extras)
        if totals.due(index):
            totals.read()
            # refresh=False: the bar is drawn by its own update, after this batch is counted (not "0/8" with new values)
            bar.set_postfix(**totals.postfix(), refresh=False)
    totals.read()
    sums = distributed.sum_across_processes(totals.sums, device)
    count = max(sums.pop("count"), 1)
    clean_correct, adv_correct, adv_count = sums.pop("clean_correct"), sums.pop("adv_correct"), sums.pop("adv_count")
    stats = {key: value / count for key, value in sums.items()}
    stats["train_clean_acc"] = clean_correct / count
    stats["train_adv_acc"] = adv_correct / adv_count if adv_count else float("nan")
    return stats


# ----------------------------------------------------------------------------------------------
# BatchNorm running statistics: which training batches update them (--bn-stats; README, "Batch norm")

BN_POLICIES = ("base", "mixed")


@contextmanager
def running_statistics_frozen(model):
    """Train-mode forwards inside normalise with their batch statistics as usual, but leave every
    BatchNorm's running statistics (and batch counter) as they were."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    saved = [[buffer.clone() for buffer in (m.running_mean, m.running_var, m.num_batches_tracked)] for m in norms]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, (mean, var, count) in zip(norms, saved):
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def clean_logits_in_train_mode(model, x, objective, bn_stats: str, for_mi: bool = False, head: Head = SOFTMAX):
    """h(x) in train mode after the attack (the head's outputs: an ensemble's members' logits), or None when
    nothing needs it, under the BN policy.

    base:  the running statistics see exactly the batches the base loss trains on: x~ only for AT,
           x and x~ for TRADES and MART. NAMID's clean forward (for_mi, AT base) does not update them,
           so NAMID and Standard AT (or NAMID-T and TRADES) share one policy.
    mixed: x and x~ update them in every run: NAMID as in the published code, and Standard AT runs an
           extra no-grad clean forward for its statistics alone."""
    if objective.needs_clean_outputs(head) or (for_mi and bn_stats == "mixed"):
        return head.outputs(model, x)
    if for_mi:
        with running_statistics_frozen(model):
            return head.outputs(model, x)
    if bn_stats == "mixed":
        with torch.no_grad():
            return head.outputs(model, x)
    return None


def natural_step(model, x, y, head: Head = SOFTMAX):
    """A clean training step (natural training, or a warm-up epoch): the head's own loss on x."""
    model.train()
    outputs = head.outputs(model, x)
    return head.loss(outputs, y), head.logits(outputs), None, {}


def make_adversarial_step(model, objective, attack_schedule, beta, generator, bn_stats: str = "base",
                          head: Head = SOFTMAX):
    """The stage-1 step: craft x~ with the objective's training attack, then its loss in train mode, with the
    head's loss in place of cross-entropy (utils.losses.training_loss).

    attack_schedule(batch_index) -> PGDConfig, or None for a clean (warm-up) step; natural training has
    only clean steps.
    """
    def step(x, y, index):
        config = attack_schedule(index) if objective.adversarial else None
        if config is None:
            return natural_step(model, x, y, head)
        x_adv = pgd_attack(distributed.unwrap(model), x, y, config, generator)
        model.train()
        outputs_nat = clean_logits_in_train_mode(model, x, objective, bn_stats, head=head)
        outputs_adv = head.outputs(model, x_adv)
        loss = training_loss(objective, head, outputs_nat, outputs_adv, y, beta)
        return loss, None if outputs_nat is None else head.logits(outputs_nat), head.logits(outputs_adv), {}
    return step


def training_attack_schedule(base: PGDConfig, epoch: int, batches_per_epoch: int, warmup_epochs: int, ramp_epochs: int):
    """PGDConfig per batch of `epoch`: None during clean warm-up, then epsilon (and the step size)
    grown linearly per batch over ramp_epochs, then the full budget. schedule.adversarial_epochs(index)
    says how many adversarial epochs have elapsed after that batch (fractional; 0 in warm-up), for
    ramps of other quantities (train_MIAT.py's --alpha-warmup-epochs)."""
    def adversarial_epochs(index):
        return max(0.0, epoch - warmup_epochs + (index + 1) / batches_per_epoch)

    def schedule(index):
        if epoch < warmup_epochs:
            return None
        if ramp_epochs == 0:
            return base
        progress = adversarial_epochs(index) / ramp_epochs
        if progress >= 1:
            return base
        return replace(base, epsilon=base.epsilon * progress, step_size=base.step_size * progress)
    schedule.adversarial_epochs = adversarial_epochs
    return schedule


def evaluate(model, loader, attack: PGDConfig, device, seed: int, amp=False, desc="eval") -> dict:
    """Clean and PGD accuracy over a loader (summed over the processes' shards under torchrun). The attack
    draws from its own generator seeded by `seed`, so evaluation is reproducible and never touches the
    training run's random streams."""
    model = distributed.unwrap(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + 7907 * distributed.rank())
    clean, robust, count = 0, 0, 0.0  # the correct counts stay on the device until read (readback_interval)
    bar = tqdm(loader, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main())
    for index, (x, y) in enumerate(bar):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, amp):
            with torch.no_grad(), frozen_eval(model):
                clean = clean + (model(x).argmax(1) == y).sum()
            x_adv = pgd_attack(model, x, y, attack, generator)
            with torch.no_grad(), frozen_eval(model):
                robust = robust + (model(x_adv).argmax(1) == y).sum()
        count += y.shape[0]
        if (index + 1) % readback_interval(device) == 0:
            bar.set_postfix(clean=f"{float(clean) / count:.3f}", pgd=f"{float(robust) / count:.3f}", refresh=False)
    sums = distributed.sum_across_processes({"clean": float(clean), "robust": float(robust), "count": count}, device)
    if sums["count"] == 0:
        return {"clean_acc": float("nan"), "pgd_acc": float("nan")}
    return {"clean_acc": sums["clean"] / sums["count"], "pgd_acc": sums["robust"] / sums["count"]}


def seed_process(seed: int, epoch: int, generator: torch.Generator):
    """Fresh random streams for a non-zero rank under torchrun (distinct per rank, reproducible per epoch)."""
    offset = 7907 * distributed.rank() + 104729 * epoch
    seed_everything(seed + offset)
    generator.manual_seed(seed + 7919 + offset)


# ----------------------------------------------------------------------------------------------
# The whole of a target-model training run (stage 1 and stage 3 differ only in their step)

def splits_from_args(args):
    """The data splits the shared data flags (--dataset, --data-dir, --val-size, limits, --seed) describe."""
    return load_splits(args.dataset, args.data_dir, val_size=args.val_size, train_limit=args.train_limit,
                       test_limit=args.test_limit, seed=args.seed)


def freeze(module):
    """Eval mode and no parameter gradients, for a module that must not change (targets, estimators)."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def load_splits_rank_zero_first(args):
    """The data splits; under torchrun rank 0 downloads or unpacks the files while the others wait."""
    return distributed.main_process_first(lambda: splits_from_args(args))


def make_optimizer(args, parameters):
    """SGD with momentum (the default), or Adam (--optimizer adam); both with --weight-decay as L2 in the gradient."""
    if getattr(args, "optimizer", "sgd") == "adam":
        return torch.optim.Adam(parameters, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.SGD(parameters, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def train_target_model(args, argv, script: str, stage: str, objective, make_step, metadata: dict = None,
                       warnings: RunWarnings = None):
    """Train a fresh target model; make_step(model, schedule, generator, head) returns the per-batch step
    function of train_epoch. Validation PGD accuracy selects best.pt (clean accuracy for natural training,
    whose PGD accuracy is ~0 at every epoch).
    `warnings` (those raised before the run folder existed) are kept in it."""
    device = distributed.setup(args.device)
    batch_size = distributed.per_process_batch(args.batch_size)
    eval_batch_size = max(1, args.eval_batch_size // distributed.world_size())
    shard = dict(rank=distributed.rank(), world_size=distributed.world_size())
    run_dir = RunDirectory(args.model_dir, resume=args.resume)
    with run_dir.removed_if_setup_fails():
        if distributed.is_main():
            (warnings or RunWarnings()).keep_in(run_dir.path)
        seed_everything(args.seed)
        splits = load_splits_rank_zero_first(args)
        fast = resolve_fast_path(args, device, device_data_possible=holds_arrays(splits.train))
        if fast.device_data:
            splits = device_splits(splits, device)
        spec = model_spec_from_args(args, splits.info)
        model = prepare_model(model_from_spec(spec).to(device), fast)
        trained = distributed.wrap(model, device)  # DistributedDataParallel under torchrun; broadcasts rank 0's init
        optimizer = make_optimizer(args, model.parameters())
        head = head_for(spec, args)
        generator = attack_generator(args.seed, device)
        if not distributed.is_main():
            seed_process(args.seed, 0, generator)
        train_attack = objective.training_attack(PGDConfig(args.norm, args.epsilon, args.step_size, args.num_steps), head,
                                                 getattr(args, "at_attack_loss", None))
        eval_attack = PGDConfig(args.norm, args.epsilon, args.eval_step_size, args.eval_steps)

        run = TrainingRun(run_dir, args, stage, model, optimizer, generator, model_spec=spec, metadata=metadata,
                          selects=len(splits.val) > 0,
                          select_key="val_pgd_acc" if objective.adversarial else "val_clean_acc")
        if not args.resume and distributed.is_main():
            run_dir.write_config(args, stage, script, argv, {"model_spec": spec,
                                                             "train_attack": vars(train_attack) if objective.adversarial else None,
                                                             "eval_attack": vars(eval_attack), "fast_path": asdict(fast),
                                                             "processes": distributed.world_size(), **(metadata or {})})

    def run_epoch(epoch):
        loader = make_loader(splits.train, batch_size, shuffle=True, workers=args.workers, seed=args.seed,
                             epoch=epoch, device=device, **shard)
        schedule = training_attack_schedule(train_attack, epoch, len(loader), args.warmup_epochs, args.eps_ramp_epochs)
        row = train_epoch(trained, loader, optimizer, make_step(trained, schedule, generator, head), device, epoch, run_dir,
                          amp=fast.amp, grad_clip=args.grad_clip)
        for name, split in (("val", splits.val), ("test", splits.test)):
            loader = make_loader(split, eval_batch_size, shuffle=False, workers=args.workers, seed=args.seed,
                                 device=device, **shard)
            # One attack seed for every epoch: the best epoch is then chosen on model change, not attack noise.
            result = evaluate(model, loader, eval_attack, device, seed=args.seed, amp=fast.amp, desc=name)
            row[f"{name}_clean_acc"], row[f"{name}_pgd_acc"] = result["clean_acc"], result["pgd_acc"]
        return row

    try:
        return run.fit(run_epoch)
    finally:
        distributed.cleanup()
