"""Nearest-neighbour search over influence vectors: the engine of ``top_k``.

``top_k(..., nearest_neighbors=...)`` hands the stream of ``(training batch, influence vectors)``
pairs to a :class:`BaseNearestNeighbors`, which returns, for a batch of preprocessed samples to
evaluate, the k training samples with the largest (or smallest) influence. The default,
:class:`LinearNearestNeighbors`, scans the whole stream (exact, memory O(queries · k)); a subclass
can index the vectors instead (e.g. an approximate inner-product search) by implementing
:meth:`BaseNearestNeighbors.build` and :meth:`BaseNearestNeighbors.search`.
"""
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator

import tensorflow as tf

from ..common.datasets import batch_size_of, inputs_of
from ..common.distribute import RowShards
from ..common.enums import ORDER
from ..common.top_k import ShardedTopK, StreamingTopK, TopK, check_top_k_arguments

Score = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


class BaseNearestNeighbors(ABC):
    """Finds, for query vectors, the k training samples of highest (or lowest) score."""

    @abstractmethod
    def build(
        self,
        dataset: "Iterable | Callable[[], Iterator]",
        dot_product_fun: Score,
        k: int,
        query_batch_size: int | None = None,
        d_type: tf.DType | None = None,
        order: ORDER = ORDER.DESCENDING,
    ) -> None:
        """Index ``dataset``.

        Parameters
        ----------
        dataset
            Re-iterable ``(training batch, influence vectors)`` pairs (a ``tf.data.Dataset`` such as
            ``compute_influence_vector``'s result, or a function returning a fresh iterator).
        dot_product_fun
            ``(queries (q, D), vectors (n, D)) -> scores (q, n)``.
        k
            How many training samples to return per query.
        query_batch_size
            Expected number of queries per call (a hint; any number is accepted).
        d_type
            dtype of the returned scores (``None``: the scores' own dtype).
        order
            ``ORDER.DESCENDING`` for the largest scores, ``ORDER.ASCENDING`` for the smallest.
        """

    @abstractmethod
    def search(self, vectors: tf.Tensor) -> TopK:
        """The k best training samples for each query row of ``vectors``, with their training indices."""

    def query(self, vector_to_find: tf.Tensor, batch_size: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """Influenciae's interface: ``(values (q, k), training inputs (q, k, ...))``, best first."""
        result = self.search(vector_to_find)
        return result.values, result.samples


class LinearNearestNeighbors(BaseNearestNeighbors):
    """Exact search by one pass over the influence vectors per query batch.

    Each pass scores a whole training batch against all queries at once (one matrix product) and
    merges it into a :class:`~influence_lib.common.top_k.StreamingTopK`: memory O(queries · k)
    plus one training batch, whatever the size of the training set. Influence vectors split across
    the replicas of a ``tf.distribute`` strategy (:class:`~influence_lib.common.distribute.RowShards`)
    are scored where they are, each replica keeping its own top-k, and the candidates merged
    (:class:`~influence_lib.common.top_k.ShardedTopK`).
    """

    def __init__(self):
        self._pairs: Callable[[], Iterator] | None = None

    def build(self, dataset, dot_product_fun, k, query_batch_size=None, d_type=None, order=ORDER.DESCENDING):
        check_top_k_arguments(k, order)
        if not callable(dot_product_fun):
            raise TypeError(f"dot_product_fun must be callable, got {type(dot_product_fun).__name__}.")
        if callable(dataset) and not isinstance(dataset, tf.data.Dataset):
            self._pairs = dataset
        else:
            self._pairs = lambda: iter(dataset)
        self.dot_product_fun = dot_product_fun
        self.k, self.order = int(k), order
        self.d_type = None if d_type is None else tf.as_dtype(d_type)

    def search(self, vectors: tf.Tensor) -> TopK:
        if self._pairs is None:
            raise ValueError("Call build(dataset, dot_product_fun, k) before searching.")
        best = None
        offset = 0
        for train_batch, influence_vectors in self._pairs():
            size = batch_size_of(train_batch)
            if isinstance(influence_vectors, RowShards):
                best = best or ShardedTopK(influence_vectors.parallel, self.k, self.order)
                score = functools.partial(self.dot_product_fun, vectors)
                best.update(influence_vectors, score, offset, inputs_of(train_batch))
            else:
                best = best or StreamingTopK(self.k, self.order)
                scores = self.dot_product_fun(vectors, influence_vectors)
                best.update(scores, tf.range(offset, offset + size, dtype=tf.int64), inputs_of(train_batch))
            offset += size
        result = (best or StreamingTopK(self.k, self.order)).result()
        if self.d_type is None:
            return result
        return TopK(result.samples, tf.cast(result.values, self.d_type), result.indices)
