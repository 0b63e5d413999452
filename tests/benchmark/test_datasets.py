"""Dataset loaders: the bundled digits, IDX files (Fashion-MNIST format) and CIFAR-10 pickles written here."""
import gzip
import pickle

import numpy as np
import pytest

from influence_lib.benchmark.datasets import load_cifar10, load_dataset, load_digits, load_fashion_mnist


def test_digits_split_is_fixed_and_normalized():
    data = load_digits()
    assert data.x_train.shape == (1438, 8, 8) and data.x_test.shape == (359, 8, 8)
    assert data.x_train.dtype == np.float32 and 0 <= data.x_train.min() and data.x_train.max() <= 1
    assert data.nb_classes == 10
    np.testing.assert_array_equal(load_digits().y_train, data.y_train)
    small = data.subset(100, 20, seed=1)
    assert small.x_train.shape == (100, 8, 8) and small.y_test.shape == (20,)


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28))
    labels = np.array([0, 9, 3, 3, 1])
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images[:2])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels[:2])
    data = load_fashion_mnist(str(tmp_path))
    np.testing.assert_allclose(data.x_train, images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_train, labels)
    assert data.x_test.shape == (2, 28, 28) and data.class_names[9] == "Ankle boot"


def test_cifar10_reads_python_pickles(tmp_path):
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, size=(2, 3 * 32 * 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=2).tolist()
        with open(tmp_path / name, "wb") as stream:
            pickle.dump({b"data": pixels, b"labels": labels}, stream)
        expected.append((pixels, labels))
    data = load_cifar10(str(tmp_path))
    assert data.x_train.shape == (10, 32, 32, 3) and data.x_test.shape == (2, 32, 32, 3)
    first_pixels, first_labels = expected[0]
    # channel-first rows of 1024 values → (height, width, channel)
    np.testing.assert_allclose(data.x_train[0, 0, 1, 2], first_pixels[0, 2 * 1024 + 1] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(data.y_train[:2], first_labels)


def test_bad_names_and_paths_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_fashion_mnist(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_cifar10(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_fashion_mnist(str(tmp_path))
    with pytest.raises(ValueError, match="takes no path"):
        load_dataset("digits", str(tmp_path))
    with pytest.raises(ValueError, match="positive integer"):
        load_digits().subset(0)
