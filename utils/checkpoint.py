"""Atomic writes and safe loading of checkpoints (torch.load with weights_only=True only)."""
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from utils.errors import UserError

CHECKPOINT_FORMAT = "namid-checkpoint"


def file_sha256(path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checkpoints of large models do not fit comfortably in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path, write):
    """Write through a temporary file in the same folder, fsync it, then rename over `path`.

    A reader (or a run killed at any moment) sees either the old file or the new one, never a mix.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes the file private; give it a normal file's mode
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_torch_save(obj, path):
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_write_text(path, text: str):
    _atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def checkpoint_in(path, name: str, script: str) -> str:
    """`path` itself when it is not a folder; for a run folder, the checkpoint `name` it holds (best.pt,
    estimators.pt), saying so on stderr, so that a run folder can be given wherever a checkpoint is."""
    folder = Path(path)
    if not folder.is_dir():
        return str(path)
    if not (folder / name).is_file():
        raise UserError(f"{path} is a folder without {name}: give a checkpoint file or a run folder that holds {name}")
    print(f"{script}: {path} is a run folder: using its {name}", file=sys.stderr)
    return str(folder / name)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load one of this project's checkpoints; any problem becomes a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated, foreign or pickled-code files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot read checkpoint {path}: not a valid checkpoint of this project ({reason[:200]})") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"cannot read checkpoint {path}: it was not written by this project")
    return checkpoint


def load_state_dict_checked(module, state_dict, path, what="model"):
    """load_state_dict(strict=True), with a mismatch reported as one line naming the checkpoint."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"checkpoint {path} does not fit this {what} ({first[:200]})") from None
