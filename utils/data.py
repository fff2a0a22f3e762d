"""Datasets, train/val/test splits and seeded data loaders.

Every split yields (float tensor C,H,W with values in [0, 1], int label). There is no Normalize
transform: the per-channel mean/std in DatasetInfo are applied by the model's first layer, so
attacks operate in [0, 1] pixel space.

Where the files come from, in order: files already under data_dir (torchvision's layout), Debian's
copy of Fashion-MNIST (fashion-mnist only), a torchvision download; otherwise a one-line UserError.
See data/README.md for the layouts needed offline.
"""
from __future__ import annotations

import gzip
import importlib.util
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from utils.errors import UserError


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: shapes, normalisation statistics and default attack budgets."""

    name: str
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple
    std: tuple
    epsilon_linf: float
    epsilon_l2: float


_COLOUR_LINF = 8 / 255
# The L2 budgets are common conventions in the robustness literature (0.5 for 32x32 colour images;
# 2.0 for MNIST, 1.5 for Fashion-MNIST), not values taken from the NAMID paper.
_COLOUR_L2 = 0.5

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
                           _COLOUR_LINF, _COLOUR_L2),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762),
                            _COLOUR_LINF, _COLOUR_L2),
    "svhn": DatasetInfo("svhn", 10, 3, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970),
                        _COLOUR_LINF, _COLOUR_L2),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,), 0.3, 2.0),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), 0.1, 1.5),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 3, 64, (0.4802, 0.4481, 0.3975),
                                 (0.2770, 0.2691, 0.2821), _COLOUR_LINF, _COLOUR_L2),
}

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# Independent random streams per selection, so that e.g. the validation images do not depend on train_limit.
_VAL_STREAM, _TRAIN_STREAM, _TEST_STREAM = 0, 1, 2


def dataset_info(name: str) -> DatasetInfo:
    """The DatasetInfo for a dataset name; UserError listing the valid names if unknown."""
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------------------------------------
# Dataset classes


class InMemoryImages(Dataset):
    """Images held as one uint8 tensor (N, C, H, W), served as float tensors in [0, 1] without PIL.

    Used for MNIST-like data (no augmentation). Measured: one epoch over 10 000 Fashion-MNIST images,
    batch 128, workers=0, 2-core CPU, median of 5: torchvision's PIL image + ToTensor per item 0.49-0.53 s;
    this tensor item by item 0.09-0.10 s; this tensor a batch at a time (__getitems__) 0.03-0.04 s.
    The values are bit-identical to the PIL path.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a uint8 (N, C, H, W) tensor, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.targets = torch.as_tensor(targets, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images[index].float().div_(255), int(self.targets[index])

    def __getitems__(self, indices: list[int]) -> list:
        """A whole batch with one gather and one division, instead of one per item."""
        batch = self.images[indices].float().div_(255)
        return list(zip(batch.unbind(0), self.targets[indices].tolist()))


class TinyImageNetVal(Dataset):
    """Tiny ImageNet's labelled validation split (val/images/*.JPEG + val/val_annotations.txt)."""

    def __init__(self, val_dir: Path, class_to_idx: dict[str, int], transform=None):
        self.transform = transform
        self.samples = list(_read_tiny_val_annotations(Path(val_dir), class_to_idx))
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        with Image.open(path) as image:
            image = image.convert("RGB")  # a few Tiny ImageNet JPEGs are greyscale
        if self.transform is not None:
            image = self.transform(image)
        return image, label


def _read_tiny_val_annotations(val_dir: Path, class_to_idx: dict[str, int]):
    """(image path, label) pairs from val_annotations.txt lines 'file<TAB>wnid<TAB>box...'."""
    annotations = val_dir / "val_annotations.txt"
    for line_number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in class_to_idx:
            raise UserError(f"{annotations}:{line_number}: expected 'FILE<TAB>WNID' with a WNID from train/")
        yield val_dir / "images" / fields[0], class_to_idx[fields[1]]


class TransformedSubset(Subset):
    """A Subset that applies its own transform, so train (augmented) and val (plain) can share one base set."""

    def __init__(self, dataset: Dataset, indices, transform=None):
        super().__init__(dataset, indices)
        self.transform = transform

    def __getitem__(self, index: int):
        return self._transformed(self.dataset[self.indices[index]])

    def __getitems__(self, indices: list[int]) -> list:
        base_indices = [self.indices[i] for i in indices]
        if callable(getattr(self.dataset, "__getitems__", None)):
            items = self.dataset.__getitems__(base_indices)
        else:
            items = [self.dataset[i] for i in base_indices]
        return [self._transformed(item) for item in items]

    def _transformed(self, item):
        if self.transform is None:
            return item
        image, label = item
        return self.transform(image), label


# ----------------------------------------------------------------------------------------------------------
# Finding the files


@dataclass(frozen=True)
class _Source:
    """How one dataset is found on disk, and what to tell the user when it is not."""

    title: str
    folder: str  # relative to data_dir; "" when the files lie directly in data_dir (SVHN)
    files: tuple  # relative to folder; all must exist for the dataset to count as present
    hint: str  # how to provide the files; {path} is the folder looked at


_SOURCES = {
    "cifar10": _Source(
        "CIFAR-10", "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch", "batches.meta"),
        "extract the CIFAR-10 python archive (cifar-10-python.tar.gz) so that {path} holds data_batch_1..5"),
    "cifar100": _Source(
        "CIFAR-100", "cifar-100-python", ("train", "test", "meta"),
        "extract the CIFAR-100 python archive (cifar-100-python.tar.gz) so that {path} holds train, test, meta"),
    "svhn": _Source(
        "SVHN", "", ("train_32x32.mat", "test_32x32.mat"),
        "place train_32x32.mat and test_32x32.mat directly in {path}"),
    "mnist": _Source(
        "MNIST", "MNIST/raw", _IDX_STEMS,
        "place the four uncompressed MNIST idx files (train-images-idx3-ubyte, ...) in {path}"),
    "fashion-mnist": _Source(
        "Fashion-MNIST", "FashionMNIST/raw", _IDX_STEMS,
        "run 'apt-get install dataset-fashion-mnist', or place the four uncompressed idx files in {path}"),
    "tiny-imagenet": _Source(
        "Tiny ImageNet", "tiny-imagenet-200", ("wnids.txt", "train", "val/val_annotations.txt", "val/images"),
        f"extract tiny-imagenet-200.zip ({TINY_IMAGENET_URL}) so that {{path}} holds wnids.txt, train/, val/"),
}

# torchvision is imported where it is used: importing it costs seconds, which --help should not pay.
_TORCHVISION_CLASSES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "svhn": "SVHN", "mnist": "MNIST",
                        "fashion-mnist": "FashionMNIST"}


def _torchvision_class(name: str):
    from torchvision import datasets
    return getattr(datasets, _TORCHVISION_CLASSES[name])


def _files_present(source: _Source, data_dir: Path) -> bool:
    """Whether every file the dataset needs exists under data_dir."""
    return all((data_dir / source.folder / name).exists() for name in source.files)


def _one_line(error: BaseException, limit: int = 200) -> str:
    """An exception's message squeezed onto one line, shortened to `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _gunzip_atomically(source: Path, destination: Path) -> None:
    """Decompress source into destination via a temporary file in the same folder, so no half-written file is left."""
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out, gzip.open(source, "rb") as compressed:
            shutil.copyfileobj(compressed, out, length=1 << 20)
        os.replace(temporary, destination)
    except BaseException:
        os.unlink(temporary)
        raise


def _unpack_debian_fashion_mnist(data_dir: Path) -> bool:
    """Unpack Debian's gzipped Fashion-MNIST (package dataset-fashion-mnist) into torchvision's raw folder.

    Returns False, touching nothing, when the Debian copy is not installed.
    """
    archives = [DEBIAN_FASHION_MNIST / f"{stem}.gz" for stem in _IDX_STEMS]
    if not all(archive.is_file() for archive in archives):
        return False
    raw = data_dir / _SOURCES["fashion-mnist"].folder
    raw.mkdir(parents=True, exist_ok=True)
    for archive in archives:
        if not (raw / archive.stem).exists():
            _gunzip_atomically(archive, raw / archive.stem)
    print(f"data: using Debian's Fashion-MNIST from {DEBIAN_FASHION_MNIST}, unpacked into {raw}", file=sys.stderr)
    return True


def _move_tree_into(source: Path, destination: Path) -> None:
    """Move every file under source to the same relative place under destination (replacing files there)."""
    for folder, _, names in os.walk(source):
        target_folder = destination / Path(folder).relative_to(source)
        target_folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(Path(folder) / name, target_folder / name)


def _download_into(name: str, data_dir: Path) -> None:
    """Download a dataset into a staging folder inside data_dir, then move it into place.

    Staging keeps an interrupted or failed download from leaving partial files in data_dir.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=".download-") as staging:
        if name == "tiny-imagenet":
            from torchvision.datasets.utils import download_and_extract_archive
            download_and_extract_archive(TINY_IMAGENET_URL, download_root=staging, remove_finished=True)
        else:
            for train in (True, False):
                _torchvision_class(name)(staging, download=True, **_split_kwargs(name, train))
        _move_tree_into(Path(staging), data_dir)


def _ensure_files(name: str, data_dir: Path) -> None:
    """Make sure the dataset's files are under data_dir: already there, from Debian, or downloaded."""
    source = _SOURCES[name]
    if _files_present(source, data_dir):
        return
    path = data_dir / source.folder
    try:
        if name == "fashion-mnist" and _unpack_debian_fashion_mnist(data_dir):
            return
    except OSError as error:
        raise UserError(f"could not unpack Debian's Fashion-MNIST into {path} ({_one_line(error)})") from None
    try:
        _download_into(name, data_dir)
    except Exception as error:  # URLError, OSError, RuntimeError (bad checksum), ...: all mean "not available"
        raise UserError(f"{source.title} not found in {path} and the download failed ({_one_line(error)}); "
                        f"{source.hint.format(path=path)}, or run once with internet access") from None
    if not _files_present(source, data_dir):
        raise UserError(f"{source.title} download did not produce the expected files in {path}; "
                        f"{source.hint.format(path=path)}")


# ----------------------------------------------------------------------------------------------------------
# Reading the full train and test sets


def _split_kwargs(name: str, train: bool) -> dict:
    """torchvision's argument selecting the train or test split."""
    if name == "svhn":
        return {"split": "train" if train else "test"}
    return {"train": train}


def _read_torchvision(name: str, data_dir: Path, train: bool):
    """One split through torchvision (transform=None, so it yields PIL images), never downloading."""
    return _torchvision_class(name)(str(data_dir), download=False, **_split_kwargs(name, train))


def _read_in_memory(name: str, data_dir: Path, train: bool) -> InMemoryImages:
    """An MNIST-like split as an InMemoryImages (uint8 N,1,28,28) instead of torchvision's PIL-per-item class."""
    split = _read_torchvision(name, data_dir, train)
    return InMemoryImages(split.data.unsqueeze(1).contiguous(), split.targets)


def _read_tiny_imagenet(data_dir: Path, train: bool):
    """Tiny ImageNet's train split (ImageFolder) or its labelled val split, which serves as the test set."""
    folder = data_dir / _SOURCES["tiny-imagenet"].folder
    wnids = sorted(set((folder / "wnids.txt").read_text().split()))
    from torchvision import datasets
    train_set = datasets.ImageFolder(str(folder / "train"))
    if train_set.classes != wnids:
        raise UserError(f"{folder / 'train'} holds classes that differ from {folder / 'wnids.txt'}")
    return train_set if train else TinyImageNetVal(folder / "val", train_set.class_to_idx)


def _read_split(name: str, data_dir: Path, train: bool):
    """One full split of a dataset whose files are known to be present."""
    if name == "tiny-imagenet":
        return _read_tiny_imagenet(data_dir, train)
    if name in ("mnist", "fashion-mnist"):
        return _read_in_memory(name, data_dir, train)
    return _read_torchvision(name, data_dir, train)


def _read_full_sets(name: str, data_dir: Path):
    """The complete (train, test) sets, fetching the files first when needed; UserError when unreadable."""
    if name == "svhn" and importlib.util.find_spec("scipy") is None:
        raise UserError("SVHN is stored as .mat files, which need scipy: pip install scipy")
    _ensure_files(name, data_dir)
    source = _SOURCES[name]
    try:
        return _read_split(name, data_dir, True), _read_split(name, data_dir, False)
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"{source.title} files in {data_dir / source.folder} could not be read ({_one_line(error)}); "
                        f"replace them, or delete them to download afresh") from None


# ----------------------------------------------------------------------------------------------------------
# Labels and class-balanced selection


def dataset_labels(dataset) -> torch.Tensor:
    """The labels of a dataset as a long tensor, without loading any image."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    for attribute in ("targets", "labels"):  # CIFAR, MNIST, ImageFolder, ours: targets; SVHN: labels
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.long).flatten()
    raise TypeError(f"cannot read the labels of a {type(dataset).__name__} without loading its images")


def _balanced_quotas(class_sizes: list[int], n: int) -> list[int]:
    """How many items to take from each class: n in all, as equal as possible given each class's size.

    Water-filling: split what is left equally over the classes that still have items, the remainder
    going to the first of them, and repeat while small classes run out.
    """
    quotas = [0] * len(class_sizes)
    remaining = n
    while remaining > 0:
        open_classes = [c for c, size in enumerate(class_sizes) if quotas[c] < size]
        share, extra = divmod(remaining, len(open_classes))
        for rank, c in enumerate(open_classes):
            take = min(share + (rank < extra), class_sizes[c] - quotas[c])
            quotas[c] += take
            remaining -= take
    return quotas


def class_balanced_indices(labels, n: int, generator: torch.Generator) -> torch.Tensor:
    """n positions into labels, sorted, drawn at random (seeded) with per-class counts as equal as possible."""
    labels = torch.as_tensor(labels, dtype=torch.long).flatten()
    if not 0 <= n <= len(labels):
        raise ValueError(f"cannot pick {n} of {len(labels)} items")
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    _, class_sizes = torch.unique(labels, return_counts=True)
    quotas = _balanced_quotas(class_sizes.tolist(), n)
    shuffled = torch.randperm(len(labels), generator=generator)
    grouped = shuffled[torch.argsort(labels[shuffled], stable=True)]  # by class, random within a class
    starts = torch.cumsum(class_sizes, 0) - class_sizes
    picked = [grouped[start:start + quota] for start, quota in zip(starts.tolist(), quotas)]
    return torch.sort(torch.cat(picked)).values


def _stream(seed: int, stream: int) -> torch.Generator:
    """A generator for one selection (val, train limit, test limit) of one seed."""
    return torch.Generator().manual_seed(seed * 1000 + stream)


def _limited(labels: torch.Tensor, limit: int | None, generator: torch.Generator) -> torch.Tensor:
    """Positions of a class-balanced subset of at most `limit` items (all positions when limit is None or large)."""
    if limit is None or limit >= len(labels):
        return torch.arange(len(labels))
    return class_balanced_indices(labels, limit, generator)


# ----------------------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Augmentation:
    """A dataset's training augmentation: a random crop of the image zero-padded by `padding` pixels on each
    side, then, if `flip`, a horizontal flip with probability 1/2 (torchvision's RandomCrop and
    RandomHorizontalFlip, in that order)."""

    padding: int
    flip: bool


TRAIN_AUGMENTATION = {
    "cifar10": Augmentation(4, True),
    "cifar100": Augmentation(4, True),
    "tiny-imagenet": Augmentation(4, True),
    "svhn": Augmentation(2, False),  # no flip: a mirrored digit is not the same digit
}  # digits and clothes (mnist, fashion-mnist) get no augmentation


@dataclass
class Splits:
    """Train (augmented), val (carved from the training set) and test sets, plus the dataset's facts."""

    train: Dataset
    val: Dataset
    test: Dataset
    info: DatasetInfo
    augmentation: Augmentation | None = None  # what train's transform does (for DeviceImages)


def train_transform(name: str, augment: bool = True):
    """The training transform: the dataset's augmentation (if any and wanted), then ToTensor."""
    if name in ("mnist", "fashion-mnist"):
        return None  # InMemoryImages already yields tensors
    from torchvision import transforms
    steps = []
    augmentation = TRAIN_AUGMENTATION.get(name) if augment else None
    if augmentation is not None:
        steps.append(transforms.RandomCrop(DATASETS[name].image_size, padding=augmentation.padding))
        if augmentation.flip:
            steps.append(transforms.RandomHorizontalFlip())
    return transforms.Compose(steps + [transforms.ToTensor()])


def _eval_transform(name: str):
    """The transform for val and test: ToTensor only (none for in-memory data)."""
    if name in ("mnist", "fashion-mnist"):
        return None
    from torchvision import transforms
    return transforms.ToTensor()


def _check_sizes(val_size: int, train_limit: int | None, test_limit: int | None) -> None:
    """UserError for a negative val_size or a non-positive limit."""
    if val_size < 0:
        raise UserError(f"val_size must be 0 or more, got {val_size}")
    for option, limit in (("train_limit", train_limit), ("test_limit", test_limit)):
        if limit is not None and limit <= 0:
            raise UserError(f"{option} must be positive, got {limit}")


def load_splits(name: str, data_dir, *, val_size: int = 1000, train_limit: int | None = None,
                test_limit: int | None = None, seed: int = 0, augment: bool = True) -> Splits:
    """Train/val/test splits of a dataset under data_dir.

    val: val_size training images, class-balanced and seeded, the same whatever train_limit is.
    train: the other training images, or a class-balanced seeded subset of train_limit of them.
    test: the test set, or a class-balanced seeded subset of test_limit images.
    Limits above what exists mean "everything".
    """
    info = dataset_info(name)
    _check_sizes(val_size, train_limit, test_limit)
    full_train, full_test = _read_full_sets(name, Path(data_dir).expanduser())
    train_labels = dataset_labels(full_train)
    if val_size >= len(train_labels):
        raise UserError(f"val_size={val_size} leaves no training images: {info.name} has {len(train_labels)}")

    val_indices = class_balanced_indices(train_labels, val_size, _stream(seed, _VAL_STREAM))
    is_val = torch.zeros(len(train_labels), dtype=torch.bool)
    is_val[val_indices] = True
    rest = torch.nonzero(~is_val).flatten()
    train_indices = rest[_limited(train_labels[rest], train_limit, _stream(seed, _TRAIN_STREAM))]
    test_indices = _limited(dataset_labels(full_test), test_limit, _stream(seed, _TEST_STREAM))

    return Splits(
        train=TransformedSubset(full_train, train_indices.tolist(), train_transform(name, augment)),
        val=TransformedSubset(full_train, val_indices.tolist(), _eval_transform(name)),
        test=TransformedSubset(full_test, test_indices.tolist(), _eval_transform(name)),
        info=info,
        augmentation=TRAIN_AUGMENTATION.get(name) if augment else None,
    )


# ----------------------------------------------------------------------------------------------------------
# Splits held on the training device (--device-data)


def _uint8_full_set(dataset) -> torch.Tensor | None:
    """A full set's images as a uint8 (N, C, H, W) tensor (a view where possible), or None for a set read
    file by file (Tiny ImageNet's JPEGs)."""
    if isinstance(dataset, InMemoryImages):
        return dataset.images
    from torchvision import datasets
    if isinstance(dataset, datasets.CIFAR10):  # CIFAR-100 as well: numpy (N, H, W, C)
        return torch.from_numpy(dataset.data).permute(0, 3, 1, 2)
    if isinstance(dataset, datasets.SVHN):  # numpy (N, C, H, W)
        return torch.from_numpy(dataset.data)
    return None


def holds_arrays(split) -> bool:
    """Whether a split of load_splits can become a DeviceImages (its images are held as one array)."""
    return isinstance(split, Subset) and _uint8_full_set(split.dataset) is not None


def draw_crops_and_flips(count: int, augmentation: Augmentation) -> torch.Tensor:
    """(3, count) int64: per image the crop's top and left offset and whether to flip, drawn from the global
    torch RNG exactly as torchvision draws them image by image (RandomCrop.get_params: top, then left;
    then RandomHorizontalFlip's torch.rand(1) < 0.5), so that the device path consumes the same random
    numbers as the host path and yields the same images. A few microseconds per image, on the host."""
    span = 2 * augmentation.padding + 1
    draws = []
    for _ in range(count):
        top = torch.randint(0, span, size=(1,)).item()
        left = torch.randint(0, span, size=(1,)).item()
        draws.append((top, left, int(torch.rand(1).item() < 0.5) if augmentation.flip else 0))
    return torch.tensor(draws, dtype=torch.long).reshape(count, 3).T


def crop_and_flip(images: torch.Tensor, draws: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image of a (B, C, H, W) batch cropped from its zero-padded copy at (top, left), mirrored where
    its flip is set: one gather on the batch's device. draws as draw_crops_and_flips returns them."""
    batch, channels, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top, left, flip = draws.to(images.device, non_blocking=True)
    rows = top[:, None] + torch.arange(height, device=images.device)
    columns = torch.arange(width, device=images.device).expand(batch, width)
    columns = left[:, None] + torch.where(flip[:, None].bool(), columns.flip(1), columns)
    index_b = torch.arange(batch, device=images.device)[:, None, None, None]
    index_c = torch.arange(channels, device=images.device)[None, :, None, None]
    return padded[index_b, index_c, rows[:, None, :, None], columns[:, None, None, :]]


class DeviceImages:
    """A split held on the training device as one uint8 (N, C, H, W) tensor with its labels (--device-data).

    make_loader serves it in the batches of the split it was made from (same order, same shards), and
    augments as that split's transform does: the crop offsets and flips are drawn on the host from the
    global RNG in torchvision's order (draw_crops_and_flips), then applied to the whole batch on the
    device. The batches, and the RNG state a resumed run restores, are those of the host loader with
    workers=0, bit for bit; the images cross to the device once, as bytes, instead of every epoch as floats.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augmentation: Augmentation | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"expected uint8 (N, C, H, W) images and N labels, got {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)}")
        self.images, self.labels, self.augmentation = images, labels, augmentation

    @classmethod
    def from_split(cls, split, device, augmentation: Augmentation | None = None) -> "DeviceImages":
        """The images and labels of a split of load_splits, on `device`; UserError for a dataset read file by file."""
        full = _uint8_full_set(split.dataset) if isinstance(split, Subset) else None
        if full is None:
            kind = type(getattr(split, "dataset", split)).__name__
            raise UserError(f"--device-data needs a dataset held as arrays; a {kind} is read image by image from its "
                            f"files (use --no-device-data)")
        indices = torch.as_tensor(split.indices, dtype=torch.long)
        return cls(full[indices].contiguous().to(device), dataset_labels(split).to(device), augmentation)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: torch.Tensor):
        """(x, y) for the given positions: x float in [0, 1] as ToTensor makes it, augmented if the split is."""
        indices = indices.to(self.images.device, non_blocking=True)
        images = self.images[indices]
        if self.augmentation is not None:
            draws = draw_crops_and_flips(len(indices), self.augmentation)
            images = crop_and_flip(images, draws, self.augmentation.padding)
        return images.float().div_(255), self.labels[indices]


def device_splits(splits: Splits, device) -> Splits:
    """The splits as DeviceImages on `device` (train augmented as its transform does, val and test not)."""
    return Splits(train=DeviceImages.from_split(splits.train, device, splits.augmentation),
                  val=DeviceImages.from_split(splits.val, device), test=DeviceImages.from_split(splits.test, device),
                  info=splits.info, augmentation=splits.augmentation)


class DeviceBatches:
    """The batches of a DeviceImages, in the order of a loader over its positions."""

    def __init__(self, data: DeviceImages, order: DataLoader):
        self.data, self.order = data, order

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        for indices in self.order:
            yield self.data.batch(indices)


# ----------------------------------------------------------------------------------------------------------
# Loaders


def make_loader(dataset: Dataset, batch_size: int, *, shuffle: bool, workers: int = 0, seed: int = 0,
                epoch: int = 0, device=None, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader whose batch order and worker seeds are a pure function of (seed, epoch).

    Build a new loader each epoch: a resumed run then sees the same batches as an uninterrupted one.
    With workers=0, random augmentation draws from the global torch RNG instead of per-worker seeds,
    so its reproducibility on resume depends on the caller restoring that RNG state.
    With world_size > 1 (torchrun) each process reads its shard: a DistributedSampler when shuffling
    (padded so that every process runs the same number of steps), every world_size-th item otherwise
    (no padding, so that evaluation counts every test image exactly once).
    A DeviceImages (--device-data) is served in the batches its positions would have as a dataset here.
    """
    if isinstance(dataset, DeviceImages):
        order = make_loader(range(len(dataset)), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, device=device,
                            rank=rank, world_size=world_size)
        return DeviceBatches(dataset, order)
    generator = torch.Generator().manual_seed(seed * 100003 + epoch)
    sampler = None
    if world_size > 1 and shuffle and len(dataset) > 0:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed * 100003)
        sampler.set_epoch(epoch)
        shuffle = False
    elif world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and len(dataset) > 0,  # RandomSampler refuses an empty dataset (e.g. val_size=0)
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=device is not None and torch.device(device).type == "cuda",
        drop_last=False,
        persistent_workers=False,
    )
