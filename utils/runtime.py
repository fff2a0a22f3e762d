"""Device choice, seeding, RNG-state capture for bit-identical resume, and provenance (versions, git commit)."""
import contextlib
import importlib.metadata
import platform
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from utils.errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device that is not present is a UserError."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UserError("device 'mps' asked for, but MPS is not available here")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def attack_generator(seed: int, device: torch.device) -> torch.Generator:
    """The private random stream of the attacks (random starts), separate from the training loop's."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed + 7919)
    return generator


def capture_rng_state(generator: torch.Generator) -> dict:
    """Every random stream a training run draws from, in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "attack": generator.get_state(),
    }


def restore_rng_state(state: dict, generator: torch.Generator):
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["attack"])


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on CUDA when --amp is given; a no-op elsewhere."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class FastPath:
    """The speed options of a training run (README, "Speed"). None changes what is computed beyond float
    rounding, except amp, which runs the target and the attacks in bf16 (the MI estimators stay float32)."""
    amp: bool = False            # bf16 autocast (CUDA)
    channels_last: bool = False  # the model's convolutions in channels_last memory format
    device_data: bool = False    # the data as uint8 on the device, augmented there (utils.data.DeviceImages)
    compile: bool = False        # torch.compile of the model and of the PGD update


def resolve_fast_path(args, device: torch.device, device_data_possible: bool) -> FastPath:
    """The speed options in effect: each flag as given (--amp/--no-amp, ...), else its default here.

    amp: on with CUDA, where bf16 only rounds; never elsewhere (autocast is CUDA-only in this project).
    channels_last: on with CUDA; on the CPU for SmallCNN only, where it was measured faster (a Standard AT
    step with PGD-10, batch 128, 1.2x on one core: bench/results/gpu_speed_cpu.json); off on MPS, where
    nothing was measured.
    device_data: on wherever the dataset is held as arrays (not Tiny ImageNet) and --workers is 0: its
    batches are those of the host loader, bit for bit; --workers N asks for the host loader.
    compile: off unless asked: the first epoch pays minutes of compilation, and it changes results only by
    rounding.
    """
    def given(flag):
        return getattr(args, flag, None)

    cuda = device.type == "cuda"
    device_data = given("device_data")
    if device_data and not device_data_possible:
        raise UserError(f"--device-data: {args.dataset} is read image by image from its files, not held as arrays; "
                        f"drop the flag")
    if device_data and getattr(args, "workers", 0) > 0:
        raise UserError("--device-data serves every batch from the device, so --workers has nothing to do; "
                        "drop one of the two")
    if device_data is None:
        device_data = device_data_possible and getattr(args, "workers", 0) == 0
    amp = given("amp")
    channels_last = given("channels_last")
    if channels_last is None:
        channels_last = default_channels_last(device, getattr(args, "arch", None))
    return FastPath(amp=cuda if amp is None else bool(amp) and cuda, channels_last=channels_last,
                    device_data=device_data, compile=bool(given("compile")))


def default_channels_last(device: torch.device, arch: str) -> bool:
    """channels_last by default: with CUDA, and on the CPU for SmallCNN, where it was measured faster (training
    and evaluation: bench/results/gpu_speed_cpu.json, bench/results/eval_speed_cpu.json)."""
    return device.type == "cuda" or (device.type == "cpu" and arch == "small-cnn")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "numpy", "tqdm", "advertorch", "torchattacks", "autoattack", "pyautoattack"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when the tree has uncommitted changes; 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
