"""Shared fixtures: real Fashion-MNIST (Debian's copy), a synthetic CIFAR-10, and a briefly trained SmallCNN."""
import pickle
from pathlib import Path

import numpy as np

import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent
CIFAR_PER_CLASS_PER_BATCH = 2  # 5 batches x 10 classes x 2 = 100 training images, 10 per class
CIFAR_TEST_PER_CLASS = 3


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    """A data folder holding Fashion-MNIST in torchvision's layout (unpacked from Debian's package)."""
    if not FMNIST_SYSTEM_DIR.is_dir():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    from utils.data import load_splits
    data_dir = tmp_path_factory.mktemp("data")
    load_splits("fashion-mnist", data_dir, val_size=0, train_limit=10, test_limit=10)
    return data_dir


@pytest.fixture(scope="session")
def fmnist_batches(fmnist_dir):
    """(train_x, train_y, test_x, test_y): 3000 training and 500 test images in [0, 1]."""
    from utils.data import load_splits
    splits = load_splits("fashion-mnist", fmnist_dir, val_size=0, train_limit=3000, test_limit=500, seed=0)
    def stack(dataset):
        xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(xs), torch.tensor(ys)
    return (*stack(splits.train), *stack(splits.test))


@pytest.fixture(scope="session")
def trained_small_cnn(fmnist_batches):
    """A SmallCNN trained cleanly for 3 epochs on 3000 Fashion-MNIST images (about 75-80 % test accuracy)."""
    from models import build_model
    from utils.data import dataset_info
    info = dataset_info("fashion-mnist")
    torch.manual_seed(0)
    model = build_model("small-cnn", info.num_classes, info.in_channels, info.image_size, info.mean, info.std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_x, train_y, _, _ = fmnist_batches
    model.train()
    for _ in range(3):
        for i in torch.randperm(len(train_x)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(train_x[i]), train_y[i]).backward()
            optimizer.step()
    return model.eval()


def _cifar_batch(per_class: int, rng: np.random.Generator) -> dict:
    """One CIFAR pickle batch: 'data' uint8 (N, 3072) in CHW order and 'labels'."""
    labels = [c for c in range(10) for _ in range(per_class)]
    images = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
    return {"data": images, "labels": labels}


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """A small CIFAR-10 in torchvision's pickle layout under tmp_path.

    torchvision md5-checks every batch file and batches.meta against the real archive's checksums
    each time a CIFAR10 is built, which synthetic files cannot pass; checking existence only is enough here.
    """
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: Path(path).is_file())
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", _no_network)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", _cifar_batch(CIFAR_PER_CLASS_PER_BATCH, rng))
    _pickle(folder / "test_batch", _cifar_batch(CIFAR_TEST_PER_CLASS, rng))
    _pickle(folder / "batches.meta", {"label_names": [f"class{c}" for c in range(10)]})
    return tmp_path


def _pickle(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _no_network(*args, **kwargs):
    raise AssertionError("tried to download although the files are present")


@pytest.fixture(scope="session")
def tiny_target(fmnist_dir, tmp_path_factory):
    """A stage-1 run folder (train_standard.py, 2 epochs on 400 Fashion-MNIST images): returns best.pt's path."""
    import train_standard
    model_dir = tmp_path_factory.mktemp("target") / "run"
    train_standard.main(["--dataset", "fashion-mnist", "--data-dir", str(fmnist_dir), "--train-limit", "400",
                         "--val-size", "100", "--test-limit", "100", "--epochs", "2", "--batch-size", "50",
                         "--num-steps", "3", "--eval-steps", "3", "--warmup-epochs", "0", "--eps-ramp-epochs", "0",
                         "--lr", "0.05", "--device", "cpu", "--model-dir", str(model_dir)])
    return model_dir / "best.pt"


def _tiny_estimators(fmnist_dir, tiny_target, model_dir, module):
    module.main(["--target-model", str(tiny_target), "--data-dir", str(fmnist_dir), "--train-limit", "200",
                 "--val-size", "100", "--test-limit", "100", "--batch-size", "50", "--hsize", "32", "--num-steps", "2",
                 "--epochs", "1", "--device", "cpu", "--model-dir", str(model_dir)])
    return model_dir / "estimators.pt"


@pytest.fixture(scope="session")
def tiny_estimators(fmnist_dir, tiny_target, tmp_path_factory):
    """estimators.pt of a 1-epoch train_MI_estimator.py run (hsize 32) on the tiny target."""
    import train_MI_estimator
    return _tiny_estimators(fmnist_dir, tiny_target, tmp_path_factory.mktemp("estimators") / "run", train_MI_estimator)


@pytest.fixture(scope="session")
def tiny_only_max_estimators(fmnist_dir, tiny_target, tmp_path_factory):
    import train_MI_estimator_only_max
    return _tiny_estimators(fmnist_dir, tiny_target, tmp_path_factory.mktemp("only_max") / "run",
                            train_MI_estimator_only_max)
