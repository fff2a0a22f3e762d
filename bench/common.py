"""Timing helpers and the command line shared by the bench/ scripts."""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from utils.runtime import package_versions  # noqa: E402


def seconds_of(fn, device) -> float:
    """Wall time of one fn() call (CUDA synchronised)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def median_seconds(fn, repeats: int, device) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up call (CUDA synchronised)."""
    fn()
    return statistics.median(seconds_of(fn, device) for _ in range(repeats))


def interleaved_medians(baseline, other, repeats: int, device) -> tuple:
    """Median seconds of baseline() and other(), and the median of their per-round ratios other / baseline,
    the two timed alternately in each of `repeats` rounds after one warm-up each: a change of machine load
    then falls on both alike instead of on whichever was being timed."""
    baseline(), other()
    pairs = [(seconds_of(baseline, device), seconds_of(other, device)) for _ in range(repeats)]
    return (statistics.median(a for a, _ in pairs), statistics.median(b for _, b in pairs),
            statistics.median(b / a for a, b in pairs))


def machine_record(device) -> dict:
    return {"command": "python " + " ".join(sys.argv), "device": str(device),
            "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None},
            "versions": package_versions()}


def target_and_estimators_parser(doc: str) -> argparse.ArgumentParser:
    """The command line of a bench script that measures a stage-1 target with its stage-2 estimators."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--estimators", required=True)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--batch-size", type=int, default=128)
    return parser
