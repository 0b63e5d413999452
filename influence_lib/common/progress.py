"""Progress bars for long loops (tqdm), with one switch to turn them off.

Only the outermost loop shows a bar: a loop running inside another one's bar (influence vectors
computed inside a pairwise pass, a Hessian inside a calculator's construction, ...) stays silent,
so that no nested bars (and the cursor-movement escape codes they write) end up in logs.
"""
import dataclasses
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import tensorflow as tf
from tqdm.auto import tqdm

T = TypeVar("T")
_SHOWN = threading.local()


def known_cardinality(dataset: tf.data.Dataset) -> int | None:
    """Number of elements of ``dataset`` when tf.data knows it without iterating, else None."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality >= 0 else None


def progress(iterable: Iterable[T], enabled: bool, desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate over ``iterable``, showing a tqdm bar when ``enabled`` and no other bar is showing."""
    depth = getattr(_SHOWN, "depth", 0)
    if not enabled or depth > 0:
        yield from iterable
        return
    _SHOWN.depth = depth + 1
    try:
        with tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True) as bar:
            yield from bar
    finally:
        _SHOWN.depth = depth


def quieted(settings: T, show_progress: bool) -> T:
    """``settings`` (e.g. an IHVP factory) with its ``show_progress`` turned off when ``show_progress`` is False.

    A calculator's ``show_progress=False`` silences everything it runs, including what it builds from
    a factory whose own ``show_progress`` defaults to True. ``settings`` is never modified: a frozen
    dataclass gets a copy (``dataclasses.replace``); an object without a ``show_progress`` dataclass
    field is returned as it is.
    """
    if show_progress or not dataclasses.is_dataclass(settings) or isinstance(settings, type):
        return settings
    if not any(field.name == "show_progress" for field in dataclasses.fields(settings)):
        return settings
    return dataclasses.replace(settings, show_progress=False)
