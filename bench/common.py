"""Timing helpers shared by the bench/ scripts."""
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


def median_seconds(fn, repeats: int, device) -> float:
    """Median wall time of fn() over `repeats` calls after one warm-up call (CUDA synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_record(device) -> dict:
    return {"command": "python " + " ".join(sys.argv), "device": str(device),
            "machine": {"processor": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                        "cuda": torch.cuda.get_device_name() if device.type == "cuda" else None},
            "versions": package_versions()}
