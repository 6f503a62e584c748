"""Offline datasets as ``(x, y)`` tensors, for the examples, tests and benchmarks.

Nothing here downloads anything: ``digits`` comes with scikit-learn and Fashion-MNIST comes
from the Debian package ``dataset-fashion-mnist``. Images are float32 ``[N, C, H, W]``
normalised to zero mean and unit variance (training-set statistics); labels are int64 ``[N]``.

Example::

    >>> from mergec_lab import datasets
    >>> x, y = datasets.digits("train")
    >>> xa, ya = datasets.class_subset(x, y, range(5))   # task A of the disjoint protocol
    >>> for xb in datasets.batches(xa, 64):
    ...     pass
"""
from __future__ import annotations

import functools
import gzip
import logging
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from mergec.errors import MergecError

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
# Mean and std of the Fashion-MNIST training pixels scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise MergecError(f"split must be 'train' or 'test', got {split!r}")


@functools.lru_cache(maxsize=4)
def _digits_split(test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Loads sklearn's digits once and splits it, stratified by class, deterministically."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    return tuple(train_test_split(
        data.images.astype(np.float32), data.target.astype(np.int64),
        test_size=test_fraction, random_state=seed, stratify=data.target,
    ))


def digits(
    split: Split = "train", *, test_fraction: float = 0.25, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8x8 handwritten digits of scikit-learn (1797 images, 10 classes).

    Returns ``x`` float32 ``[N, 1, 8, 8]`` normalised with the training split's pixel mean and
    std, and ``y`` int64 ``[N]``. The split is stratified and fixed by ``seed``, so every call
    (and every process) sees the same train and test images; with the defaults there are
    1347 training and 450 test images. Small enough to train a CNN in seconds on a CPU, which
    is why the tests use it.
    """
    _check_split(split)
    x_train, x_test, y_train, y_test = _digits_split(test_fraction, seed)
    mean, std = float(x_train.mean()), float(x_train.std())
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    x = (torch.from_numpy(images.copy()).unsqueeze(1) - mean) / std
    return x, torch.from_numpy(labels.copy())


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Reads one gzip-compressed IDX file (the MNIST format) into a uint8 array."""
    with gzip.open(path, "rb") as stream:
        raw = stream.read()
    magic, = struct.unpack(">I", raw[:4])
    if magic != expected_magic:
        raise MergecError(f"{path} is not an IDX file of the expected kind "
                          f"(magic {magic:#x}, expected {expected_magic:#x})")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=4)
def _fashion_mnist_raw(split: str, root: str) -> tuple[np.ndarray, np.ndarray]:
    """The undecoded uint8 images and labels of one split, read once per process."""
    image_name, label_name = _FASHION_MNIST_FILES[split]
    image_path, label_path = Path(root) / image_name, Path(root) / label_name
    missing = [str(p) for p in (image_path, label_path) if not p.is_file()]
    if missing:
        raise MergecError(
            f"Fashion-MNIST files not found: {', '.join(missing)}. Install the Debian package "
            f"'{FASHION_MNIST_PACKAGE}' (apt-get install {FASHION_MNIST_PACKAGE}) or pass "
            f"root= the folder that holds the gzip IDX files.")
    logger.debug("reading Fashion-MNIST %s split from %s", split, root)
    images = _read_idx(image_path, 0x00000803)
    labels = _read_idx(label_path, 0x00000801)
    if len(images) != len(labels):
        raise MergecError(f"{image_path} has {len(images)} images but {label_path} has "
                          f"{len(labels)} labels")
    return images, labels


def fashion_mnist_available(root: str = FASHION_MNIST_ROOT) -> bool:
    """Whether the four Fashion-MNIST files are present under ``root``."""
    return all((Path(root) / name).is_file()
               for names in _FASHION_MNIST_FILES.values() for name in names)


def fashion_mnist(
    split: Split = "train", root: str = FASHION_MNIST_ROOT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST (60000 train / 10000 test, 28x28 grey, 10 classes), read from disk.

    Returns ``x`` float32 ``[N, 1, 28, 28]`` normalised with the standard training-set mean and
    std, and ``y`` int64 ``[N]``. Reads the gzip IDX files that the Debian package
    ``dataset-fashion-mnist`` installs under ``root``; raises :class:`MergecError` naming that
    package if they are missing. The decompressed bytes are cached per process.
    """
    _check_split(split)
    images, labels = _fashion_mnist_raw(split, str(root))
    x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
    x = x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return x, torch.from_numpy(labels.astype(np.int64))


def class_subset(
    x: torch.Tensor, y: torch.Tensor, classes: Iterable[int], *, relabel: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples whose label is in ``classes``, in their original order.

    This is the disjoint-task protocol: model A sees ``class_subset(x, y, range(5))``, model B
    ``class_subset(x, y, range(5, 10))``. Labels keep their global values by default, so both
    models can share a 10-way head and be scored on the joint task; with ``relabel=True`` they
    become the position in ``classes`` (0..len(classes)-1), for a per-task head.
    """
    class_list = [int(c) for c in classes]
    if not class_list:
        raise MergecError("class_subset needs at least one class")
    wanted = torch.tensor(class_list, dtype=y.dtype, device=y.device)
    keep = torch.isin(y, wanted)
    x_kept, y_kept = x[keep], y[keep]
    if relabel:
        lookup = torch.full((int(max(class_list)) + 1,), -1, dtype=y.dtype, device=y.device)
        lookup[wanted] = torch.arange(len(class_list), dtype=y.dtype, device=y.device)
        y_kept = lookup[y_kept]
    return x_kept, y_kept


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``x`` of at most ``batch_size`` rows (views, no copy, no shuffle).

    Meant for calibration data and evaluation, where order does not matter and a DataLoader
    is overhead.
    """
    if batch_size < 1:
        raise MergecError(f"batch_size must be positive, got {batch_size}")
    for start in range(0, len(x), batch_size):
        yield x[start:start + batch_size]


def loader(
    x: torch.Tensor, y: torch.Tensor, batch_size: int = 128, *, shuffle: bool = False,
    seed: int = 0, drop_last: bool = False, num_workers: int = 0,
) -> DataLoader:
    """A ``torch.utils.data.DataLoader`` over ``(x, y)``; shuffling is reproducible by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last, num_workers=num_workers, generator=generator)
