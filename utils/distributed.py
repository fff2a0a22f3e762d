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
        init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def init_process_group(backend: str, **kwargs):
    """dist.init_process_group, torch._dynamo imported first. Imported after it (the first optimizer.step
    imports it), torch._dynamo keeps references to the process group that destroy_process_group does not
    drop (torch 2.14), so gloo's worker threads outlive it; one that releases a finished collective's
    tensors while the interpreter finalizes takes the GIL, is ended, and aborts the process ("terminate
    called without an active exception", SIGABRT, about 1 exit in 100) after its work is done."""
    import torch._dynamo  # noqa: F401
    dist.init_process_group(backend, **kwargs)


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


# ----------------------------------------------------------------------------------------------
# Modules trained outside DistributedDataParallel (the MI estimators: several entry points per step)

def average_gradients_before_each_step(optimizer):
    """Under torchrun: before every optimizer.step(), average the optimizer's gradients over the processes,
    as DistributedDataParallel would (it syncs only what its own forward saw, and the estimators are
    called through their heads). A parameter no process gave a gradient keeps none, so the optimizer
    skips it as in a single process; one that only some processes reached counts as zero on the others."""
    if not dist.is_initialized():
        return
    parameters = [p for group in optimizer.param_groups for p in group["params"]]

    def hook(optimizer, args, kwargs):
        present = torch.tensor([p.grad is not None for p in parameters], dtype=torch.float32,
                               device=parameters[0].device)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in parameters] + [present])
        dist.all_reduce(flat)
        flat[:-len(parameters)] /= world_size()
        offset = 0
        for p, reached in zip(parameters, flat[-len(parameters):].tolist()):
            size = p.numel()
            p.grad = flat[offset:offset + size].view_as(p).to(p.dtype) if reached else None
            offset += size

    optimizer.register_step_pre_hook(hook)


def broadcast_from_main(module):
    """Rank 0's parameters and buffers on every process (BatchNorm running statistics drift apart per
    process: each normalises its own shard)."""
    if dist.is_initialized():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, 0)


def check_in_sync(module, what: str, device):
    """A UserError on every process if their copies of the module's parameters differ (the gradients
    were not averaged): training on would silently save rank 0's half of the data only."""
    if not dist.is_initialized():
        return
    total = torch.stack([p.detach().double().sum() for p in module.parameters()]).sum().reshape(1).to(device)
    spread = torch.cat([total, -total])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    if float(spread[0] + spread[1]) > 1e-6 * max(1.0, abs(float(total))):
        raise UserError(f"the processes' {what} have drifted apart: their gradients are not averaged")


def interleave_shards(local: torch.Tensor) -> torch.Tensor:
    """The per-item values of the every-world_size-th shards (make_loader without shuffling) of all
    processes, put back in the dataset's order: item i came from rank i % world_size."""
    if not dist.is_initialized():
        return local
    shards = gather_from_all(local.cpu())
    total = sum(len(shard) for shard in shards)
    merged = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for index, shard in enumerate(shards):
        merged[index::world_size()] = shard
    return merged


def gather_from_all(obj) -> list:
    """Every process's obj (any picklable object), in rank order, on every process; [obj] in a single
    process. A collective: every process must call it, in the same order, a process with nothing to send
    included (it sends an empty list)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def main_process_first(load):
    """load() on rank 0, then on the other processes (rank 0 may download or unpack files they then read)."""
    if not is_main():
        barrier()
    result = load()
    if is_main():
        barrier()
    return result
