"""Progress bars for long loops (tqdm), with one switch to turn them off."""
from collections.abc import Iterable, Iterator
from typing import TypeVar

import tensorflow as tf
from tqdm.auto import tqdm

T = TypeVar("T")


def known_cardinality(dataset: tf.data.Dataset) -> int | None:
    """Number of elements of ``dataset`` when tf.data knows it without iterating, else None."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality >= 0 else None


def progress(iterable: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``iterable``, showing a tqdm bar when ``enabled``."""
    if not enabled:
        yield from iterable
        return
    with tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True) as bar:
        yield from bar
