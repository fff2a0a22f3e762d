"""utils/distributed.py's helpers for modules trained outside DistributedDataParallel, in 2 real gloo processes."""
import os

import torch
import torch.multiprocessing as mp

from utils import distributed
from utils.errors import UserError


def _worker(rank, init_file, results):
    distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)  # different initial weights on purpose: broadcast_from_main makes them rank 0's
        module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2), torch.nn.Linear(2, 1))
        distributed.broadcast_from_main(module)
        optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
        distributed.average_gradients_before_each_step(optimizer)
        x = torch.full((4, 3), float(rank + 1))  # each process its own data: its own gradient
        module[0](x).sum().backward()  # only the first layer takes part: the others must keep no gradient
        grad_before = module[0].weight.grad.clone()
        optimizer.step()
        results[rank] = {"grad_before": grad_before, "grad_after": module[0].weight.grad.clone(),
                         "untouched_grad": module[2].weight.grad, "weights": [p.detach().clone() for p in module.parameters()],
                         "interleaved": distributed.interleave_shards(torch.arange(rank, 5, 2))}
        distributed.check_in_sync(module, "test module", torch.device("cpu"))
        if rank == 1:
            with torch.no_grad():
                module[0].bias += 1.0
        try:
            distributed.check_in_sync(module, "test module", torch.device("cpu"))
            results[f"drift{rank}"] = "not detected"
        except UserError as error:
            results[f"drift{rank}"] = str(error)
    finally:
        distributed.cleanup()
    results[f"gloo_threads{rank}"] = _gloo_threads()


def _gloo_threads() -> list:
    """The names of this process's gloo threads (the process group's workers and its transport loop)."""
    names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    return [name for name in names if "gloo" in name]


def test_gradients_are_averaged_and_drift_is_caught(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
        results = dict(results)
    zero, one = results[0], results[1]
    # each process's own gradient is its data times 1 (4 rows), so the average is (1 + 2) / 2 * 4
    assert torch.allclose(zero["grad_before"], torch.full((2, 3), 4.0)) and torch.allclose(one["grad_before"], torch.full((2, 3), 8.0))
    assert torch.allclose(zero["grad_after"], torch.full((2, 3), 6.0)) and torch.allclose(one["grad_after"], torch.full((2, 3), 6.0))
    assert zero["untouched_grad"] is None and one["untouched_grad"] is None
    assert all(torch.equal(a, b) for a, b in zip(zero["weights"], one["weights"]))
    # item i of range(5) came from rank i % 2 (make_loader's unshuffled shards)
    assert zero["interleaved"].tolist() == list(range(5)) == one["interleaved"].tolist()
    assert "drifted apart" in results["drift0"] and "drifted apart" in results["drift1"]
    # cleanup() stopped the process group's threads: one left running into the interpreter's finalization
    # aborts the process now and then (utils.distributed.init_process_group)
    assert results["gloo_threads0"] == [] and results["gloo_threads1"] == []
