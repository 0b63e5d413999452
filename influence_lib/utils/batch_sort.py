"""BatchSort: keep, per query, the k entries with the largest (or smallest) scores of a stream of
batches whose entries differ per query (Influenciae's ``utils.BatchSort``).

When the training samples are shared by every query, :class:`~influence_lib.common.top_k.StreamingTopK`
keeps one copy of them and training indices; BatchSort stores a ``(queries, k, ...)`` element per
kept entry, for keys that are already per query.
"""
import numpy as np
import tensorflow as tf

from ..common.enums import ORDER
from ..common.top_k import check_top_k_arguments


class BatchSort:
    """The k best ``(key, value)`` pairs per query seen so far.

    Parameters
    ----------
    batch_shape
        Shape of one key (e.g. an input image), without the query and entry axes.
    k_shape
        ``(queries, k)``.
    dtype
        dtype of the values.
    order
        ``ORDER.DESCENDING`` keeps the largest values, ``ORDER.ASCENDING`` the smallest.

    Notes
    -----
    Memory is ``queries · k`` keys whatever the number of batches added. Ties keep the entry added
    first. Until k entries were added, the missing ones have zero keys and ``∓inf`` values.
    """

    def __init__(self, batch_shape, k_shape, dtype: tf.DType = tf.float32, order: ORDER = ORDER.DESCENDING):
        queries, k = (int(size) for size in k_shape)
        check_top_k_arguments(k, order)
        self.k = k
        self.order = order
        self.dtype = tf.as_dtype(dtype)
        self._key_shape = [queries, k, *[int(size) for size in batch_shape]]
        self._value_shape = [queries, k]
        self.reset()

    def reset(self) -> None:
        """Forget every entry."""
        fill = -np.inf if self.order == ORDER.DESCENDING else np.inf
        self.best_values = tf.fill(self._value_shape, tf.constant(fill, self.dtype))
        self.best_batch = tf.zeros(self._key_shape, self.dtype)

    def add_all(self, batch_key: tf.Tensor, batch_values: tf.Tensor) -> None:
        """Merge a batch: keys ``(queries, n, *batch_shape)``, values ``(queries, n)``."""
        batch_key = tf.cast(batch_key, self.best_batch.dtype)
        batch_values = tf.cast(batch_values, self.dtype)
        if (
            batch_values.shape.rank != 2
            or batch_key.shape[:2] != batch_values.shape
            or batch_key.shape[2:] != self._key_shape[2:]
        ):
            raise ValueError(
                f"add_all expects keys (queries, n, *{self._key_shape[2:]}) and values (queries, n); got keys "
                f"{batch_key.shape} "
                f"and values {batch_values.shape}."
            )
        values = tf.concat([self.best_values, batch_values], axis=1)
        keys = tf.concat([self.best_batch, batch_key], axis=1)
        ranked = values if self.order == ORDER.DESCENDING else -values
        _, positions = tf.math.top_k(ranked, k=self.k, sorted=True)
        self.best_values = tf.gather(values, positions, batch_dims=1)
        self.best_batch = tf.gather(keys, positions, batch_dims=1)

    def get(self) -> tuple[tf.Tensor, tf.Tensor]:
        """``(keys (queries, k, ...), values (queries, k))``, best first."""
        return self.best_batch, self.best_values
