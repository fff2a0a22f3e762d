"""Shared fixtures: real Fashion-MNIST (Debian's copy) and a briefly trained SmallCNN."""
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    torch.set_num_threads(min(2, os.cpu_count() or 1))


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
