"""Multi-process training under torchrun (DistributedDataParallel): gloo on CPU, nccl on CUDA.

A single process is the default and needs none of this: every helper below is a no-op then.
Under torchrun, --batch-size is the global batch, split evenly over the processes; each process
attacks, selects X' and computes the MI terms on its own shard, which is the single-process math at
the per-process batch size. Only rank 0 writes files and shows progress bars.
"""
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from utils.errors import UserError
from utils.runtime import resolve_device


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_device(device_name: str) -> torch.device:
    """The device this process owns: --device itself in a single process, cuda:LOCAL_RANK under torchrun.

    Everything a process holds (the target, the estimators, the attacks' generators) must be put here:
    a rank that left anything on cuda:0 fails at its first operation that mixes the two."""
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {os.environ['WORLD_SIZE']} processes per node, "
                            f"but only {torch.cuda.device_count()} CUDA devices exist")
        return torch.device("cuda", local_rank)
    if device.type == "mps":
        raise UserError("multi-process training is not supported on MPS; use --device cpu or cuda")
    return device


def setup(device_name: str) -> torch.device:
    """process_device(device_name); under torchrun also makes it the current CUDA device and joins the
    process group (once)."""
    device = process_device(device_name)
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def refuse_torchrun(script: str):
    """For the stages that run as one process: under torchrun every rank would write the same files."""
    if launched_by_torchrun():
        raise UserError(f"{script} runs as a single process; start it with python, not torchrun")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def wrap(model, device):
    """DistributedDataParallel around the model under torchrun; the model itself otherwise."""
    if not dist.is_initialized():
        return model
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    """The plain module (attacks and checkpoints use it, not the DDP wrapper)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def sum_across_processes(values: dict, device) -> dict:
    """Element-wise sum of a dict of floats over all processes (the dict itself when single-process).
    Every process passes the same keys in the same order (they run the same code path)."""
    if not dist.is_initialized() or not values:
        return values
    keys = list(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def any_process(flag: bool, device) -> bool:
    """True if the flag is set on any process (so that all of them stop together)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor)
    return tensor.item() > 0


def per_process_batch(batch_size: int) -> int:
    size = world_size()
    if batch_size % size:
        raise UserError(f"--batch-size {batch_size} does not split evenly over {size} processes")
    return batch_size // size


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()
