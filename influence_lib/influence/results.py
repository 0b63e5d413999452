"""Turn any result of an influence calculator into NumPy arrays a notebook can hold.

Results stream (memory bounded by a batch); :func:`to_numpy` concatenates one of them into
arrays ``(values, indices)``, so it holds the whole result in memory:

==============================================  ====================  =========================
result                                          ``values``            ``indices``
==============================================  ====================  =========================
``compute_influence_values`` (self-influence)   ``(n,)``              ``(n,)`` training indices
``compute_influence_vector``                    ``(n, D)``            ``(n,)`` training indices
``estimate_influence_values_in_batches``        ``(m, n)``            ``(n,)`` training indices
``top_k`` (per sample to evaluate)              ``(m, k)``            ``(m, k)`` training indices
``compute_top_k_from_training_dataset``         ``(k,)``              ``(k,)`` training indices
==============================================  ====================  =========================

``m`` samples to evaluate, ``n`` training samples; training indices are positions in the
iteration order of the training set.
"""
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from ..common.top_k import TopK


class NumpyResult(NamedTuple):
    """A result as NumPy arrays: scores and the training-set indices they refer to (see module doc)."""

    values: np.ndarray
    indices: np.ndarray


def _concatenate(parts: list, what: str, axis: int = 0) -> np.ndarray:
    if not parts:
        raise ValueError(f"The {what} result is empty: it yields no batch.")
    return np.concatenate(parts, axis=axis)


def _pairwise(batches: Iterable) -> np.ndarray:
    rows = []
    for element in batches:
        if not isinstance(element, tuple) or len(element) != 2 or not isinstance(element[1], tf.data.Dataset):
            raise TypeError(
                "to_numpy expects a result of the library: a dataset from compute_influence_values, "
                "compute_influence_vector or top_k, the InfluenceBatches of estimate_influence_values_in_batches, "
                f"or a TopK; got an iterable of {type(element).__name__}."
            )
        rows.append(_concatenate([np.asarray(values) for _, values in element[1]], "pairwise", axis=1))
    return _concatenate(rows, "pairwise")


def to_numpy(result) -> NumpyResult:
    """``(values, indices)`` of any influence result as NumPy arrays (see the module's table).

    Parameters
    ----------
    result
        What a calculator returned: a result dataset, an ``InfluenceBatches`` or a ``TopK``.

    Raises
    ------
    TypeError
        If ``result`` is none of those.
    """
    if isinstance(result, TopK):
        return NumpyResult(np.asarray(result.values), np.asarray(result.indices))
    if isinstance(result, tf.data.Dataset):
        size = len(result.element_spec) if isinstance(result.element_spec, tuple) else 0
        if size == 4:
            elements = list(result)
            values = _concatenate([np.asarray(element[1]) for element in elements], "top-k")
            return NumpyResult(values, _concatenate([np.asarray(element[3]) for element in elements], "top-k"))
        if size == 2:
            values = _concatenate([np.asarray(element[-1]) for element in result], "influence")
            return NumpyResult(values, np.arange(len(values), dtype=np.int64))
        raise TypeError(f"to_numpy does not know a result dataset with elements {result.element_spec}.")
    if isinstance(result, Iterable) and not isinstance(result, (str, bytes, np.ndarray, tf.Tensor)):
        values = _pairwise(result)
        return NumpyResult(values, np.arange(values.shape[1], dtype=np.int64))
    raise TypeError(
        "to_numpy expects a result of the library (a result dataset, InfluenceBatches or TopK), got "
        f"{type(result).__name__}."
    )


def extract_only_values(result) -> tf.Tensor:
    """The values of any influence result as one tensor (``to_numpy(result).values``).

    Self-influence ``(n,)``, influence vectors ``(n, D)``, pairwise values ``(m, n)``, top-k values
    ``(m, k)`` or ``(k,)``.
    """
    return tf.constant(to_numpy(result).values)
