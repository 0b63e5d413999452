"""Data parallelism on ``tf.distribute``: every batch split across the replicas of a strategy.

One mechanism serves every calculator and curvature fit. The shared loops (self-influence,
influence vectors, samples to evaluate, Hessian passes) hand each batch to
:class:`DataParallel`, which

* splits the batch's rows into one contiguous shard per replica in sync — replica ``r`` of ``R``
  gets rows ``[⌊rB/R⌋, ⌊(r+1)B/R⌋)`` of a batch of ``B`` (:func:`shard_bounds`), so uneven and
  partial batches need no padding, and a replica left without rows computes nothing useful;
* runs the per-batch computation of each local replica on that replica's device;
* all-gathers per-sample outputs in replica order (:meth:`DataParallel.map_rows`) — which is the
  batch's row order, so training-set indices are unchanged — or all-reduces sums
  (:meth:`DataParallel.sum_rows`: Hessians, Hessian-vector products, gradient sums).

Every worker of a ``MultiWorkerMirroredStrategy`` iterates the whole (same, fixed-order) dataset
and computes only its own replicas' shards; the collectives give every worker the full result, so
each worker runs the same program and ends with the same numbers. With the default strategy (no
``tf.distribute`` in use) or a single replica, the computation is called directly on the batch:
the single-device path costs one strategy lookup per pass and one attribute test per batch.

Replicas of one machine are computed one after the other in the calling thread, each under its
device, and combined on the current device (concatenation or sum); only across workers do the
outputs go through collectives (one compiled ``strategy.run`` step per output structure).

A computation that itself runs a distributed pass (an iterative inverse-Hessian solve inside an
influence-vector hook) runs it locally on its own shard: distribution never nests, so the
collectives of all workers always pair up.
"""
import contextvars
import os
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import tensorflow as tf
from tensorflow.python.ops.resource_variable_ops import ResourceVariable

from .compiled import compiled_function
from .datasets import Batch, batch_size_of

SAME_DATA = (
    "every worker must iterate the same dataset, batched the same way, in the same order (no per-worker "
    "shuffling or sharding: the library splits each batch across the replicas itself)"
)
SAME_WEIGHTS = "every worker must load the same weights"

_explicit_strategy: contextvars.ContextVar = contextvars.ContextVar("influence_lib_strategy", default=None)
_inside_replica: contextvars.ContextVar = contextvars.ContextVar("influence_lib_inside_replica", default=False)


def check_strategy(strategy) -> "tf.distribute.Strategy | None":
    """``strategy`` itself if it is ``None`` or a ``tf.distribute.Strategy``; a TypeError otherwise."""
    if strategy is not None and not isinstance(strategy, tf.distribute.Strategy):
        raise TypeError(
            "strategy must be a tf.distribute.Strategy (e.g. tf.distribute.MirroredStrategy()) or None for the "
            f"strategy in scope, got {type(strategy).__name__}."
        )
    return strategy


def resolve_strategy(strategy: "tf.distribute.Strategy | None" = None) -> tf.distribute.Strategy:
    """The strategy to use: ``strategy`` if given, else the one set by :func:`using_strategy`, else the one
    in scope (``tf.distribute.get_strategy()``, the default single-device strategy outside any scope)."""
    check_strategy(strategy)
    if strategy is not None:
        return strategy
    explicit = _explicit_strategy.get()
    return explicit if explicit is not None else tf.distribute.get_strategy()


@contextmanager
def using_strategy(strategy: "tf.distribute.Strategy | None") -> Iterator[None]:
    """Make ``strategy`` the one :func:`resolve_strategy` returns inside the block (no-op for ``None``).

    Unlike ``strategy.scope()`` it does not change where variables are created: calculators use it
    to run their fit under the ``strategy=`` they were given.
    """
    check_strategy(strategy)
    if strategy is None:
        yield
        return
    token = _explicit_strategy.set(strategy)
    try:
        yield
    finally:
        _explicit_strategy.reset(token)


def local_variable(initial_value: tf.Tensor) -> tf.Variable:
    """A non-trainable variable on the current device, never mirrored, even inside ``strategy.scope()``.

    For working buffers of the host computation (the Krylov basis of Arnoldi) that must not be
    replicated on every device. ``tf.Variable`` inside a scope asks the strategy to create a
    distributed variable; constructing the ``ResourceVariable`` class directly (TensorFlow's own
    variable class, checked on TF 2.21) bypasses the strategy's variable creator.
    """
    return ResourceVariable(initial_value, trainable=False)


def shard_bounds(size: int, replicas: int, replica: int) -> tuple[int, int]:
    """Rows ``[start, end)`` of a batch of ``size`` rows that replica ``replica`` of ``replicas`` computes.

    Contiguous, in replica order, sizes differing by at most one: ``start = ⌊replica·size/replicas⌋``.
    """
    return replica * size // replicas, (replica + 1) * size // replicas


def _rows(batch: Batch, start: int, end: int) -> Batch:
    return tf.nest.map_structure(lambda tensor: tensor[start:end], batch)


class DataParallel:
    """Runs per-batch computations data-parallel over the replicas of ``strategy``.

    Parameters
    ----------
    strategy
        Any ``tf.distribute.Strategy``; ``None`` resolves it with :func:`resolve_strategy`.

    Attributes
    ----------
    strategy
        The strategy.
    replicas
        Number of replicas in sync (over all workers).
    """

    def __init__(self, strategy: "tf.distribute.Strategy | None" = None):
        self.strategy = resolve_strategy(strategy)
        self.replicas = int(self.strategy.num_replicas_in_sync)
        self._devices = tuple(self.strategy.extended.worker_devices) if self.replicas > 1 else ()

    @property
    def distributed(self) -> bool:
        """Whether batches are split: more than one replica, and not already inside a replica's shard."""
        return self.replicas > 1 and not _inside_replica.get()

    @property
    def worker_index(self) -> int:
        """Index of this worker (task id of a multi-worker cluster, 0 otherwise)."""
        resolver = getattr(self.strategy, "cluster_resolver", None)
        task_id = getattr(resolver, "task_id", None) if resolver is not None else None
        return int(task_id) if task_id is not None else 0

    @property
    def multi_worker(self) -> bool:
        """Whether the replicas span several workers (machines or processes)."""
        return self.replicas > max(len(self._devices), 1)

    def worker_path(self, path: str) -> str:
        """Where this worker keeps a file or directory the user named ``path``: ``path`` itself, or
        ``path/worker_INDEX`` when the replicas span several workers (so that workers sharing a file
        system never write the same files)."""
        return os.path.join(path, f"worker_{self.worker_index}") if self.multi_worker else path

    def check_identical(self, tensors, what: str, fix: str) -> None:
        """Raise a ValueError on every worker if ``tensors`` (any nesting) differ between workers.

        Compares, across workers, two float64 sums per tensor — of its entries and of its entries
        weighted by their position — so different values and a different order are both caught.
        One small all-gather; nothing at all unless the replicas span several workers.

        Raises
        ------
        ValueError
            ``"{what} differ between the workers of the cluster: {fix}"``.
        """
        if not (self.multi_worker and self.distributed):
            return
        fingerprint = tf.stack([part for tensor in tf.nest.flatten(tensors) for part in _sums(tensor)])[None]

        def value_fn(context: tf.distribute.experimental.ValueContext):
            with tf.device(self._devices[int(context.replica_id_in_sync_group) % len(self._devices)]):
                return tf.identity(fingerprint)

        gathered = self._collective(self.strategy.experimental_distribute_values_from_function(value_fn), gather=True)
        spread = tf.reduce_max(gathered, axis=0) - tf.reduce_min(gathered, axis=0)
        scale = tf.reduce_max(tf.abs(gathered), axis=0)
        if bool(tf.reduce_any(spread > 1e-6 * scale)):
            raise ValueError(f"{what} differ between the workers of the cluster: {fix}")

    def map_rows(self, function: Callable[..., object], batch: Batch, *args) -> object:
        """``function(batch, *args)`` for a per-sample ``function`` (outputs with one row per sample).

        Each replica computes ``function`` on its shard of ``batch``; the outputs (any nesting of
        tensors with the batch on axis 0) are all-gathered in row order.
        """
        if not self.distributed:
            return function(batch, *args)
        per_replica = self._per_replica(function, batch, args, keep_rows=True)
        if self.multi_worker:
            return self._collective(per_replica, gather=True)
        return self._local(per_replica, lambda values: tf.concat(values, axis=0))

    def sum_rows(self, function: Callable[..., object], batch: Batch, *args) -> object:
        """``function(batch, *args)`` for a ``function`` that sums over the samples of ``batch``.

        Each replica computes ``function`` on its shard of ``batch``; the outputs are all-reduced
        (summed over replicas and workers).
        """
        if not self.distributed:
            return function(batch, *args)
        per_replica = self._per_replica(function, batch, args, keep_rows=False)
        if self.multi_worker:
            return self._collective(per_replica, gather=False)
        return self._local(per_replica, tf.add_n)

    def _local(self, per_replica, combine: Callable[[list[tf.Tensor]], tf.Tensor]) -> object:
        """Combine the replicas' values of one machine on the current device (no collective needed)."""
        return tf.nest.map_structure(
            lambda value: combine(list(self.strategy.experimental_local_results(value))), per_replica
        )

    def _collective(self, per_replica, gather: bool) -> object:
        """All-gather (``gather``) or all-reduce the replicas' values across workers, in one compiled step."""
        key = "_gather_step" if gather else "_reduce_step"
        step = self.__dict__.get(key)
        if step is None:
            step = compiled_function(lambda values: self.strategy.run(_all_gather if gather else _all_sum, (values,)))
            self.__dict__[key] = step
        gathered = step(per_replica)
        return tf.nest.map_structure(lambda value: self.strategy.experimental_local_results(value)[0], gathered)

    def _per_replica(self, function: Callable[..., object], batch: Batch, args: tuple, keep_rows: bool):
        size = batch_size_of(batch)

        def value_fn(context: tf.distribute.experimental.ValueContext):
            replica = int(context.replica_id_in_sync_group)
            start, end = shard_bounds(size, self.replicas, replica)
            with tf.device(self._devices[replica % len(self._devices)]):
                token = _inside_replica.set(True)
                try:
                    if end > start:
                        return function(_rows(batch, start, end), *args)
                    # No row for this replica (a batch smaller than the number of replicas): compute one
                    # row for the output's dtype and shape, and contribute nothing.
                    value = function(_rows(batch, size - 1, size), *args)
                    return tf.nest.map_structure(lambda t: t[:0] if keep_rows else tf.zeros_like(t), value)
                finally:
                    _inside_replica.reset(token)

        return self.strategy.experimental_distribute_values_from_function(value_fn)


def _sums(tensor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of the entries of ``tensor`` and their sum weighted by position in ``(0, 1]`` (float64)."""
    flat = tf.reshape(tf.cast(tensor, tf.float64), [-1])
    positions = tf.cast(tf.range(1, tf.size(flat) + 1), tf.float64) / tf.cast(tf.maximum(tf.size(flat), 1), tf.float64)
    return tf.reduce_sum(flat), tf.reduce_sum(flat * positions)


def _all_gather(values):
    """Replica function: all-gather each value along axis 0 (shards may differ in length). The identity
    re-creates the value inside the replica's device scope, which the collective addresses."""
    context = tf.distribute.get_replica_context()
    return tf.nest.map_structure(lambda value: context.all_gather(tf.identity(value), axis=0), values)


def _all_sum(values):
    """Replica function: all-reduce (sum) each value, re-created inside the replica's device scope."""
    values = tf.nest.map_structure(tf.identity, values)
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, values)


_instances: "weakref.WeakKeyDictionary[tf.distribute.Strategy, DataParallel]" = weakref.WeakKeyDictionary()


def data_parallel(strategy: "tf.distribute.Strategy | None" = None) -> DataParallel:
    """The :class:`DataParallel` of ``strategy`` (resolved with :func:`resolve_strategy`), one per strategy:
    its compiled collective steps are traced once per output structure and reused by every loop."""
    strategy = resolve_strategy(strategy)
    parallel = _instances.get(strategy)
    if parallel is None:
        parallel = _instances[strategy] = DataParallel(strategy)
    return parallel
