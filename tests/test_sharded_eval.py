"""Stage 4 under torchrun: the test batches are shared out over the processes, and rank 0 writes the very
results a single process writes, example for example (only the seconds differ)."""
import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import test_comparison
from models import build_model
from tests.conftest import REPO
from utils.data import dataset_info
from utils.evaluation import build_attacks, run_attack, run_transfer, shard_of_batches, sharded_loader

INFO = dataset_info("fashion-mnist")
CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Which process gets which batch, and what a batch's adversarials depend on (in one process, fast)

def test_batches_are_dealt_round_robin_and_cover_every_example_once():
    shards = [shard_of_batches(45, 10, rank, 2) for rank in range(2)]
    assert list(shards[0]) == [0, 2, 4] and list(shards[1]) == [1, 3]
    assert shards[0][4] == list(range(40, 45))  # the last batch is the short one
    examples = sorted(i for shard in shards for batch in shard.values() for i in batch)
    assert examples == list(range(45))
    assert shard_of_batches(45, 10) == {b: list(range(10 * b, min(10 * b + 10, 45))) for b in range(5)}
    assert shard_of_batches(15, 10, rank=2, world_size=3) == {}  # more processes than batches


def test_a_sharded_loader_reads_its_own_batches_and_knows_their_indices():
    x = torch.arange(45.0).view(45, 1, 1, 1)
    dataset = TensorDataset(x, torch.zeros(45, dtype=torch.long))
    loader = sharded_loader(dataset, 10, rank=1, world_size=2)
    assert loader.batch_indices == [1, 3] and len(loader) == 2
    assert [batch.flatten().tolist() for batch, _ in loader] == [list(range(10, 20)), list(range(30, 40))]
    assert list(sharded_loader(dataset, 10, rank=5, world_size=6)) == []


def adversarials_by_batch(model, attack, dataset, rank, world_size):
    """{batch index: the adversarials crafted for it} when one process evaluates its shard of the dataset."""
    crafted = []
    def craft(*inputs):
        output = attack.craft(*inputs)
        crafted.append(output.x_adv)
        return output
    recording = dataclasses.replace(attack, craft=craft)
    loader = sharded_loader(dataset, 10, rank=rank, world_size=world_size)
    if attack.white_box:
        run_attack(model, recording, loader, CPU, False, seed=3, desc=attack.name)
    else:  # crafted on the surrogate, here the model itself
        run_transfer(model, [model], recording, loader, CPU, False, seed=3)
    return dict(zip(loader.batch_indices, crafted))


@pytest.mark.parametrize("name", ["pgd", "tidim", "transfer"])  # their generator (pgd, transfer), the global RNG
def test_a_batch_gets_the_same_adversarials_whichever_process_attacks_it(name):
    """Bit for bit, whether one process attacks all 5 batches or two processes share them out. (The
    end-to-end tests below compare robust flags, which on the tiny target hardly depend on the random
    draws; this test compares the adversarials themselves.)"""
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1, 28, INFO.mean, INFO.std).eval()
    last_layer = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    torch.nn.init.normal_(last_layer.weight)  # SmallCNN's initial zero last layer would give no input gradient
    x = torch.rand(10, 1, 28, 28).repeat(5, 1, 1, 1)  # the same 10 images in each of the 5 batches
    dataset = TensorDataset(x, torch.randint(0, 10, (10,)).repeat(5))
    args = test_comparison.resolve_settings(test_comparison.build_parser().parse_args(
        ["--checkpoints", "unused.pt", "--surrogate", "unused.pt", "--pgd-steps", "2", "--tidim-steps", "3"]), INFO)
    attack = build_attacks([name], args, 10)[0]
    whole = adversarials_by_batch(model, attack, dataset, 0, 1)
    shared_out = {**adversarials_by_batch(model, attack, dataset, 0, 2),
                  **adversarials_by_batch(model, attack, dataset, 1, 2)}
    assert sorted(whole) == sorted(shared_out) == [0, 1, 2, 3, 4]
    assert all(torch.equal(whole[b], shared_out[b]) for b in whole)
    assert any(not torch.equal(whole[0], whole[b]) for b in range(1, 5)), "each batch must draw its own random numbers"


# ----------------------------------------------------------------------------------------------
# test_comparison.py under torchrun, 2 gloo processes

def evaluate_in_one_process(fmnist_dir, out_dir, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process: kernels can round differently per thread count
    try:
        assert test_comparison.main(["--data-dir", str(fmnist_dir), "--device", "cpu", "--out-dir", str(out_dir),
                                     *args]) == 0
    finally:
        torch.set_num_threads(threads)


def evaluate_in_two_processes(fmnist_dir, out_dir, *args):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "test_comparison.py"), "--data-dir", str(fmnist_dir), "--device", "cpu",
                             "--out-dir", str(out_dir), *args],
                            cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def without_seconds(value):
    if isinstance(value, dict):
        return {key: without_seconds(item) for key, item in value.items() if key != "seconds"}
    return value


def assert_same_results(single_dir, sharded_dir):
    single, sharded = (json.loads((folder / "results.json").read_text()) for folder in (single_dir, sharded_dir))
    assert single["processes"] == 1 and sharded["processes"] == 2 and sharded["complete"]
    assert [without_seconds(m) for m in sharded["models"]] == [without_seconds(m) for m in single["models"]]
    for key in ("test_indices", "attacks", "columns", "warnings"):
        assert sharded[key] == single[key], key
    assert (sharded_dir / "results.csv").read_text() == (single_dir / "results.csv").read_text()
    seconds = re.compile(r"; [0-9.]+ s in all")
    markdown = [seconds.sub("", (folder / "results.md").read_text()) for folder in (single_dir, sharded_dir)]
    assert markdown[0] == markdown[1]
    return single


def test_two_processes_write_the_single_process_results(tiny_target, fmnist_dir, tmp_path):
    """5 batches over 2 processes (3 and 2), two rows, PGD (its own generator), TI-DIM (the global RNG) and
    the transfer attack: every per-example flag, accuracy, budget check and worst case as in one process."""
    args = ["--checkpoints", str(tiny_target), str(tiny_target), "--surrogate", str(tiny_target), "--test-limit", "50",
            "--batch-size", "10", "--attacks", "pgd", "tidim", "transfer", "--pgd-steps", "3", "--tidim-steps", "3"]
    evaluate_in_one_process(fmnist_dir, tmp_path / "single", *args)
    sharded = evaluate_in_two_processes(fmnist_dir, tmp_path / "sharded", *args)
    results = assert_same_results(tmp_path / "single", tmp_path / "sharded")
    assert len(results["models"]) == 2 and len(results["models"][0]["clean"]["per_example"]) == 50
    for name, entry in results["models"][0]["attacks"].items():  # the comparison says something: flags of both kinds
        assert "0" in entry["per_example"] and "1" in entry["per_example"], (name, entry["per_example"])
        assert entry["budget"] and entry["batches_outside_budget"] == 0
    # Only rank 0 reports: the progress lines and the table once, as in a single process.
    assert sharded.stdout.count("results in ") == 1
    assert sharded.stdout.count(": clean ") == 2


def test_a_process_without_batches_takes_part_all_the_same(tiny_target, fmnist_dir, tmp_path):
    args = ["--checkpoints", str(tiny_target), "--surrogate", str(tiny_target), "--test-limit", "20",
            "--batch-size", "32", "--attacks", "pgd", "transfer", "--pgd-steps", "2"]  # one batch: rank 1 has none
    evaluate_in_one_process(fmnist_dir, tmp_path / "single", *args)
    evaluate_in_two_processes(fmnist_dir, tmp_path / "sharded", *args)
    assert_same_results(tmp_path / "single", tmp_path / "sharded")


def test_bad_input_under_torchrun_stops_every_process(tiny_target, tmp_path):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "test_comparison.py"), "--checkpoints", str(tiny_target), "--device", "cpu",
                             "--attacks", "transfer", "--out-dir", str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "needs --surrogate" in result.stderr, result.stderr[-2000:]
