"""The fast path (README, "Speed"): each option computes what the plain path computes, the stage scripts
use and record it, and bench/gpu_speed.py runs every option path at tiny size on the CPU.

channels_last, the compiled PGD update and bf16 change results by float rounding at most (bf16's for
amp); the device-resident data and the deferred read-backs change nothing at all, and are tested for
bit-identical batches, weights and metrics."""
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import train_standard
import utils.training as training_module
from models import build_model
from tests.conftest import REPO
from tests.helpers import assert_one_line_error, read_metrics, run_script
from tests.test_data import fake_tiny_imagenet  # noqa: F401  (a fixture)
from tests.test_train_standard import small_args
from utils import data
from utils.attacks import PGDConfig, compile_attack_step, pgd_attack
from utils.errors import UserError
from utils.losses import OBJECTIVES
from utils.runtime import FastPath, resolve_fast_path
from utils.training import NonFiniteLoss, evaluate, make_adversarial_step, prepare_model, train_epoch

BENCH = REPO / "bench" / "gpu_speed.py"
PLAIN = ["--no-channels-last", "--no-device-data"]


def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def same_batches(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def without_seconds(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def last_weights(model_dir):
    return torch.load(model_dir / "last.pt", weights_only=True)["model"]


# ---------------------------------------------------------------------------------------------------------
# Device-resident data: the host loader's batches, bit for bit


def host_and_device_batches(split, augmentation, **loader_args):
    """The batches of make_loader over a split and over its DeviceImages, each from the same global RNG
    state, and the RNG states after each (the augmentation draws from it)."""
    torch.manual_seed(11)
    host = batches(data.make_loader(split, 16, **loader_args))
    host_state = torch.get_rng_state()
    torch.manual_seed(11)
    device = batches(data.make_loader(data.DeviceImages.from_split(split, "cpu", augmentation), 16, **loader_args))
    return host, device, host_state, torch.get_rng_state()


@pytest.mark.parametrize("loader_args", [dict(shuffle=True, seed=3, epoch=1), dict(shuffle=False),
                                         dict(shuffle=True, seed=3, epoch=2, rank=1, world_size=2),
                                         dict(shuffle=False, rank=1, world_size=2)])
def test_device_images_serve_the_host_loaders_cifar_batches(fake_cifar10, loader_args):
    """Random crop and flip on the device: the same images as torchvision's transforms, the same RNG draws."""
    splits = data.load_splits("cifar10", fake_cifar10, val_size=10)
    host, device, host_state, device_state = host_and_device_batches(splits.train, splits.augmentation, **loader_args)
    assert same_batches(host, device) and sum(len(y) for _, y in host) > 0
    assert torch.equal(host_state, device_state), "the device path drew other random numbers than the host path"
    plain = data.load_splits("cifar10", fake_cifar10, val_size=10, augment=False)
    torch.manual_seed(11)
    assert not same_batches(host, batches(data.make_loader(plain.train, 16, **loader_args))), "nothing was augmented"


def test_device_images_serve_the_host_loaders_svhn_batches(tmp_path, monkeypatch):
    """SVHN crops without flipping (a mirrored digit is another digit): another draw sequence."""
    scipy_io = pytest.importorskip("scipy.io")
    import numpy as np
    import torchvision
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda path, md5=None: Path(path).is_file())
    rng = np.random.default_rng(2)
    for split, per_class in (("train", 4), ("test", 2)):
        labels = np.array([d for d in range(1, 11) for _ in range(per_class)], dtype=np.uint8)
        images = rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8)
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": images, "y": labels[:, None]})
    splits = data.load_splits("svhn", tmp_path, val_size=10, test_limit=10)
    assert splits.augmentation == data.Augmentation(2, flip=False)
    host, device, host_state, device_state = host_and_device_batches(splits.train, splits.augmentation, shuffle=True)
    assert same_batches(host, device) and torch.equal(host_state, device_state)


def test_device_images_serve_the_host_loaders_fashion_mnist_batches(fmnist_dir):
    splits = data.load_splits("fashion-mnist", fmnist_dir, val_size=50, train_limit=100, test_limit=30)
    assert splits.augmentation is None
    for split, shuffle in ((splits.train, True), (splits.val, False), (splits.test, False)):
        host, device, _, _ = host_and_device_batches(split, None, shuffle=shuffle, seed=1)
        assert same_batches(host, device)


def test_crop_and_flip_is_torchvisions_crop_then_flip():
    """Against torchvision's functional crop and hflip of the zero-padded image, offset by offset."""
    import torchvision.transforms.functional as TF
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    draws = torch.tensor([[0, 4, 8, 2, 3, 8], [8, 0, 4, 5, 1, 8], [0, 1, 1, 0, 1, 0]])
    out = data.crop_and_flip(images, draws, padding=4)
    for image, (top, left, flip), result in zip(images, draws.T.tolist(), out):
        expected = TF.crop(F.pad(image, (4, 4, 4, 4)), top, left, 8, 8)
        assert torch.equal(result, TF.hflip(expected) if flip else expected)


def test_a_dataset_read_from_files_stays_on_the_host_loader(fake_tiny_imagenet, tmp_path):  # noqa: F811
    splits = data.load_splits("tiny-imagenet", fake_tiny_imagenet, val_size=3, train_limit=6)
    assert not data.holds_arrays(splits.train)
    with pytest.raises(UserError, match="read image by image from its files"):
        data.DeviceImages.from_split(splits.train, "cpu")
    args = Namespace(dataset="tiny-imagenet", workers=0, amp=None, channels_last=None, device_data=None, compile=None)
    assert not resolve_fast_path(args, torch.device("cpu"), device_data_possible=False).device_data
    result = run_script("train_standard.py", ["--dataset", "tiny-imagenet", "--data-dir", str(fake_tiny_imagenet),
                                              "--val-size", "3", "--device-data", "--device", "cpu",
                                              "--model-dir", str(tmp_path / "run")])
    assert_one_line_error(result, "--device-data: tiny-imagenet is read image by image")


# ---------------------------------------------------------------------------------------------------------
# Which options are on, where


def fast_args(**given):
    return Namespace(**{"dataset": "cifar10", "arch": "resnet18", "workers": 0, "amp": None, "channels_last": None,
                        "device_data": None, "compile": None, **given})


@pytest.mark.parametrize("device,arch,expected", [
    ("cuda", "resnet18", FastPath(amp=True, channels_last=True, device_data=True, compile=False)),
    ("cuda", "small-cnn", FastPath(amp=True, channels_last=True, device_data=True, compile=False)),
    ("cpu", "small-cnn", FastPath(amp=False, channels_last=True, device_data=True, compile=False)),
    ("cpu", "resnet18", FastPath(amp=False, channels_last=False, device_data=True, compile=False)),
    ("mps", "small-cnn", FastPath(amp=False, channels_last=False, device_data=True, compile=False)),
])
def test_the_documented_defaults(device, arch, expected):
    assert resolve_fast_path(fast_args(arch=arch), torch.device(device), device_data_possible=True) == expected


def test_given_flags_win_and_amp_stays_cuda_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    given = fast_args(amp=False, channels_last=False, device_data=False, compile=True)
    assert resolve_fast_path(given, cuda, True) == FastPath(amp=False, channels_last=False, device_data=False, compile=True)
    assert not resolve_fast_path(fast_args(amp=True), cpu, True).amp  # autocast is CUDA-only, as --amp always was
    assert not resolve_fast_path(fast_args(workers=2), cuda, True).device_data  # --workers asks for the host loader
    with pytest.raises(UserError, match="--workers has nothing to do"):
        resolve_fast_path(fast_args(workers=2, device_data=True), cuda, True)


def test_the_stage_scripts_use_and_record_the_cpu_defaults(fmnist_dir, tmp_path, monkeypatch):
    seen = {}
    original_prepare, original_loader = training_module.prepare_model, training_module.make_loader

    def spy_prepare(model, fast, *args, **kwargs):
        seen["model"] = original_prepare(model, fast, *args, **kwargs)
        return seen["model"]

    def spy_loader(dataset, *args, **kwargs):
        seen.setdefault("datasets", []).append(type(dataset).__name__)
        return original_loader(dataset, *args, **kwargs)
    monkeypatch.setattr(training_module, "prepare_model", spy_prepare)
    monkeypatch.setattr(training_module, "make_loader", spy_loader)
    train_standard.main(small_args(fmnist_dir, tmp_path / "run", "--epochs", "1"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["fast_path"] == {"amp": False, "channels_last": True, "device_data": True, "compile": False}
    assert config["args"]["channels_last"] is None  # what was asked: the device's default
    conv = seen["model"].net.feature_extractor.conv2.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert set(seen["datasets"]) == {"DeviceImages"}


def test_device_data_and_workers_together_give_one_line(fmnist_dir, tmp_path):
    result = run_script("train_standard.py", small_args(fmnist_dir, tmp_path / "run", "--device-data", "--workers", "2"))
    assert_one_line_error(result, "--workers has nothing to do")


# ---------------------------------------------------------------------------------------------------------
# Each option computes what the plain path computes


def test_device_data_trains_bit_identically_on_augmented_colour_data(fake_cifar10, tmp_path):
    def args(model_dir, *extra):
        return ["--dataset", "cifar10", "--data-dir", str(fake_cifar10), "--arch", "small-cnn", "--val-size", "20",
                "--test-limit", "20", "--epochs", "2", "--batch-size", "16", "--num-steps", "2", "--eval-steps", "2",
                "--no-channels-last", "--device", "cpu", "--model-dir", str(model_dir), *extra]
    train_standard.main(args(tmp_path / "host", "--no-device-data"))
    train_standard.main(args(tmp_path / "device", "--device-data"))
    host, device = last_weights(tmp_path / "host"), last_weights(tmp_path / "device")
    assert all(torch.equal(host[k], device[k]) for k in host)
    assert without_seconds(read_metrics(tmp_path / "host")) == without_seconds(read_metrics(tmp_path / "device"))


def test_channels_last_trains_alike_up_to_float_rounding(fmnist_dir, tmp_path):
    train_standard.main(small_args(fmnist_dir, tmp_path / "plain", "--epochs", "2", *PLAIN))
    train_standard.main(small_args(fmnist_dir, tmp_path / "fast", "--epochs", "2", "--channels-last", "--device-data"))
    plain, fast = last_weights(tmp_path / "plain"), last_weights(tmp_path / "fast")
    assert max((plain[k] - fast[k]).abs().max().item() for k in plain) < 1e-2
    for a, b in zip(read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fast")):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=1e-3)
        for key in ("train_clean_acc", "train_adv_acc", "val_clean_acc", "val_pgd_acc", "test_pgd_acc"):
            assert abs(float(a[key]) - float(b[key])) <= 0.03, key  # at most 3 of 100 images flip


def relative_error(grads, reference) -> float:
    """|g - r| / |r| over every parameter's gradient at once."""
    g, r = (torch.cat([t.double().flatten() for t in ts]) for ts in (grads, reference))
    return ((g - r).norm() / r.norm()).item()


@pytest.mark.parametrize("arch", ["small-cnn", "resnet18"])
def test_a_channels_last_step_matches_the_plain_step(arch):
    """Same weights, batch and attack seed: the same adversarials and loss up to rounding, and training
    gradients as close to the float64 ones as float32 gets. (On a random ResNet-18 in train mode, a
    rounding difference can flip a ReLU whose input is near 0: over three seeds the plain path's float32
    gradients were up to 0.7 % from float64, channels_last's up to 0.9 %; a miscomputation is ~100 %.)"""
    torch.manual_seed(0)
    plain = build_model(arch, 10, 3, 32, (0.5,) * 3, (0.25,) * 3, width=16)
    if arch == "small-cnn":
        with torch.no_grad():  # SmallCNN starts with a zero last layer: no input gradient, nothing to compare
            plain.net.classifier.fc3.weight.normal_(0, 0.1)
    fast = prepare_model(build_model(arch, 10, 3, 32, (0.5,) * 3, (0.25,) * 3, width=16), FastPath(channels_last=True))
    fast.load_state_dict(plain.state_dict())
    reference = build_model(arch, 10, 3, 32, (0.5,) * 3, (0.25,) * 3, width=16).double()
    reference.load_state_dict(plain.state_dict())
    assert fast.state_dict().keys() == plain.state_dict().keys()
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 10, (16,))
    attack = PGDConfig("linf", 8 / 255, 2 / 255, 5)
    adversarials = [pgd_attack(model, x, y, attack, torch.Generator().manual_seed(4)) for model in (plain, fast)]
    # a pixel whose gradient is ~0 may take the other sign: allow a few, each at most 2 steps away
    assert (adversarials[0] != adversarials[1]).float().mean() < 0.01
    assert (adversarials[0] - adversarials[1]).abs().max() <= 2 * 2 / 255 + 1e-6
    losses, grads = [], []
    for model, x_adv in ((plain, adversarials[0]), (fast, adversarials[0]), (reference, adversarials[0].double())):
        loss = F.cross_entropy(model.train()(x_adv), y)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad for p in model.parameters()])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert relative_error(grads[0], grads[2]) < 0.02 and relative_error(grads[1], grads[2]) < 0.02


def test_channels_last_is_refused_where_onednn_computes_wrong_gradients(fmnist_dir, tmp_path):
    """A 1x1 stride-2 convolution of fewer than 16 channels (ResNet-18's shortcut at --width 4) crashed the
    CPU backward here, and gives wrong weight gradients elsewhere (uxlfoundation/oneDNN#6035)."""
    with pytest.raises(UserError, match="net.layer2.0.shortcut.0, a 1x1 stride-2 convolution of 4 input channels"):
        prepare_model(build_model("resnet18", 10, 1, 28, (0.5,), (0.5,), width=4), FastPath(channels_last=True))
    prepare_model(build_model("resnet18", 10, 1, 28, (0.5,), (0.5,), width=16), FastPath(channels_last=True))
    with pytest.raises(UserError, match="--channels-last on the CPU"):
        train_standard.main(small_args(fmnist_dir, tmp_path / "run", "--arch", "resnet18", "--width", "4",
                                       "--channels-last"))
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------------
# PGD: no host read-back, and the compiled update


class HostRead(AssertionError):
    pass


def forbid_host_reads(monkeypatch):
    """Every way Python code reads a tensor's value back to the host (on a GPU: a synchronisation) raises."""
    def refuse(*args, **kwargs):
        raise HostRead("a tensor's value was read back to the host")
    for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("norm,epsilon", [("linf", 0.1), ("l2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "cw", "kl"])
def test_pgd_reads_nothing_back_to_the_host(norm, epsilon, loss, monkeypatch):
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    generator = torch.Generator().manual_seed(0)
    forbid_host_reads(monkeypatch)
    pgd_attack(model, x, y, PGDConfig(norm, epsilon, epsilon / 4, 3, loss=loss), generator)


def counting_backend(compilations):
    def backend(graph, example_inputs):
        compilations.append(graph)
        return graph.forward
    return backend


@pytest.mark.parametrize("norm,epsilon", [("linf", 0.1), ("l2", 1.0)])
def test_the_compiled_update_gives_the_same_adversarials_and_an_epsilon_ramp_does_not_recompile(norm, epsilon):
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,))
    with torch.no_grad():
        model.net.classifier.fc3.weight.normal_(0, 0.1)  # SmallCNN starts with a zero last layer: no gradient
    compiled = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,))
    compiled.load_state_dict(model.state_dict())
    compilations = []
    compile_attack_step(compiled, counting_backend(compilations))
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for scale in (0.2, 0.4, 0.6, 0.8, 1.0):  # an epsilon ramp: five budgets
        config = PGDConfig(norm, epsilon * scale, epsilon * scale / 4, 3)
        eager = pgd_attack(model, x, y, config, torch.Generator().manual_seed(1))
        fast = pgd_attack(compiled, x, y, config, torch.Generator().manual_seed(1))
        assert torch.allclose(eager, fast, atol=1e-6) and not torch.equal(eager, x)
    assert len(compilations) == 1, f"{len(compilations)} compilations of one update for one batch shape"


def test_the_inductor_compiled_update_matches_eager_pgd():
    """The real backend on a tiny model (the C++ kernel takes seconds to build on a CPU)."""
    torch.manual_seed(0)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,))
    with torch.no_grad():
        model.net.classifier.fc3.weight.normal_(0, 0.1)
    compiled = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,))
    compiled.load_state_dict(model.state_dict())
    compile_attack_step(compiled, "inductor")
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    config = PGDConfig("linf", 0.1, 0.025, 3)
    eager = pgd_attack(model, x, y, config, torch.Generator().manual_seed(1))
    fast = pgd_attack(compiled, x, y, config, torch.Generator().manual_seed(1))
    assert torch.allclose(eager, fast, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The epoch loop's read-backs


def tiny_training(seed=0):
    torch.manual_seed(seed)
    model = build_model("small-cnn", 10, 1, 28, (0.5,), (0.5,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    data_generator = torch.Generator().manual_seed(seed + 1)
    loader = [(torch.rand(8, 1, 28, 28, generator=data_generator), torch.randint(0, 10, (8,), generator=data_generator))
              for _ in range(8)]
    attack = PGDConfig("linf", 0.1, 0.025, 2)
    step = make_adversarial_step(model, OBJECTIVES["at"], lambda index: attack, 6.0, generator)
    return model, optimizer, step, loader


RUN_DIR = Namespace(last="last.pt")


def reads_at_batches(monkeypatch, every):
    """Train 8 batches reading back every `every`; return the stats, the weights and the batches after which
    a value was read back to the host."""
    model, optimizer, step, loader = tiny_training()
    current, reads = {"batch": None}, set()

    def counted_step(x, y, index):
        current["batch"] = index
        return step(x, y, index)
    original_item = torch.Tensor.item

    def item(tensor):
        reads.add(current["batch"])
        return original_item(tensor)
    monkeypatch.setattr(torch.Tensor, "item", item)
    stats = train_epoch(model, loader, optimizer, counted_step, torch.device("cpu"), 0, RUN_DIR, readback_every=every)
    monkeypatch.setattr(torch.Tensor, "item", original_item)
    return stats, model.state_dict(), reads


def test_deferred_read_backs_give_the_same_epoch_and_read_only_every_so_often(monkeypatch):
    every_batch, weights, reads = reads_at_batches(monkeypatch, 1)
    assert reads == set(range(8))
    deferred, deferred_weights, deferred_reads = reads_at_batches(monkeypatch, 3)
    assert deferred == every_batch, "reading back later changed the epoch's statistics"
    assert all(torch.equal(weights[k], deferred_weights[k]) for k in weights)
    # after batches 3 and 6 (0-based 2 and 5), and once after the last for the two left
    assert deferred_reads == {2, 5, 7}, f"values were read back after batches {sorted(deferred_reads)}"


def test_a_non_finite_loss_is_reported_at_its_own_batch_when_read_later():
    model, optimizer, step, loader = tiny_training()

    def step_with_nan(x, y, index):
        loss, *rest = step(x, y, index)
        return (loss * float("nan") if index == 1 else loss), *rest
    with pytest.raises(NonFiniteLoss, match="loss became nan at epoch 1, batch 2;"):
        train_epoch(model, loader, optimizer, step_with_nan, torch.device("cpu"), 0, RUN_DIR, readback_every=4)


def test_evaluation_with_deferred_read_backs_counts_alike(monkeypatch):
    model, _, _, loader = tiny_training()
    attack = PGDConfig("linf", 0.1, 0.025, 2)
    every_batch = evaluate(model, loader, attack, torch.device("cpu"), seed=3)
    monkeypatch.setattr(training_module, "readback_interval", lambda device: 3)
    assert evaluate(model, loader, attack, torch.device("cpu"), seed=3) == every_batch


# ---------------------------------------------------------------------------------------------------------
# bench/gpu_speed.py at tiny size, every option path


def run_bench(tmp_path, *flags, timeout=900):
    out = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--images", "24", "--batch", "8",
                             "--steps", "2", "--hsize", "16", "--width", "16", "--at-arch", "--step-batch", "8",
                             "--repeats", "1", "--compile-backend", "aot_eager", "--out", str(out), *flags],
                            cwd=REPO, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    return lines, json.loads(out.read_text())


def test_the_bench_runs_every_option_path_at_tiny_size(tmp_path):
    lines, record = run_bench(tmp_path, "--workloads", "at", "namid", "estimator", "loader", "step",
                              "--arch", "resnet18", "--configs", "plain", "all", "default")
    rows = [line for line in lines if "workload" in line]
    workloads, configs = ("at", "namid", "estimator", "loader", "step"), ("plain", "all", "default")
    assert {(row["workload"], row["config"]) for row in rows} == {(w, c) for w in workloads for c in configs}
    everything = {"amp": True, "channels_last": True, "device_data": True, "compile": True, "no_sync": True}
    for row in rows:
        assert row["seconds"] > 0 and row["images_per_s"] > 0 and row["torch"] == torch.__version__
        expected = {"all": everything, "plain": {option: False for option in everything},
                    "default": {"amp": False, "channels_last": row["arch"] == "small-cnn", "device_data": True,
                                "compile": False, "no_sync": True}}[row["config"]]
        assert row["options"] == expected, row
    steps = {row["config"]: row for row in rows if row["workload"] == "step"}
    assert steps["plain"]["step_speedup_over_plain"] == 1.0 and len(steps["all"]["step_s"]) == 1
    estimator = next(row for row in rows if row["workload"] == "estimator")
    assert estimator["attack_pass_s"] > 0 and estimator["estimator_over_attack"] > 0
    goals = [line for line in lines if "goals" in line]
    assert {goal["goals"] for goal in goals} == {"plain", "all", "default"}
    assert record["results"] == lines and torch.__version__.startswith(record["versions"]["torch"])


def test_the_bench_runs_autoattack_in_bf16_and_channels_last(tmp_path):
    """AutoAttack's Square attack fails on bf16 logits (an index_put of float32 losses into a bf16 buffer):
    the bench gives AutoAttack float32 logits."""
    lines, _ = run_bench(tmp_path, "--workloads", "aa", "--aa-images", "1", "--aa-batch", "1", "--arch", "small-cnn",
                         "--configs", "amp,channels-last")
    row, = lines
    assert row["workload"] == "aa" and 0 <= row["robust_acc"] <= 1 and row["seconds"] > 0 and not row["compiled"]


def test_the_bench_refuses_an_unknown_option(tmp_path):
    result = subprocess.run([sys.executable, str(BENCH), "--device", "cpu", "--configs", "amp,turbo"], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "unknown option(s) turbo" in result.stderr


def test_stage4_evaluates_small_cnn_in_channels_last_on_the_cpu_alike(fmnist_dir, tmp_path):
    """test_comparison's default on the CPU: a SmallCNN checkpoint in channels_last (recorded per model in
    results.json), a ResNet not; --no-channels-last turns it off; the table is the same up to rounding
    (at most one of 40 images flips)."""
    import test_comparison
    train_standard.main(small_args(fmnist_dir, tmp_path / "run", "--epochs", "1"))
    checkpoint = tmp_path / "run" / "best.pt"
    cpu = torch.device("cpu")
    (model, record), = test_comparison.load_models([checkpoint], cpu)
    assert record["channels_last"] is True
    assert model.net.feature_extractor.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    (plain, record), = test_comparison.load_models([checkpoint], cpu, channels_last=False)
    assert record["channels_last"] is False
    assert plain.net.feature_extractor.conv2.weight.is_contiguous()
    x = torch.rand(16, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(model(x), plain(x), atol=1e-4)
    accuracies = {}
    for flag in ("--channels-last", "--no-channels-last"):
        out = tmp_path / flag
        assert test_comparison.main(["--checkpoints", str(checkpoint), "--data-dir", str(fmnist_dir), "--test-limit", "40",
                                     "--attacks", "pgd", "--pgd-steps", "3", "--device", "cpu", "--out-dir", str(out),
                                     flag]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["models"][0]["channels_last"] is (flag == "--channels-last")
        accuracies[flag] = (results["models"][0]["clean"]["accuracy"], results["models"][0]["attacks"]["pgd"]["accuracy"])
    (clean_a, pgd_a), (clean_b, pgd_b) = accuracies.values()
    assert abs(clean_a - clean_b) <= 1 / 40 and abs(pgd_a - pgd_b) <= 1 / 40
    assert test_comparison.default_channels_last(cpu, "resnet18") is False
