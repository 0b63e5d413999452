"""Streaming top-k: keep the k best training samples per query while scanning a training set.

Memory is O(queries · k) whatever the size of the training set, and the result carries the
training-set index (position in iteration order) of every kept sample.
"""
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from .compiled import compiled_function
from .datasets import size_of
from .distribute import DataParallel, RowShards
from .enums import ORDER


class TopK(NamedTuple):
    """The k best training samples for each query.

    The first two fields are what Influenciae returns, in its order; ``indices`` is added.

    Attributes
    ----------
    samples
        The training inputs, shape ``(queries, k, *input_shape)`` (nested like the inputs).
    values
        Influence values, shape ``(queries, k)``, best first.
    indices
        Training-set indices (position in the iteration order of the training dataset),
        shape ``(queries, k)``.
    """

    samples: object
    values: tf.Tensor
    indices: tf.Tensor


@compiled_function
def _merge(best_values, best_indices, best_samples, new_values, new_indices, new_samples, descending: bool):
    """Merge a scored batch into the current top-k. Ties keep the earlier training index."""
    k = tf.shape(best_values)[1]
    values = tf.concat([best_values, new_values], axis=1)
    keys = values if descending else -values
    _, positions = tf.math.top_k(keys, k=k, sorted=True)
    queries = tf.shape(new_values)[0]
    indices = tf.concat([best_indices, tf.tile(new_indices[None], [queries, 1])], axis=1)
    from_old = positions < k

    def pick(old, new):
        old_part = tf.gather(old, tf.minimum(positions, k - 1), batch_dims=1)
        new_part = tf.gather(new, tf.maximum(positions - k, 0))
        mask = tf.reshape(from_old, tf.concat([tf.shape(from_old), tf.ones([tf.rank(old) - 2], tf.int32)], 0))
        return tf.where(mask, old_part, new_part)

    samples = tf.nest.map_structure(pick, best_samples, new_samples)
    return (tf.gather(values, positions, batch_dims=1), tf.gather(indices, positions, batch_dims=1), samples)


def check_top_k_arguments(k: int, order: ORDER) -> None:
    """Raise a clear error unless ``k`` is a positive integer and ``order`` an :class:`ORDER`."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}.")
    if not isinstance(order, ORDER):
        raise TypeError(f"order must be ORDER.DESCENDING or ORDER.ASCENDING, got {order!r}.")


class StreamingTopK:
    """Keeps, for each of ``queries`` rows, the ``k`` largest (or smallest) scores seen so far.

    Parameters
    ----------
    k
        How many training samples to keep per query.
    order
        ``ORDER.DESCENDING`` keeps the largest values, ``ORDER.ASCENDING`` the smallest.
    """

    def __init__(self, k: int, order: ORDER = ORDER.DESCENDING):
        check_top_k_arguments(k, order)
        self.k = int(k)
        self.order = order
        self._state = None
        self._seen = 0

    def update(self, values: tf.Tensor, indices: tf.Tensor, samples) -> None:
        """Add one batch of training samples scored against every query.

        Parameters
        ----------
        values
            Scores, shape ``(queries, batch)``.
        indices
            Training-set indices of the batch, shape ``(batch,)``.
        samples
            Training inputs of the batch, shape ``(batch, ...)`` (any nesting).
        """
        values = tf.convert_to_tensor(values)
        if self._state is None:
            queries = tf.shape(values)[0]
            fill = -np.inf if self.order == ORDER.DESCENDING else np.inf
            self._state = (
                tf.fill([queries, self.k], tf.constant(fill, values.dtype)),
                tf.fill([queries, self.k], tf.constant(-1, tf.int64)),
                tf.nest.map_structure(
                    lambda s: tf.zeros(tf.concat([[queries, self.k], tf.shape(s)[1:]], 0), s.dtype), samples
                ),
            )
        if size_of(values, axis=1) == 0:
            return
        self._state = _merge(
            *self._state, values, tf.cast(indices, tf.int64), samples, self.order == ORDER.DESCENDING
        )
        self._seen += size_of(values, axis=1)

    def candidates(self) -> TopK:
        """All ``k`` kept columns, untrimmed: columns not yet filled hold ``∓inf`` and index ``-1``."""
        if self._state is None:
            raise ValueError("No training sample was scored: the training dataset is empty.")
        values, indices, samples = self._state
        return TopK(samples, values, indices)

    def result(self) -> TopK:
        """The kept samples, best first; fewer than k columns when fewer samples were seen."""
        if self._state is None:
            raise ValueError("No training sample was scored: the training dataset is empty.")
        kept = min(self.k, self._seen)
        values, indices, samples = self._state
        return TopK(tf.nest.map_structure(lambda s: s[:, :kept], samples), values[:, :kept], indices[:, :kept])


def merge_candidates(candidates: TopK, k: int, order: ORDER, seen: int) -> TopK:
    """The ``k`` best of several top-k candidate sets laid side by side along axis 1.

    Ranks by value, then by training index (smallest first; unfilled columns, index ``-1``, last), which is
    the order one :class:`StreamingTopK` over all the samples keeps — so candidates kept per replica merge to
    the single-device result, ties included. At most ``seen`` (the number of samples scored) columns are kept.
    """
    indices = candidates.indices
    by_index = tf.argsort(tf.where(indices < 0, tf.constant(np.iinfo(np.int64).max, tf.int64), indices), axis=1,
                          stable=True)
    values = tf.gather(candidates.values, by_index, batch_dims=1)
    keys = values if order == ORDER.DESCENDING else -values
    _, positions = tf.math.top_k(keys, k=min(k, int(keys.shape[1])), sorted=True)
    chosen = tf.gather(by_index, positions, batch_dims=1)[:, : min(k, seen)]
    return TopK(
        tf.nest.map_structure(lambda s: tf.gather(s, chosen, batch_dims=1), candidates.samples),
        tf.gather(candidates.values, chosen, batch_dims=1),
        tf.gather(indices, chosen, batch_dims=1),
    )


class ShardedTopK:
    """Streaming top-k over training batches whose scores stay on the replicas that computed them.

    Each of this worker's replicas keeps a :class:`StreamingTopK` of its own rows (global training
    indices, on its device); :meth:`result` gathers the ``k`` candidates of every replica of every
    worker (one all-gather of ``(queries, replicas·k)`` values, indices and samples) and merges them
    (:func:`merge_candidates`): the full score rows are never gathered.

    Parameters
    ----------
    parallel
        The :class:`~influence_lib.common.distribute.DataParallel` the training batches were split by.
    k, order
        As for :class:`StreamingTopK`.
    """

    def __init__(self, parallel: DataParallel, k: int, order: ORDER = ORDER.DESCENDING):
        check_top_k_arguments(k, order)
        self.parallel, self.k, self.order = parallel, int(k), order
        self._best = [StreamingTopK(k, order) for _ in parallel.local_bounds(0)]
        self._seen = 0

    def update(
        self, shards: RowShards, score: Callable[[tf.Tensor], tf.Tensor], offset: int, samples: object
    ) -> None:
        """Score one training batch on the replicas holding it.

        Parameters
        ----------
        shards
            The batch's per-replica rows (influence vectors).
        score
            ``part -> (queries, rows)`` scores of one replica's rows.
        offset
            Training-set index of the batch's first row.
        samples
            The batch's training inputs (all rows, any nesting).
        """
        for index, ((start, end), part) in enumerate(zip(shards.local_bounds, shards.parts)):
            def step(best=self._best[index], start=start, end=end, part=part):
                rows = tf.nest.map_structure(lambda s: s[start:end], samples)
                best.update(score(part), tf.range(offset + start, offset + end, dtype=tf.int64), rows)

            self.parallel.on_replica(index, step)
        self._seen += shards.size

    def result(self) -> TopK:
        """The merged top-k, best first, as :meth:`StreamingTopK.result` over all the samples would give it."""
        parts = [self.parallel.on_replica(index, best.candidates) for index, best in enumerate(self._best)]
        replicas = self.parallel.replicas
        samples, values, indices = self.parallel.gather([tuple(part) for part in parts], replicas * self.k, axis=1)
        return merge_candidates(TopK(samples, values, indices), self.k, self.order, self._seen)
