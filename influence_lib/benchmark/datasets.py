"""Image classification datasets for the benchmark, offline first.

* ``digits`` (default): scikit-learn's bundled 8×8 handwritten digits (1,797 images, 10 classes;
  ``pip install influence_lib[datasets]``), split 80/20 with a fixed seed.
* ``fashion_mnist``: the official Fashion-MNIST (60,000 + 10,000 28×28 images) read from IDX
  files in a local directory — by default ``/usr/share/datasets/fashion-mnist``, which the
  Debian package ``dataset-fashion-mnist`` installs — else downloaded by ``keras.datasets``.
* ``mnist``: MNIST from a local directory of the four IDX files (same names as Fashion-MNIST's);
  no default location, no download.
* ``cifar10``: CIFAR-10 (50,000 + 10,000 32×32×3 images) from a local ``cifar-10-batches-py``
  directory (the "python version" archive, extracted), else ``keras.datasets`` (which needs the
  internet unless Keras already cached it).

Pixels are float32 in [0, 1]; labels are int64 class indices.
"""
import gzip
import os
import pickle
from dataclasses import dataclass

import numpy as np

FASHION_MNIST_DIRECTORY = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class ClassificationData:
    """Train and test images with integer labels.

    Attributes
    ----------
    name
        Dataset name.
    x_train, y_train, x_test, y_test
        Images ``(n, height, width[, channels])`` float32 in [0, 1] and labels ``(n,)`` int64.
    class_names
        One name per class.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: tuple[str, ...]

    @property
    def nb_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> "ClassificationData":
        """A random subset of ``n_train`` training and ``n_test`` test samples (all when None)."""
        rng = np.random.default_rng(seed)

        def pick(x: np.ndarray, y: np.ndarray, n: int | None, which: str) -> tuple[np.ndarray, np.ndarray]:
            if n is None or n >= len(x):
                return x, y
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ValueError(f"n_{which} must be a positive integer or None, got {n!r}.")
            indices = np.sort(rng.choice(len(x), size=int(n), replace=False))
            return x[indices], y[indices]

        x_train, y_train = pick(self.x_train, self.y_train, n_train, "train")
        x_test, y_test = pick(self.x_test, self.y_test, n_test, "test")
        return ClassificationData(self.name, x_train, y_train, x_test, y_test, self.class_names)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> ClassificationData:
    """scikit-learn's 8×8 digits, split into train / test with a fixed seed (offline)."""
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError as error:
        raise ImportError(
            "The digits dataset ships with scikit-learn: pip install 'influence_lib[datasets]' (or scikit-learn)."
        ) from error
    digits = sklearn_load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return ClassificationData(
        "digits", images[train], labels[train], images[test], labels[test], tuple(str(c) for c in range(10))
    )


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as stream:
        content = stream.read()
    if content[:2] != b"\x00\x00" or content[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    ndim = content[3]
    shape = tuple(int.from_bytes(content[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        path = os.path.join(directory, name)
        if os.path.exists(path):
            return path
    raise FileNotFoundError(f"{stem}(.gz) not found in {directory}.")


def _keras_download(loader_name: str, dataset_name: str, local_hint: str):
    import keras

    try:
        return getattr(keras.datasets, loader_name).load_data()
    except Exception as error:  # network errors come in many types (URLError, OSError, ...)
        raise RuntimeError(
            f"{dataset_name} is not available locally and keras.datasets could not download it ({error}). "
            f"This machine looks offline: {local_hint}"
        ) from error


IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_data(name: str, directory: str, class_names: tuple[str, ...]) -> ClassificationData:
    x_train, y_train, x_test, y_test = (_read_idx(_find_idx(directory, stem)) for stem in IDX_STEMS)
    return ClassificationData(
        name,
        (x_train / 255.0).astype(np.float32),
        y_train.astype(np.int64),
        (x_test / 255.0).astype(np.float32),
        y_test.astype(np.int64),
        class_names,
    )


def load_mnist(path: str | None = None) -> ClassificationData:
    """MNIST from a local directory holding the four IDX files (``train-images-idx3-ubyte[.gz]``, …)."""
    if path is None:
        raise ValueError("MNIST is read from a local copy: pass the directory of its four IDX files (--data-dir).")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"MNIST directory {path!r} does not exist.")
    return _idx_data("mnist", path, tuple(str(digit) for digit in range(10)))


def load_fashion_mnist(path: str | None = None) -> ClassificationData:
    """Fashion-MNIST from a directory of IDX files (default: the Debian package's), else keras.datasets."""
    directory = path if path is not None else FASHION_MNIST_DIRECTORY
    if os.path.isdir(directory):
        return _idx_data("fashion_mnist", directory, FASHION_MNIST_CLASSES)
    if path is not None:
        raise FileNotFoundError(f"Fashion-MNIST directory {path!r} does not exist.")
    (x_train, y_train), (x_test, y_test) = _keras_download(
        "fashion_mnist",
        "Fashion-MNIST",
        "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass the "
        "directory holding the IDX files.",
    )
    return ClassificationData(
        "fashion_mnist",
        (x_train / 255.0).astype(np.float32),
        y_train.astype(np.int64),
        (x_test / 255.0).astype(np.float32),
        y_test.astype(np.int64),
        FASHION_MNIST_CLASSES,
    )


def _read_cifar_batch(path: str) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as stream:
        batch = pickle.load(stream, encoding="bytes")
    images = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(batch[b"labels"], dtype=np.int64)


def load_cifar10(path: str | None = None) -> ClassificationData:
    """CIFAR-10 from an extracted ``cifar-10-batches-py`` directory, else keras.datasets (online)."""
    if path is not None:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CIFAR-10 directory {path!r} does not exist (expected cifar-10-batches-py).")
        parts = [_read_cifar_batch(os.path.join(path, f"data_batch_{i}")) for i in range(1, 6)]
        x_train = np.concatenate([images for images, _ in parts])
        y_train = np.concatenate([labels for _, labels in parts])
        x_test, y_test = _read_cifar_batch(os.path.join(path, "test_batch"))
    else:
        (x_train, y_train), (x_test, y_test) = _keras_download(
            "cifar10",
            "CIFAR-10",
            "download cifar-10-python.tar.gz elsewhere, extract it, and pass the cifar-10-batches-py directory.",
        )
    return ClassificationData(
        "cifar10",
        (x_train / 255.0).astype(np.float32),
        np.asarray(y_train, dtype=np.int64).reshape(-1),
        (x_test / 255.0).astype(np.float32),
        np.asarray(y_test, dtype=np.int64).reshape(-1),
        CIFAR10_CLASSES,
    )


DATASETS = {"digits": load_digits, "fashion_mnist": load_fashion_mnist, "mnist": load_mnist, "cifar10": load_cifar10}


def load_dataset(name: str, path: str | None = None) -> ClassificationData:
    """Load a benchmark dataset by name: ``'digits'``, ``'fashion_mnist'``, ``'mnist'`` or ``'cifar10'``."""
    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(DATASETS)}.")
    if key == "digits":
        if path is not None:
            raise ValueError("The digits dataset ships with scikit-learn and takes no path.")
        return load_digits()
    return DATASETS[key](path)
