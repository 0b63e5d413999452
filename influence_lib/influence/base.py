"""The shared machinery of every influence calculator: batching over ``tf.data``, influence-vector
caching (memory, disk or none), pairwise values in batches, streaming top-k with training-set
indices, and progress bars. Subclasses implement only the math hooks.

Two levels, as in Influenciae:

* :class:`SelfInfluenceCalculator` — methods that only give a score per training sample
  (hook: ``_compute_influence_value_from_batch``).
* :class:`BaseInfluenceCalculator` — methods whose influence of training sample ``z`` on a
  sample to evaluate ``t`` factors as ``⟨φ(t), ψ(z)⟩``: ``ψ`` is the *influence vector* of a
  training sample (hook ``_compute_influence_vector``), ``φ`` the preprocessed sample to
  evaluate (hook ``_preprocess_samples``). Influence vectors are computed once per training
  set and reused for every sample to evaluate.

Training-set indices are positions in the iteration order of the training dataset: pass a
dataset that iterates in the same order every time (no reshuffling; a training set that visibly
reshuffles is refused, see :func:`~influence_lib.common.datasets.check_fixed_order`).

Values and influence vectors carry the calculator's :attr:`~SelfInfluenceCalculator.value_dtype`:
float64 when its model computes in float64 (every weight of a float64 Keras model), float32
otherwise (:data:`VALUE_DTYPE`, also for float16, bfloat16 and mixed-precision models).
"""
import functools
import itertools
import os
import shutil
import tempfile
import warnings
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import zip_longest

import keras
import numpy as np
import tensorflow as tf

from ..common.distribute import SAME_DATA, RowShards, data_parallel
from ..common.datasets import (
    Batch,
    batch_size_of,
    check_dataset,
    RESHUFFLE_FIX as _RESHUFFLE_FIX,
    check_fixed_order,
    inputs_of,
    iterate_batches,
    size_of,
)
from ..common.devices import check_device, device_scope, on_device
from ..common.enums import CACHE, ORDER
from ..common.errors import NonFiniteError
from ..common.memory import memory_budget_bytes, warn_over_budget
from ..common.progress import known_cardinality, progress
from ..common.streams import GeneratorDataset
from ..common.top_k import ShardedTopK, StreamingTopK, TopK, check_top_k_arguments
from ..common.storage import ShardStore, atomic_directory, fingerprint_dataset, fingerprint_variables
from ..common.vector_cache import open_vectors, read_vectors, save_vectors
from ..model.influence_model import InfluenceModel, compute_dtype_of
from ..utils.nearest_neighbors import BaseNearestNeighbors, LinearNearestNeighbors
from ._fingerprint import calculator_state
from .results import extract_only_values  # noqa: F401  (re-exported: its historical home)

VALUE_DTYPE = tf.float32


def result_dtype(model) -> tf.DType:
    """The dtype of the values computed over ``model`` (an InfluenceModel or a Keras model):
    float64 when it computes in float64, else :data:`VALUE_DTYPE` (float32)."""
    if isinstance(model, InfluenceModel):
        return model.dtype
    if isinstance(model, keras.Model) and model.weights:
        return compute_dtype_of(model.weights)
    return VALUE_DTYPE


def _non_finite_rows(values: tf.Tensor, first_index: int) -> list[int]:
    """Training indices (at most 10) of the rows of ``values`` holding a NaN or an infinity; the first row is
    sample ``first_index``."""
    finite = tf.math.is_finite(values)
    if bool(tf.reduce_all(finite)):
        return []
    bad = tf.where(~tf.reduce_all(tf.reshape(finite, [tf.shape(finite)[0], -1]), axis=1))[:, 0]
    return (bad.numpy() + first_index).tolist()[:10]


def _raise_non_finite(indices: list[int], what: str) -> None:
    if indices:
        raise NonFiniteError(
            f"{what} are NaN or infinite for the samples at indices {indices}: their loss or gradients are not "
            "finite (check those inputs and labels), or the Hessian is ill-conditioned (use damping)."
        )


def _finite_rows(values: tf.Tensor) -> tf.Tensor:
    """Whether every entry of each row of ``values`` is finite, shape ``(batch,)`` (dispatched, not read back)."""
    finite = tf.math.is_finite(values)
    return finite if values.shape.rank == 1 else tf.reduce_all(finite, axis=list(range(1, values.shape.rank)))


def _raise_if_not_finite(rows: "tf.Tensor | None", first_index: int, what: str) -> None:
    """Raise :class:`NonFiniteError` naming the training indices of the rows :func:`_finite_rows` found non-finite
    (``rows=None``: values already checked)."""
    if rows is None:
        return
    finite = rows.numpy()
    if not finite.all():
        with _located(first_index):
            _raise_non_finite((np.flatnonzero(~finite) + first_index).tolist()[:10], what)


def _checked_finite(
    computed: Iterator[tuple[Batch, "tf.Tensor | RowShards", int]], what: str
) -> Iterator[tuple[Batch, "tf.Tensor | RowShards"]]:
    """``(batch, values)`` for each ``(batch, values, first training index)`` of ``computed``, checked finite.

    The check never makes the device wait for the host: the per-row test of a batch's values is dispatched
    as soon as they are, and read back only once the next batch has been dispatched (one batch of look-ahead),
    so an accelerator always has the next batch queued. A batch holding a NaN or infinite value raises
    :class:`NonFiniteError` (naming the training indices) before it is yielded; an error raised while
    computing a batch comes after the batches before it have been yielded. Values that are not a tensor —
    :class:`RowShards`, checked across workers as they are computed (:func:`_finite_shards`) — pass through.
    """
    pending = None
    iterator = iter(computed)
    while True:
        try:
            batch, values, first_index = next(iterator)
        except StopIteration:
            break
        except Exception:
            if pending is not None:
                _raise_if_not_finite(pending[2], pending[3], what)
                yield pending[0], pending[1]
            raise
        rows = _finite_rows(values) if isinstance(values, tf.Tensor) else None
        if pending is not None:
            _raise_if_not_finite(pending[2], pending[3], what)
            yield pending[0], pending[1]
        pending = batch, values, rows, first_index
    if pending is not None:
        _raise_if_not_finite(pending[2], pending[3], what)
        yield pending[0], pending[1]


def _as_dtype(values: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """``values`` cast to ``dtype``; no op at all when it already has it."""
    return values if values.dtype == dtype else tf.cast(values, dtype)


def _as_vector(values: tf.Tensor) -> tf.Tensor:
    return values if values.shape.rank == 1 else tf.reshape(values, [-1])


def _as_row(values: tf.Tensor) -> tf.Tensor:
    """Self-influence values ``(rows,)`` as the scores of one query, ``(1, rows)``."""
    return values[None]


def _finite_shards(
    shards: RowShards, convert: Callable[[tf.Tensor], tf.Tensor], first_index: int, what: str
) -> RowShards:
    """``shards`` with ``convert`` applied to each part, refused on every worker if any worker's rows hold a NaN
    or an infinity (the indices are agreed across workers: a worker raising alone would leave the others
    waiting in their next collective)."""
    parts = [convert(part) for part in shards.parts]
    bad = [
        index
        for part, (start, _) in zip(parts, shards.local_bounds)
        for index in _non_finite_rows(part, first_index + start)
    ]
    _raise_non_finite(shards.parallel.union_across_workers(bad), what)
    return RowShards(shards.parallel, parts, shards.size)


@contextmanager
def _located(first_index: int):
    """Prefix a NonFiniteError raised while processing a batch with the batch's first training index."""
    try:
        yield
    except NonFiniteError as error:
        raise NonFiniteError(f"In the training batch starting at sample {first_index}: {error}") from error


class _TemporaryCache:
    """A temporary directory removed when the last result using it is released, or at exit."""

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="influence_vectors_")
        self.path = os.path.join(self.directory, "vectors")
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.directory, ignore_errors=True)


@contextmanager
def _writing(path: str, what: str) -> Iterator[str]:
    """A temporary directory swapped in at ``path`` once complete (:func:`atomic_directory`); TensorFlow's
    file errors become an ``OSError`` naming ``path``."""
    try:
        with atomic_directory(path, what) as temporary:
            yield temporary
    except (tf.errors.PermissionDeniedError, tf.errors.FailedPreconditionError, tf.errors.NotFoundError,
            tf.errors.ResourceExhaustedError, tf.errors.DataLossError) as error:
        raise OSError(f"Cannot write the {what} at {path!r}: {error.message.splitlines()[0]}") from None


class InfluenceBatches:
    """Re-iterable stream of ``(batch_to_evaluate, dataset of (training batch, values))`` pairs.

    Each values tensor has shape ``(batch_to_evaluate, training_batch)``. Iterating computes lazily,
    one batch to evaluate at a time.
    """

    def __init__(
        self, make_iterator: Callable[[], Iterator[tuple[Batch, tf.data.Dataset]]], cardinality: int | None = None
    ):
        self._make_iterator = make_iterator
        self._cardinality = cardinality

    def __iter__(self) -> Iterator[tuple[Batch, tf.data.Dataset]]:
        return self._make_iterator()

    def __len__(self) -> int:
        """Number of batches to evaluate, when the dataset to evaluate knows it."""
        if self._cardinality is None:
            raise TypeError("The length of the dataset to evaluate is unknown, so is this result's.")
        return self._cardinality


class SelfInfluenceCalculator(ABC):
    """Base of every calculator: self-influence scores and their streaming top-k.

    Subclasses set ``self.show_progress`` and implement ``_compute_influence_value_from_batch``.
    Every per-batch hook runs data-parallel over the replicas of ``self.strategy`` (or of the
    ``tf.distribute`` strategy in scope when it is None): see :mod:`influence_lib.common.distribute`.
    """

    show_progress: bool = True
    strategy: "tf.distribute.Strategy | None" = None

    @property
    def _primary_model(self):
        """The model whose dtype the results carry and whose inputs datasets are checked against: ``self.model``
        (an :class:`InfluenceModel` or a Keras model); calculators over several models return their first."""
        return getattr(self, "model", None)

    @property
    def value_dtype(self) -> tf.DType:
        """dtype of every value and influence vector returned: float64 for a float64 model, else float32."""
        return result_dtype(self._primary_model)

    @abstractmethod
    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        """Self-influence of each sample of one batch, shape ``(batch,)``."""

    def _check_dataset(self, dataset: tf.data.Dataset, name: str) -> None:
        model = self._primary_model
        if isinstance(model, InfluenceModel):
            model.check_dataset(dataset, name)
        else:
            check_dataset(dataset, name)

    def _check_train_set(self, train_set: tf.data.Dataset) -> None:
        """The dataset checks of :meth:`_check_dataset`, and a fixed iteration order (indices are positions)."""
        self._check_dataset(train_set, "train_set")
        check_fixed_order(train_set, "train_set")

    def _self_influence_batches(
        self, train_set: tf.data.Dataset, sharded: bool = False
    ) -> Iterator[tuple[Batch, "tf.Tensor | RowShards"]]:
        """``(batch, values)`` of ``train_set``; with ``sharded`` under a strategy, the values stay on the replicas
        that computed them (a :class:`RowShards` of this worker's rows). Checked finite by :func:`_checked_finite`."""
        return _checked_finite(self._unchecked_self_influence_batches(train_set, sharded), "Self-influence values")

    def _unchecked_self_influence_batches(
        self, train_set: tf.data.Dataset, sharded: bool
    ) -> Iterator[tuple[Batch, "tf.Tensor | RowShards", int]]:
        parallel = data_parallel(self.strategy)
        dtype = self.value_dtype
        offset = 0
        batches = progress(
            iterate_batches(train_set, "train_set"), self.show_progress, "Self-influence", known_cardinality(train_set)
        )
        for batch in batches:
            if offset == 0:
                parallel.check_identical(batch, "The first training batches", SAME_DATA)
            with _located(offset):
                if sharded and parallel.distributed:
                    shards = parallel.shard_rows(self._compute_influence_value_from_batch, batch)
                    values = _finite_shards(
                        shards, lambda part: _as_dtype(_as_vector(part), dtype), offset, "Self-influence values"
                    )
                else:
                    values = parallel.map_rows(self._compute_influence_value_from_batch, batch)
                    values = _as_dtype(_as_vector(values), dtype)
            yield batch, values, offset
            offset += batch_size_of(batch)

    def compute_influence_values(self, train_set: tf.data.Dataset, device: str | None = None) -> tf.data.Dataset:
        """Self-influence of every training sample.

        Parameters
        ----------
        train_set
            Batched training samples.
        device
            Device the values are computed on (e.g. ``'/GPU:0'``); ``None``: TensorFlow's placement.

        Returns
        -------
        tf.data.Dataset
            Lazily computed elements ``(batch, values)``: the training batch as given and its
            self-influence values, shape ``(batch,)``. :func:`extract_only_values` turns it into one tensor.
        """
        self._check_train_set(train_set)
        check_device(device)
        signature = (train_set.element_spec, tf.TensorSpec((None,), self.value_dtype))
        return GeneratorDataset(
            on_device(device, lambda: self._self_influence_batches(train_set)),
            signature,
            cardinality=known_cardinality(train_set),
        )

    def compute_top_k_from_training_dataset(
        self, train_set: tf.data.Dataset, k: int, order: ORDER = ORDER.DESCENDING
    ) -> TopK:
        """The k training samples with the largest (or smallest) self-influence, streaming.

        Memory is O(k) whatever the size of ``train_set``. Under a strategy each replica keeps the top k
        of its own rows and the candidates are merged (:class:`~influence_lib.common.top_k.ShardedTopK`).

        Returns
        -------
        TopK
            ``(samples, values, indices)``: training inputs ``(k, ...)``, self-influence ``(k,)``
            best first, and training-set indices ``(k,)``. Fewer than k when the set is smaller.
        """
        self._check_train_set(train_set)
        check_top_k_arguments(k, order)
        best = None
        offset = 0
        for batch, values in self._self_influence_batches(train_set, sharded=True):
            size = batch_size_of(batch)
            if isinstance(values, RowShards):
                best = best or ShardedTopK(values.parallel, k, order)
                best.update(values, _as_row, offset, inputs_of(batch))
            else:
                best = best or StreamingTopK(k, order)
                best.update(values[None], tf.range(offset, offset + size, dtype=tf.int64), inputs_of(batch))
            offset += size
        result = (best or StreamingTopK(k, order)).result()
        return TopK(tf.nest.map_structure(lambda s: s[0], result.samples), result.values[0], result.indices[0])


class BaseInfluenceCalculator(SelfInfluenceCalculator):
    """Base of the calculators whose influence factors as ``⟨φ(t), ψ(z)⟩`` (see module docstring)."""

    @abstractmethod
    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        """Influence vectors ψ(z) of one training batch, shape ``(batch, D)``."""

    @abstractmethod
    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        """Preprocessed samples to evaluate φ(t), shape ``(batch, D)``."""

    def _estimate_influence_value_from_influence_vector(
        self, preproc_test_sample: tf.Tensor, influence_vector: tf.Tensor
    ) -> tf.Tensor:
        """Influence of each training vector on each preprocessed sample, shape ``(test, train)``."""
        return tf.matmul(preproc_test_sample, influence_vector, transpose_b=True)

    def _layer_sizes(self) -> list[int] | None:
        """Sizes of the per-watched-layer segments of φ and ψ (``None``: the scores do not split by layer)."""
        return None

    def _preprocess_training_samples(self, samples: Batch) -> tf.Tensor:
        """φ of training samples, paired with their own ψ in self-influence (default: :meth:`_preprocess_samples`)."""
        return self._preprocess_samples(samples)

    def _values_per_layer(self, preproc_test_sample: tf.Tensor, influence_vector: tf.Tensor) -> list[tf.Tensor]:
        """Per watched layer ``⟨φ_l(t), ψ_l(z)⟩``, each ``(test, train)``; their sum is the influence value."""
        sizes = self._layer_sizes()
        if sizes is None:
            raise ValueError(
                f"{type(self).__name__} does not split its scores by watched layer; per-layer scores come from "
                "calculators whose influence is a sum over layers, e.g. FirstOrderInfluenceCalculator."
            )
        return [
            tf.matmul(phi, psi, transpose_b=True)
            for phi, psi in zip(tf.split(preproc_test_sample, sizes, axis=1), tf.split(influence_vector, sizes, axis=1))
        ]

    def influence_values_per_layer(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        """Influence of each training sample on each sample to evaluate, split by watched layer.

        Returns
        -------
        tf.Tensor
            Shape ``(layers, batch_to_evaluate, train_batch)``, layers in watched order; the sum over
            axis 0 is the influence value.
        """
        return tf.stack(self._values_per_layer(
            self._preprocess_samples(samples_to_evaluate), self._compute_influence_vector(train_samples)
        ))

    def self_influence_values_per_layer(self, train_samples: Batch) -> tf.Tensor:
        """Self-influence of each training sample split by watched layer, shape ``(layers, batch)``; sums to it."""
        values = self._values_per_layer(
            self._preprocess_training_samples(train_samples), self._compute_influence_vector(train_samples)
        )
        return tf.stack([tf.linalg.diag_part(value) for value in values])

    _fingerprint_ignored: tuple[str, ...] = ("show_progress", "strategy", "device")

    def _cache_fingerprint(self) -> dict:
        """Explicit settings that must match for a disk cache of influence vectors to be reused.

        Subclasses extend it with what :meth:`_disk_fingerprint` cannot find among their attributes.
        """
        return {"calculator": type(self).__name__}

    def _disk_fingerprint(self, train_set: tf.data.Dataset) -> dict:
        """Everything the influence vectors of ``train_set`` depend on, stored with a disk cache.

        :meth:`_cache_fingerprint`; the calculator's public scalar settings and those of the library
        objects it holds (curvature, ...), a hash of all weights of every model it uses, a hash of the
        tensors it fitted (see :mod:`influence_lib.influence._fingerprint`); and the training data: its
        structure, batch sizes and a hash of its whole contents (one pass reading data only).
        Attributes named in ``_fingerprint_ignored`` (e.g. ``show_progress``) are left out. On a multi-worker
        cluster, where each worker stores only its replicas' rows, the layout of the rows too.
        """
        fingerprint = {
            **calculator_state(self, self._fingerprint_ignored),
            **self._cache_fingerprint(),
            "data": fingerprint_dataset(train_set, batches=-1),
        }
        layout = data_parallel(self.strategy).layout()
        return {**fingerprint, "rows": layout} if layout else fingerprint

    def _influence_vector_batches(
        self, train_set: tf.data.Dataset, sharded: bool = False
    ) -> Iterator[tuple[Batch, "tf.Tensor | RowShards"]]:
        """``(batch, vectors)`` of ``train_set``; with ``sharded`` under a strategy, the vectors stay on the replicas
        that computed them (a :class:`RowShards` of this worker's rows) instead of being gathered. Checked finite
        by :func:`_checked_finite`."""
        return _checked_finite(self._unchecked_influence_vector_batches(train_set, sharded), "Influence vectors")

    def _unchecked_influence_vector_batches(
        self, train_set: tf.data.Dataset, sharded: bool
    ) -> Iterator[tuple[Batch, "tf.Tensor | RowShards", int]]:
        parallel = data_parallel(self.strategy)
        dtype = self.value_dtype
        offset = 0
        batches = progress(
            iterate_batches(train_set, "train_set"),
            self.show_progress,
            "Influence vectors",
            known_cardinality(train_set),
        )
        for batch in batches:
            if offset == 0:
                parallel.check_identical(batch, "The first training batches", SAME_DATA)
            with _located(offset):
                if sharded and parallel.distributed:
                    shards = parallel.shard_rows(self._compute_influence_vector, batch)
                    vectors = _finite_shards(
                        shards, functools.partial(_as_dtype, dtype=dtype), offset, "Influence vectors"
                    )
                else:
                    vectors = _as_dtype(parallel.map_rows(self._compute_influence_vector, batch), dtype)
            yield batch, vectors, offset
            offset += batch_size_of(batch)

    def compute_influence_vector(
        self,
        train_set: tf.data.Dataset,
        save_influence_vector_ds_path: str | None = None,
        device: str | None = None,
    ) -> tf.data.Dataset:
        """Influence vectors ψ(z) of every training sample.

        Parameters
        ----------
        train_set
            Batched training samples.
        save_influence_vector_ds_path
            If given, the vectors are computed once, saved there (reusable with
            ``load_influence_vector_path``), and the returned dataset reads them back.
        device
            Device the vectors are computed on (e.g. ``'/GPU:0'``); ``None``: TensorFlow's placement.

        Returns
        -------
        tf.data.Dataset
            Elements ``(batch, vectors)`` with vectors of shape ``(batch, D)``.
        """
        self._check_train_set(train_set)
        check_device(device)
        if save_influence_vector_ds_path is not None:
            with device_scope(device):
                self._save_influence_vectors(train_set, save_influence_vector_ds_path)
            stored = self._vector_source(train_set, CACHE.DISK, save_influence_vector_ds_path, None)
            make_pairs = _gathering(stored)
        else:
            make_pairs = lambda: self._influence_vector_batches(train_set)
        signature = (train_set.element_spec, tf.TensorSpec((None, None), self.value_dtype))
        return GeneratorDataset(on_device(device, make_pairs), signature, cardinality=known_cardinality(train_set))

    def _save_influence_vectors(self, train_set: tf.data.Dataset, path: str) -> None:
        batches = self._influence_vector_batches(train_set, sharded=True)
        self._write_vectors((vectors for _, vectors in batches), path, train_set)

    def _write_vectors(self, vector_batches: Iterator, path: str, train_set: tf.data.Dataset) -> None:
        """Save vector batches (tensors, or :class:`RowShards` of which this worker's rows are written) to ``path``
        (``path/worker_INDEX`` on a multi-worker cluster)."""
        fingerprint = self._disk_fingerprint(train_set)
        path = data_parallel(self.strategy).worker_path(path)
        local = (vectors.local_rows() if isinstance(vectors, RowShards) else vectors for vectors in vector_batches)
        save_vectors(local, path, fingerprint, self.value_dtype)

    def _vector_source(
        self,
        train_set: tf.data.Dataset,
        cache: CACHE,
        load_path: str | None,
        save_path: str | None,
    ) -> Callable[[], Iterator[tuple[Batch, tf.Tensor]]]:
        """A function that replays ``(training batch, influence vectors)`` pairs, computing them at most once
        (MEMORY or DISK) or on every call (NO_CACHE)."""
        if not isinstance(cache, CACHE):
            raise TypeError(f"influence_vector_in_cache must be CACHE.MEMORY, CACHE.DISK or CACHE.NO_CACHE, got {cache!r}.")
        if load_path is None and save_path is not None:
            self._save_influence_vectors(train_set, save_path)
            load_path = save_path
        temporary = None
        parallel = data_parallel(self.strategy)
        if load_path is None and cache == CACHE.MEMORY:
            vectors, first, temporary = self._vectors_in_memory(train_set)
            if temporary is None:
                return lambda: _pair_with_batches(train_set, vectors, first)
            load_path, cache = temporary.path, CACHE.DISK
        if load_path is None and cache == CACHE.DISK:
            temporary = _TemporaryCache()
            load_path = temporary.path
            self._save_influence_vectors(train_set, load_path)
        if load_path is not None:
            worker_path = data_parallel(self.strategy).worker_path(load_path)
            store = open_vectors(worker_path, self._disk_fingerprint(train_set))
            first = _batch_digest(next(iterate_batches(train_set, "train_set")))
            if cache == CACHE.MEMORY and self._fits_in_memory(store, worker_path):
                vectors = [tf.constant(array) for array in read_vectors(store)]
                return lambda: _pair_with_batches(train_set, vectors, first, parallel=parallel)
            return lambda: _pair_with_batches(
                train_set, map(tf.constant, read_vectors(store)), first, temporary, parallel
            )
        return lambda: self._influence_vector_batches(train_set, sharded=True)

    def _vectors_in_memory(
        self, train_set: tf.data.Dataset
    ) -> tuple[list["tf.Tensor | RowShards"], str | None, "_TemporaryCache | None"]:
        """The influence vectors of ``train_set`` as a list of batches with the digest of the first training
        batch, or, when they would not fit in the memory budget (:mod:`influence_lib.common.memory`), a
        temporary disk cache holding them. Under a strategy each batch is a :class:`RowShards`: a worker
        keeps (and counts against its budget, and writes to disk) only the rows of its own replicas."""
        budget = memory_budget_bytes()
        batches = self._influence_vector_batches(train_set, sharded=True)
        kept, stored, first = [], 0, None
        for batch, vectors in batches:
            first = _batch_digest(batch) if first is None else first
            kept.append(vectors)
            parts = vectors.parts if isinstance(vectors, RowShards) else [vectors]
            stored += sum(part.shape.num_elements() * part.dtype.size for part in parts)
            planned = max(stored, stored * (known_cardinality(train_set) or 0) // len(kept))
            if budget is not None and planned > budget:
                warn_over_budget(
                    f"The training set's influence vectors ({int(parts[0].shape[1])} floats per sample)",
                    planned,
                    budget,
                    "they are written to a temporary directory on disk instead (CACHE.DISK); pass "
                    "influence_vector_in_cache=CACHE.DISK or CACHE.NO_CACHE to choose explicitly",
                    stacklevel=4,
                )
                temporary = _TemporaryCache()
                rest = (vectors for _, vectors in batches)
                self._write_vectors(itertools.chain(kept, rest), temporary.path, train_set)
                return [], None, temporary
        return kept, first, None

    @staticmethod
    def _fits_in_memory(store: ShardStore, path: str) -> bool:
        """Whether influence vectors read from the disk cache at ``path`` may be kept in memory; warn if not."""
        budget = memory_budget_bytes()
        if budget is None:
            return True
        first = next(read_vectors(store))
        needed = sum(store.completion()["batch_sizes"]) * int(first.shape[1]) * first.dtype.itemsize
        if needed <= budget:
            return True
        warn_over_budget(
            f"The influence vectors cached at {path!r} ({int(first.shape[1])} floats per sample)",
            needed,
            budget,
            "they are read from disk on every pass instead of being kept in memory",
            stacklevel=4,
        )
        return False

    def estimate_influence_values_in_batches(
        self,
        dataset_to_evaluate: tf.data.Dataset,
        train_set: tf.data.Dataset,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        load_influence_vector_path: str | None = None,
        save_influence_vector_path: str | None = None,
        save_influence_value_path: str | None = None,
        device: str | None = None,
    ) -> InfluenceBatches:
        """Influence of every training sample on every sample to evaluate, batch by batch.

        Parameters
        ----------
        dataset_to_evaluate
            Batched samples whose predictions are explained.
        train_set
            Batched training samples.
        influence_vector_in_cache
            Keep the training influence vectors in memory, on disk, or recompute them each time.
        load_influence_vector_path, save_influence_vector_path
            Reuse vectors saved earlier, or save the ones computed now.
        save_influence_value_path
            If given, the values for the i-th batch to evaluate are saved (``tf.data.Dataset.save``)
            under ``{path}/batch_{i:06d}`` and the result reads them back.
        device
            Device the computation runs on (e.g. ``'/GPU:0'``); ``None``: TensorFlow's placement.

        Returns
        -------
        InfluenceBatches
            Iterable of ``(batch_to_evaluate, dataset)``; the dataset yields
            ``(training batch, values)`` — the training batch as the training set gives it (e.g.
            ``(x, y)``), as in Influenciae — with values of shape ``(batch_to_evaluate, training_batch)``.
        """
        self._check_dataset(dataset_to_evaluate, "dataset_to_evaluate")
        self._check_train_set(train_set)
        check_device(device)
        with device_scope(device):
            source = on_device(device, self._vector_source(
                train_set, influence_vector_in_cache, load_influence_vector_path, save_influence_vector_path
            ))
        signature = (train_set.element_spec, tf.TensorSpec((None, None), self.value_dtype))

        def values_for(evaluated: tf.Tensor) -> tf.data.Dataset:
            def generate():
                for batch, vectors in source():
                    with device_scope(device):
                        if isinstance(vectors, RowShards):  # scored on each replica, gathered as columns
                            values = vectors.columns(
                                functools.partial(self._estimate_influence_value_from_influence_vector, evaluated)
                            )
                        else:
                            values = self._estimate_influence_value_from_influence_vector(evaluated, vectors)
                    yield batch, values

            return GeneratorDataset(generate, signature, cardinality=known_cardinality(train_set))

        def evaluated_batches() -> Iterator[tuple[Batch, tf.data.Dataset]]:
            parallel = data_parallel(self.strategy)
            for batch in iterate_batches(dataset_to_evaluate, "dataset_to_evaluate"):
                yield batch, parallel.map_rows(self._preprocess_samples, batch)

        def computed() -> Iterator[tuple[Batch, tf.data.Dataset]]:
            for batch, evaluated in on_device(device, evaluated_batches)():
                yield batch, values_for(evaluated)

        if save_influence_value_path is None:
            return InfluenceBatches(computed, known_cardinality(dataset_to_evaluate))
        paths = []
        with _writing(save_influence_value_path, "influence values") as temporary:
            for index, (batch, values) in enumerate(computed()):
                tf.data.Dataset.save(values, os.path.join(temporary, f"batch_{index:06d}"))
                paths.append(os.path.join(save_influence_value_path, f"batch_{index:06d}"))
        count = _batch_count(train_set)
        return InfluenceBatches(
            lambda: ((batch, _load_saved(path, count, "saved influence values")) for batch, path in zip(
                iterate_batches(dataset_to_evaluate, "dataset_to_evaluate"), paths)),
            len(paths),
        )

    def top_k(
        self,
        dataset_to_evaluate: tf.data.Dataset,
        train_set: tf.data.Dataset,
        k: int = 5,
        order: ORDER = ORDER.DESCENDING,
        influence_vector_in_cache: CACHE = CACHE.MEMORY,
        load_influence_vector_ds_path: str | None = None,
        save_influence_vector_ds_path: str | None = None,
        save_top_k_ds_path: str | None = None,
        nearest_neighbors: BaseNearestNeighbors | None = None,
        d_type: tf.DType | None = None,
        device: str | None = None,
    ) -> tf.data.Dataset:
        """The k most (or least) influential training samples for every sample to evaluate.

        Streams over the training set keeping only k candidates per sample to evaluate (memory
        O(batch·k) plus the influence-vector cache).

        Parameters
        ----------
        nearest_neighbors
            The search over the influence vectors (default: a fresh
            :class:`~influence_lib.utils.LinearNearestNeighbors`, exact).
        d_type
            dtype of the returned values (default: :attr:`value_dtype`).
        device
            Device the computation runs on (e.g. ``'/GPU:0'``); ``None``: TensorFlow's placement.

        Returns
        -------
        tf.data.Dataset
            Elements ``(batch_to_evaluate, values, training_samples, training_indices)``: values
            ``(batch, k)`` best first, training inputs ``(batch, k, ...)`` and their training-set
            indices ``(batch, k)``. The first three are Influenciae's ``top_k`` outputs.
        """
        self._check_dataset(dataset_to_evaluate, "dataset_to_evaluate")
        self._check_train_set(train_set)
        check_top_k_arguments(k, order)
        check_device(device)
        if nearest_neighbors is None:
            nearest_neighbors = LinearNearestNeighbors()
        elif not isinstance(nearest_neighbors, BaseNearestNeighbors):
            raise TypeError(
                "nearest_neighbors must be a BaseNearestNeighbors (e.g. influence_lib.utils.LinearNearestNeighbors()), "
                f"got {type(nearest_neighbors).__name__}."
            )
        values_dtype = self.value_dtype if d_type is None else tf.as_dtype(d_type)
        with device_scope(device):
            source = self._vector_source(
                train_set, influence_vector_in_cache, load_influence_vector_ds_path, save_influence_vector_ds_path
            )
        if not isinstance(nearest_neighbors, LinearNearestNeighbors):  # a custom search gets every row
            source = _gathering(source)
        nearest_neighbors.build(
            source, self._estimate_influence_value_from_influence_vector, k, d_type=values_dtype, order=order
        )

        def generate():
            parallel = data_parallel(self.strategy)
            for batch in iterate_batches(dataset_to_evaluate, "dataset_to_evaluate"):
                result = nearest_neighbors.search(parallel.map_rows(self._preprocess_samples, batch))
                yield batch, result.values, result.samples, result.indices

        samples_spec = tf.nest.map_structure(
            lambda spec: tf.TensorSpec((None, None, *spec.shape[1:]), spec.dtype), train_set.element_spec[0]
        )
        signature = (
            dataset_to_evaluate.element_spec,
            tf.TensorSpec((None, None), values_dtype),
            samples_spec,
            tf.TensorSpec((None, None), tf.int64),
        )
        top_k_dataset = GeneratorDataset(
            on_device(device, generate), signature, cardinality=known_cardinality(dataset_to_evaluate)
        )
        if save_top_k_ds_path is None:
            return top_k_dataset
        with _writing(save_top_k_ds_path, "top-k results") as temporary:
            tf.data.Dataset.save(top_k_dataset, temporary)
        return _load_saved(save_top_k_ds_path, _batch_count(dataset_to_evaluate), "saved top-k results")


def _batch_count(dataset: tf.data.Dataset) -> int:
    """Number of batches of ``dataset`` (known, or counted by reading the data once)."""
    known = known_cardinality(dataset)
    return known if known is not None else sum(1 for _ in iterate_batches(dataset))


def _load_saved(path: str, count: int, what: str) -> tf.data.Dataset:
    """The ``tf.data`` snapshot saved at ``path``, read back lazily; a damaged or truncated one (which
    ``tf.data`` reports as ``DataLossError`` or silently reads short) is a ``ValueError`` naming ``path``."""
    loaded = tf.data.Dataset.load(path)

    def corrupt(detail: str) -> ValueError:
        return ValueError(f"The {what} at {path!r} are incomplete or corrupt ({detail}); delete them or recompute.")

    def generate():
        read = 0
        try:
            for element in loaded:
                read += 1
                yield element
        except (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.FailedPreconditionError,
                tf.errors.InvalidArgumentError) as error:
            raise corrupt(error.message.splitlines()[0].strip()) from None
        if read != count:
            raise corrupt(f"{read} elements where {count} were saved")

    return GeneratorDataset(generate, loaded.element_spec)


def _batch_digest(batch: Batch) -> str:
    return fingerprint_variables(tf.nest.flatten(batch))


def _gathered(vectors: "tf.Tensor | RowShards") -> tf.Tensor:
    """Every row of a batch's influence vectors (gathered from the replicas when split)."""
    return vectors.gathered() if isinstance(vectors, RowShards) else vectors


def _gathering(make_pairs: Callable[[], Iterator]) -> Callable[[], Iterator[tuple[Batch, tf.Tensor]]]:
    """``make_pairs`` with every batch's influence vectors gathered (:func:`_gathered`)."""
    return lambda: ((batch, _gathered(vectors)) for batch, vectors in make_pairs())


def _pair_with_batches(
    train_set: tf.data.Dataset,
    vector_batches,
    first_digest: str,
    keep_alive: _TemporaryCache | None = None,
    parallel=None,
) -> Iterator[tuple[Batch, "tf.Tensor | RowShards"]]:
    """Zip training batches with their stored influence vectors; raise if the two disagree.

    ``first_digest`` is the hash of the first training batch when the vectors were made: a pass whose
    first batch differs (a pipeline that reshuffles or augments at random, hidden in a generator) is
    refused. ``keep_alive`` is the temporary cache the vectors are read from, held until the pass ends.
    Vectors read from disk under a distributing ``parallel`` (this worker's rows of each batch) are split
    onto its replicas (:meth:`DataParallel.split`).
    """
    pairs = zip_longest(iterate_batches(train_set, "train_set"), vector_batches)
    for index, (batch, vectors) in enumerate(pairs):
        if index == 0 and batch is not None and _batch_digest(batch) != first_digest:
            raise ValueError(
                "train_set yields other samples or another order than when its influence vectors were computed "
                "(a pipeline that reshuffles or augments at random on each pass). " + _RESHUFFLE_FIX
            )
        if batch is not None and vectors is not None and parallel is not None and parallel.distributed:
            try:
                vectors = parallel.split(vectors, batch_size_of(batch))
            except ValueError:
                vectors = None
        rows = vectors.size if isinstance(vectors, RowShards) else None if vectors is None else size_of(vectors)
        if batch is None or rows != batch_size_of(batch):
            raise ValueError(
                "The training set does not match its cached influence vectors (different size or batching, "
                "or a dataset that reshuffles each iteration). Recompute the cache for this training set, "
                "and pass a training set that iterates in a fixed order."
            )
        yield batch, vectors
