"""Tests for utils/data.py on synthetic CIFAR-10 and Tiny ImageNet files and Debian's real Fashion-MNIST."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchvision.datasets.svhn
import torchvision.datasets.utils

from utils import data
from utils.errors import UserError
from tests.conftest import _no_network

TINY_WNIDS = ["n01443537", "n01629819", "n01641577"]
TINY_TRAIN_PER_CLASS = 6
TINY_VAL_PER_CLASS = 2


def _offline(*args, **kwargs):
    from urllib.error import URLError
    raise URLError("[Errno -2] Name or service not known")


def _write_jpeg(path: Path, mode: str, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(path, "JPEG")


@pytest.fixture
def fake_tiny_imagenet(tmp_path):
    """A tiny-imagenet-200 folder with three classes, one greyscale JPEG among the colour ones."""
    root = tmp_path / "tiny-imagenet-200"
    rng = np.random.default_rng(1)
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(reversed(TINY_WNIDS)) + "\n")  # order differs from sorted
    annotations = []
    for wnid in TINY_WNIDS:
        for i in range(TINY_TRAIN_PER_CLASS):
            _write_jpeg(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", "L" if i == 0 else "RGB", rng)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(TINY_VAL_PER_CLASS):
            name = f"val_{wnid}_{i}.JPEG"
            _write_jpeg(root / "val" / "images" / name, "RGB", rng)
            annotations.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return tmp_path


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    """A data folder filled from Debian's Fashion-MNIST (skips when the package is not installed)."""
    if not all((data.DEBIAN_FASHION_MNIST / f"{stem}.gz").is_file() for stem in data._IDX_STEMS):
        pytest.skip(f"Debian's Fashion-MNIST is not installed in {data.DEBIAN_FASHION_MNIST}")
    return tmp_path_factory.mktemp("fashion")


def _check_items(dataset, channels: int, size: int, count: int = 5) -> None:
    """The first items are float (C,H,W) tensors in [0, 1] with int labels."""
    for i in range(min(count, len(dataset))):
        image, label = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (channels, size, size)
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert isinstance(label, int)


def _class_counts(dataset) -> list[int]:
    return sorted(Counter(data.dataset_labels(dataset).tolist()).values())


# ---------------------------------------------------------------------------------------------------------
# Dataset facts


def test_dataset_table():
    assert set(data.DATASETS) == {"cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "tiny-imagenet"}
    for name, info in data.DATASETS.items():
        assert info.name == name and len(info.mean) == len(info.std) == info.in_channels
    assert data.dataset_info("cifar10").epsilon_linf == pytest.approx(8 / 255)
    assert data.dataset_info("mnist").epsilon_linf == 0.3
    assert data.dataset_info("fashion-mnist").epsilon_l2 == 1.5
    assert data.dataset_info("tiny-imagenet").image_size == 64


def test_unknown_dataset_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="cifar10.*fashion-mnist"):
        data.dataset_info("imagenet")
    with pytest.raises(UserError, match="unknown dataset"):
        data.load_splits("cifar-10", tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Class-balanced selection


def test_class_balanced_indices_balance_and_remainder():
    labels = torch.arange(10).repeat(20)  # 10 classes x 20
    picked = data.class_balanced_indices(labels, 23, torch.Generator().manual_seed(0))
    counts = Counter(labels[picked].tolist())
    assert len(picked) == len(set(picked.tolist())) == 23
    assert [counts[c] for c in range(10)] == [3, 3, 3] + [2] * 7  # remainder on the first classes


def test_class_balanced_indices_small_class_gives_way():
    labels = torch.tensor([0] * 2 + [1] * 50 + [2] * 50)
    picked = data.class_balanced_indices(labels, 30, torch.Generator().manual_seed(0))
    counts = Counter(labels[picked].tolist())
    assert [counts[c] for c in range(3)] == [2, 14, 14]


def test_class_balanced_indices_is_seeded():
    labels = torch.arange(10).repeat(100)

    def pick(seed):
        return data.class_balanced_indices(labels, 50, torch.Generator().manual_seed(seed))

    assert torch.equal(pick(3), pick(3))
    assert not torch.equal(pick(3), pick(4))


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10 (synthetic)


def test_cifar10_splits(fake_cifar10):
    splits = data.load_splits("cifar10", fake_cifar10, val_size=20, train_limit=30, test_limit=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 20, 10)
    for split in (splits.train, splits.val, splits.test):
        _check_items(split, 3, 32)
    assert _class_counts(splits.val) == [2] * 10
    assert _class_counts(splits.train) == [3] * 10
    assert _class_counts(splits.test) == [1] * 10
    assert not set(splits.train.indices) & set(splits.val.indices)


def test_val_is_independent_of_train_limit_and_never_overlaps(fake_cifar10):
    full = data.load_splits("cifar10", fake_cifar10, val_size=20)
    limited = data.load_splits("cifar10", fake_cifar10, val_size=20, train_limit=15)
    assert full.val.indices == limited.val.indices
    assert sorted(set(full.train.indices) | set(full.val.indices)) == list(range(100))
    assert not set(limited.train.indices) & set(limited.val.indices)


def test_splits_are_seeded(fake_cifar10):
    def indices(seed):
        splits = data.load_splits("cifar10", fake_cifar10, val_size=20, train_limit=30, test_limit=10, seed=seed)
        return splits.train.indices, splits.val.indices, splits.test.indices

    assert indices(0) == indices(0)
    assert all(a != b for a, b in zip(indices(0), indices(1)))


def test_augmentation_only_on_train(fake_cifar10):
    splits = data.load_splits("cifar10", fake_cifar10, val_size=10)
    assert "RandomCrop" in repr(splits.train.transform) and "RandomHorizontalFlip" in repr(splits.train.transform)
    assert "Random" not in repr(splits.val.transform) + repr(splits.test.transform)
    assert "Normalize" not in repr(splits.train.transform)
    plain = data.load_splits("cifar10", fake_cifar10, val_size=10, augment=False)
    assert torch.equal(plain.train[0][0], plain.train[0][0])


def test_limits_and_sizes(fake_cifar10):
    everything = data.load_splits("cifar10", fake_cifar10, val_size=0, train_limit=10**6, test_limit=10**6)
    assert (len(everything.train), len(everything.val), len(everything.test)) == (100, 0, 30)
    assert len(list(data.make_loader(everything.val, 8, shuffle=True))) == 0
    for bad in ({"train_limit": 0}, {"test_limit": -1}, {"val_size": -1}, {"val_size": 101}, {"val_size": 100}):
        with pytest.raises(UserError):
            data.load_splits("cifar10", fake_cifar10, **bad)


def test_missing_dataset_error_is_one_line_with_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "download", _offline)
    with pytest.raises(UserError) as caught:
        data.load_splits("cifar10", tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "CIFAR-10" in message
    assert [p.name for p in tmp_path.iterdir()] == []  # the failed download left nothing behind


# ---------------------------------------------------------------------------------------------------------
# Loaders


def _batches(dataset, **kwargs):
    return [(x.clone(), y.clone()) for x, y in data.make_loader(dataset, 16, shuffle=True, **kwargs)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_make_loader_order_depends_only_on_seed_and_epoch(fake_cifar10):
    splits = data.load_splits("cifar10", fake_cifar10, val_size=10, augment=False)
    first = _batches(splits.train, seed=5, epoch=2)
    torch.manual_seed(123)  # the global RNG must not matter
    assert _same(first, _batches(splits.train, seed=5, epoch=2))
    assert not _same(first, _batches(splits.train, seed=5, epoch=3))
    assert sum(len(y) for _, y in first) == 90  # drop_last=False


def test_make_loader_workers_make_augmentation_reproducible(fake_cifar10):
    splits = data.load_splits("cifar10", fake_cifar10, val_size=10)
    first = _batches(splits.train, seed=1, epoch=0, workers=2)
    assert _same(first, _batches(splits.train, seed=1, epoch=0, workers=2))
    assert not _same(first, _batches(splits.train, seed=1, epoch=1, workers=2))


def test_make_loader_pins_memory_only_for_cuda(fake_cifar10):
    splits = data.load_splits("cifar10", fake_cifar10, val_size=10)
    assert not data.make_loader(splits.test, 8, shuffle=False, device="cpu").pin_memory
    assert data.make_loader(splits.test, 8, shuffle=False, device=torch.device("cuda")).pin_memory


# ---------------------------------------------------------------------------------------------------------
# SVHN (synthetic)


def test_svhn_labels_and_augmentation(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    # Same reason as for CIFAR: torchvision md5-checks the .mat files against the real ones.
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda path, md5=None: Path(path).is_file())
    rng = np.random.default_rng(2)
    for split, per_class in (("train", 4), ("test", 2)):
        labels = np.array([d for d in range(1, 11) for _ in range(per_class)], dtype=np.uint8)  # SVHN writes 0 as 10
        images = rng.integers(0, 256, size=(32, 32, 3, len(labels)), dtype=np.uint8)
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": images, "y": labels[:, None]})
    splits = data.load_splits("svhn", tmp_path, val_size=10, test_limit=10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    _check_items(splits.train, 3, 32)
    assert sorted(set(data.dataset_labels(splits.test).tolist())) == list(range(10))
    assert "RandomCrop" in repr(splits.train.transform) and "Flip" not in repr(splits.train.transform)


# ---------------------------------------------------------------------------------------------------------
# Tiny ImageNet (synthetic)


def test_tiny_imagenet(fake_tiny_imagenet):
    splits = data.load_splits("tiny-imagenet", fake_tiny_imagenet, val_size=3, train_limit=6)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 3, 6)
    for split in (splits.train, splits.val, splits.test):
        _check_items(split, 3, 64, count=10)
    assert _class_counts(splits.val) == [1, 1, 1] and _class_counts(splits.train) == [2, 2, 2]
    assert not set(splits.train.indices) & set(splits.val.indices)
    # val_annotations.txt's wnids map to the same class numbers as the train folders
    test_labels = data.dataset_labels(splits.test).tolist()
    assert test_labels == [c for c in range(3) for _ in range(TINY_VAL_PER_CLASS)]


def test_tiny_imagenet_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", _offline)
    with pytest.raises(UserError) as caught:
        data.load_splits("tiny-imagenet", tmp_path)
    assert "\n" not in str(caught.value) and str(tmp_path / "tiny-imagenet-200") in str(caught.value)


# ---------------------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian's real copy)


def test_fashion_mnist_from_debian(fashion_dir, capfd, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.FashionMNIST, "download", _no_network)
    splits = data.load_splits("fashion-mnist", fashion_dir, val_size=1000, train_limit=2000, test_limit=500)
    notice = capfd.readouterr().err
    assert notice.count("\n") == 1 and "Debian" in notice and str(fashion_dir) in notice
    assert sorted(p.name for p in (fashion_dir / "FashionMNIST" / "raw").iterdir()) == sorted(data._IDX_STEMS)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (2000, 1000, 500)
    for split in (splits.train, splits.val, splits.test):
        _check_items(split, 1, 28)
    assert _class_counts(splits.train) == [200] * 10 and _class_counts(splits.val) == [100] * 10
    assert _class_counts(splits.test) == [50] * 10
    assert not set(splits.train.indices) & set(splits.val.indices)
    x, y = next(iter(data.make_loader(splits.train, 128, shuffle=True)))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.5


def test_fashion_mnist_matches_torchvision_pixels(fashion_dir):
    splits = data.load_splits("fashion-mnist", fashion_dir, val_size=0, test_limit=20)
    reference = torchvision.datasets.FashionMNIST(str(fashion_dir), train=False)
    for position, index in enumerate(splits.test.indices[:5]):
        image, label = splits.test[position]
        expected = torch.from_numpy(np.asarray(reference[index][0], dtype=np.float32) / 255)
        assert torch.equal(image[0], expected) and label == reference[index][1]
