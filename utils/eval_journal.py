"""Stage 4's per-batch journal, so that an interrupted evaluation can be continued (test_comparison.py --resume).

As run_attack finishes a batch of an attack on a model, the batch's BatchOutcome and its seconds are added to
<out-dir>/progress/<model index>/<attack name>.rank<r>.pt, rewritten atomically after every batch; each torchrun
process writes only its own file (rank r), so processes never race. A journal file is a plain dict that
torch.load(weights_only=True) reads:

    {"format": "namid-eval-journal", "fingerprint": "<JSON text>", "batches": [{"index", "robust", "nan", "budget",
     "unthresholded_robust", "notes", "predicted", "labels", "seconds"}, ...]}

Every batch is seeded by its index (utils/evaluation.py seed_batch), not by the process or the batches before it,
so a batch's outcome is the same whichever process or run computes it: a continued run takes the journalled
outcomes of every process's file, whatever the number of processes that wrote them, and its results equal an
uninterrupted run's example for example. It takes them only from a journal whose fingerprint (fingerprint())
equals its own; any other journal is ignored with one warning and removed.

test_detection.py --resume keeps the same journal with its own batches (a JournalCodec: {"index", "seconds",
"part"}, the part being utils/detection.py's per-batch predictions, scores and acceptances) and its own
fingerprint.
"""
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from utils import distributed
from utils.checkpoint import atomic_torch_save, file_sha256
from utils.evaluation import BatchOutcome

JOURNAL_FOLDER = "progress"  # utils/pipeline.py (task_state) looks for it to pass --resume
JOURNAL_FORMAT = "namid-eval-journal"
JOURNAL_VERSION = 1


def checkpoint_identity(path) -> str:
    """SHA-256 of the checkpoint file (a model that is not a file, in tests: its path)."""
    path = Path(path)
    return file_sha256(path) if path.is_file() else f"path:{path}"


def fingerprint(*, checkpoint_sha256: str, label: str, model_index: int, attack, attack_seed: int, dataset: str,
                test_indices, batch_size: int, amp: bool, channels_last: bool, device, versions: dict) -> str:
    """Everything a batch's outcome depends on, as canonical JSON text: the checkpoint's SHA-256, the row's label
    and index, the attack's name, threat model, budget, settings and seed, the test images (their indices),
    the batch size, amp, channels_last, the device type and the package versions. Not the number of processes."""
    indices = [int(index) for index in test_indices]
    return json.dumps({
        "version": JOURNAL_VERSION, "checkpoint_sha256": checkpoint_sha256, "label": label, "model_index": model_index,
        "attack": attack.name, "threat": attack.threat, "bound": attack.bound, "settings": attack.settings,
        "attack_seed": attack_seed, "dataset": dataset, "test_images": len(indices),
        "test_indices_sha256": hashlib.sha256(json.dumps(indices).encode()).hexdigest(), "batch_size": batch_size,
        "amp": bool(amp), "channels_last": bool(channels_last), "device": torch.device(device).type,
        "versions": versions}, sort_keys=True, default=str)


def _entry(outcome: BatchOutcome, seconds: float) -> dict:
    """A BatchOutcome as plain types and CPU tensors."""
    def tensor(value):
        return None if value is None else value.detach().cpu().clone()
    return {"index": int(outcome.index), "robust": tensor(outcome.robust), "nan": bool(outcome.nan),
            "budget": None if outcome.budget is None else [float(value) for value in outcome.budget],
            "unthresholded_robust": tensor(outcome.unthresholded_robust),
            "notes": [str(note) for note in outcome.notes], "predicted": tensor(outcome.predicted),
            "labels": tensor(outcome.labels), "seconds": float(seconds)}


def _outcome(entry: dict) -> BatchOutcome:
    budget = entry["budget"]
    return BatchOutcome(entry["index"], entry["robust"], entry["nan"], None if budget is None else tuple(budget),
                        entry["unthresholded_robust"], list(entry["notes"]), entry["predicted"], entry["labels"])


@dataclass(frozen=True)
class JournalCodec:
    """What a journalled batch holds: encode(item, seconds) gives a dict of plain types and CPU tensors with
    "index" and "seconds" (what torch.load(weights_only=True) reads back), decode(entry) the item again."""
    encode: Callable
    decode: Callable


BATCH_OUTCOMES = JournalCodec(_entry, _outcome)  # test_comparison.py's: a BatchOutcome per batch


class AttackJournal:
    """One attack on one model in this process: the journalled batches any process finished ({batch index:
    (item, seconds)}, a BatchOutcome per batch by default), and this process's own file, to which record() adds
    each batch it finishes."""

    def __init__(self, path: Path, fingerprint_text: str, own: dict, done: dict, codec: JournalCodec = BATCH_OUTCOMES):
        self.path, self.fingerprint, self.own, self.done, self.codec = path, fingerprint_text, dict(own), done, codec

    def record(self, item, seconds: float):
        entry = self.codec.encode(item, seconds)
        self.own[int(entry["index"])] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"format": JOURNAL_FORMAT, "fingerprint": self.fingerprint,
                           "batches": [self.own[index] for index in sorted(self.own)]}, self.path)


def _read(path: Path):
    """(fingerprint text, {batch index: entry}) of a journal file, or None when it cannot be read."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(content, dict) or content.get("format") != JOURNAL_FORMAT:
            return None
        return content["fingerprint"], {int(entry["index"]): entry for entry in content["batches"]}
    except Exception:  # a truncated or foreign file is no journal
        return None


def open_journals(out_dir, fingerprints: dict, resume: bool, warn, codec: JournalCodec = BATCH_OUTCOMES) -> dict:
    """{(model index, attack name): AttackJournal} for this process (a collective: every process calls it).

    Without resume, an earlier journal under out_dir is removed, so that it cannot leak into a later run. With
    resume, every process reads every process's files; a file whose fingerprint differs from this run's (or that
    cannot be read) is ignored, named in one warning by warn (rank 0), and removed."""
    folder = Path(out_dir) / JOURNAL_FOLDER
    if not resume:
        if distributed.is_main() and folder.exists():
            shutil.rmtree(folder)
        distributed.barrier()
        return {key: AttackJournal(_path(folder, key, distributed.rank()), text, {}, {}, codec)
                for key, text in fingerprints.items()}
    journals, ignored = {}, []
    for key, text in fingerprints.items():
        model_index, name = key
        own_path = _path(folder, key, distributed.rank())
        own, done = {}, {}
        for path in sorted((folder / str(model_index)).glob(f"{name}.rank*.pt")):
            read = _read(path)
            if read is None or read[0] != text:
                ignored.append(path)
                continue
            for index, entry in read[1].items():
                done.setdefault(index, (codec.decode(entry), entry["seconds"]))
            if path == own_path:
                own = read[1]
        journals[key] = AttackJournal(own_path, text, own, done, codec)
    distributed.barrier()  # every process has read every file before any is removed
    if distributed.is_main():
        if ignored:
            warn(f"--resume: {len(ignored)} journal file(s) in {folder} were made with other settings (checkpoint, "
                 f"attack settings or seed, test images, batch size, label, amp, channels_last, device or versions) "
                 f"or are unreadable: ignored and removed, their batches computed anew")
        for path in ignored:
            path.unlink(missing_ok=True)
    distributed.barrier()
    return journals


def _path(folder: Path, key, rank: int) -> Path:
    model_index, name = key
    return folder / str(model_index) / f"{name}.rank{rank}.pt"


def remove_journal(out_dir):
    """The whole journal, once the evaluation is complete (rank 0)."""
    folder = Path(out_dir) / JOURNAL_FOLDER
    if distributed.is_main() and folder.exists():
        shutil.rmtree(folder)
