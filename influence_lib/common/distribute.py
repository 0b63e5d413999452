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
  (:meth:`DataParallel.sum_rows`: Hessians, Hessian-vector products, gradient sums);
* or leaves per-sample outputs on the replicas that computed them (:meth:`DataParallel.shard_rows`,
  a :class:`RowShards`): the influence-vector cache, scored per replica and gathered as columns,
  and the streaming top-k, whose per-replica candidates are merged.

Where the collectives need equal shapes on every replica (``TPUStrategy``: XLA compiles static
shapes), or when forced with :func:`padded_shards`, every replica's shard is padded to
``⌈B/R⌉`` rows (copies of a real row), outputs are gathered at that size and the padded rows
dropped by position (a validity mask, :func:`valid_positions`); sums are taken over real rows only.

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
import functools
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
_pad_shards: contextvars.ContextVar = contextvars.ContextVar("influence_lib_pad_shards", default=False)


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


def padded_rows(size: int, replicas: int) -> int:
    """Rows of every replica's shard when shards are padded to equal size: ``⌈size/replicas⌉`` (at least 1)."""
    return max(-(-size // replicas), 1)


def valid_positions(size: int, replicas: int) -> list[int]:
    """Positions of the real rows among the ``replicas × padded_rows`` rows of gathered padded shards
    (the validity mask as indices): replica ``r``'s rows ``r·S … r·S + rows_r − 1``, in batch order."""
    rows = padded_rows(size, replicas)
    positions = []
    for replica in range(replicas):
        start, end = shard_bounds(size, replicas, replica)
        positions.extend(range(replica * rows, replica * rows + end - start))
    return positions


def needs_equal_shards(strategy: tf.distribute.Strategy) -> bool:
    """Whether the collectives of ``strategy`` need the same shape on every replica: ``TPUStrategy``
    (XLA compiles the all-gather for static shapes)."""
    return isinstance(strategy, _TPU_STRATEGIES)


_TPU_STRATEGIES = (tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy)


@contextmanager
def padded_shards(enabled: bool = True) -> Iterator[None]:
    """Pad every replica's shard to the same number of rows inside the block, as under ``TPUStrategy``.

    The per-sample passes then hand each replica ``⌈B/R⌉`` rows (its own rows, then copies of its
    last row — of the batch's last row for a replica without rows), all-gather equal shapes, and
    drop the padded rows by their positions (:func:`valid_positions`); sums are taken over each
    replica's real rows only, so padding never enters them. The numbers are those of unpadded
    shards: this switch exists to exercise the TPU path on CPUs and GPUs.
    """
    token = _pad_shards.set(bool(enabled))
    try:
        yield
    finally:
        _pad_shards.reset(token)


def _rows(batch: Batch, start: int, end: int) -> Batch:
    return tf.nest.map_structure(lambda tensor: tensor[start:end], batch)


def _padded_shard(batch: Batch, size: int, start: int, end: int, rows: int) -> Batch:
    """Rows ``[start, end)`` of ``batch`` followed by copies of the last of them (of the batch's last row
    when the shard is empty) up to ``rows`` rows."""
    last = end - 1 if end > start else size - 1
    indices = tf.constant([min(start + index, last) for index in range(rows)], tf.int32)
    return tf.nest.map_structure(lambda tensor: tf.gather(tensor, indices), batch)


class RowShards:
    """Per-sample outputs of one batch left on the replicas that computed them (nothing gathered).

    ``parts[i]`` holds the rows of this worker's ``i``-th replica (any nesting of tensors with the
    rows on axis 0), on that replica's device; a worker of a multi-worker cluster holds only its
    own replicas' rows. Made by :meth:`DataParallel.shard_rows`.

    Attributes
    ----------
    parallel
        The :class:`DataParallel` that made it.
    parts
        One output per local replica, in replica order.
    size
        Rows of the whole batch (over all workers).
    """

    def __init__(self, parallel: "DataParallel", parts: list, size: int):
        self.parallel, self.parts, self.size = parallel, list(parts), int(size)

    @property
    def local_bounds(self) -> list[tuple[int, int]]:
        """Rows ``[start, end)`` of the batch held by each part."""
        return self.parallel.local_bounds(self.size)

    def local_rows(self) -> object:
        """This worker's rows (contiguous in the batch), concatenated on the current device."""
        return tf.nest.map_structure(lambda *values: tf.concat(values, axis=0), *self.parts)

    def gathered(self) -> object:
        """Every row of the batch, in order, on every worker (an all-gather across workers)."""
        return self.parallel.gather(self.parts, self.size)

    def columns(self, function: Callable[[object], tf.Tensor]) -> tf.Tensor:
        """``function(rows)`` for a ``function`` returning one column per row, ``(queries, rows)``: each replica
        computes its part on its device; the columns are gathered in batch order, ``(queries, size)``."""
        columns = [self.parallel.on_replica(index, lambda part=part: function(part)) for index, part in enumerate(
            self.parts)]
        return self.parallel.gather(columns, self.size, axis=1)


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
        self._replica_ids = self._local_replica_ids() if self.replicas > 1 else (0,)
        self._equal_shards = needs_equal_shards(self.strategy)

    def _local_replica_ids(self) -> tuple[int, ...]:
        """Ids in the sync group of this worker's replicas, in the order of ``worker_devices``."""
        ids = []

        def value_fn(context: tf.distribute.experimental.ValueContext):
            ids.append(int(context.replica_id_in_sync_group))
            return tf.zeros([])

        self.strategy.experimental_distribute_values_from_function(value_fn)
        return tuple(ids)

    @property
    def distributed(self) -> bool:
        """Whether batches are split: more than one replica, and not already inside a replica's shard."""
        return self.replicas > 1 and not _inside_replica.get()

    @property
    def padded(self) -> bool:
        """Whether shards are padded to equal size: under ``TPUStrategy``, or forced by :func:`padded_shards`."""
        return self._equal_shards or _pad_shards.get()

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

    def layout(self) -> dict:
        """What the rows a worker holds depend on (for fingerprints of per-worker files): empty unless the
        replicas span several workers."""
        if not self.multi_worker:
            return {}
        return {"replicas": self.replicas, "worker_replicas": list(self._replica_ids)}

    def local_bounds(self, size: int) -> list[tuple[int, int]]:
        """Rows ``[start, end)`` of a batch of ``size`` rows computed by each of this worker's replicas."""
        return [shard_bounds(size, self.replicas, replica) for replica in self._replica_ids]

    def on_replica(self, index: int, function: Callable[[], object]) -> object:
        """``function()`` on the device of this worker's ``index``-th replica, as a computation of that replica
        (a distributed pass inside it runs locally)."""
        with tf.device(self._devices[index]):
            token = _inside_replica.set(True)
            try:
                return function()
            finally:
                _inside_replica.reset(token)

    def check_identical(self, tensors, what: str, fix: str) -> None:
        """Raise a ValueError on every worker if ``tensors`` (any nesting) differ between workers.

        Compares, across workers, two float64 sums per tensor — of its entries and of its entries
        weighted by their position — so different values and a different order are both caught.
        One small all-gather (of the sums' bits as int32, which every device supports); nothing at
        all unless the replicas span several workers.

        Raises
        ------
        ValueError
            ``"{what} differ between the workers of the cluster: {fix}"``.
        """
        if not (self.multi_worker and self.distributed):
            return
        sums = tf.stack([part for tensor in tf.nest.flatten(tensors) for part in _sums(tensor)])
        bits = tf.bitcast(sums, tf.int32)[None]
        gathered = tf.bitcast(self._collective([bits] * len(self._replica_ids), "gather", 0), tf.float64)
        spread = tf.reduce_max(gathered, axis=0) - tf.reduce_min(gathered, axis=0)
        scale = tf.reduce_max(tf.abs(gathered), axis=0)
        if bool(tf.reduce_any(spread > 1e-6 * scale)):
            raise ValueError(f"{what} differ between the workers of the cluster: {fix}")

    def union_across_workers(self, indices: list[int], limit: int = 10) -> list[int]:
        """The ``limit`` smallest of the non-negative ``indices`` reported by any worker (one small all-gather on a
        multi-worker cluster; ``indices`` sorted otherwise), so that every worker takes the same decision."""
        if not (self.multi_worker and self.distributed):
            return sorted(indices)[:limit]
        mine = tf.constant([sorted(indices)[:limit] + [-1] * (limit - len(indices[:limit]))], tf.int64)
        gathered = self._collective([mine] * len(self._replica_ids), "gather", 0).numpy()
        return sorted({int(index) for index in gathered.ravel() if index >= 0})[:limit]

    def map_rows(self, function: Callable[..., object], batch: Batch, *args) -> object:
        """``function(batch, *args)`` for a per-sample ``function`` (outputs with one row per sample).

        Each replica computes ``function`` on its shard of ``batch``; the outputs (any nesting of
        tensors with the batch on axis 0) are all-gathered in row order.
        """
        if not self.distributed:
            return function(batch, *args)
        return self.gather(self._parts(function, batch, args, keep_rows=True), batch_size_of(batch))

    def shard_rows(self, function: Callable[..., object], batch: Batch, *args) -> "RowShards | object":
        """``function(batch, *args)`` for a per-sample ``function``, left on the replicas: a :class:`RowShards`
        holding this worker's replicas' outputs (the plain output when not distributed)."""
        if not self.distributed:
            return function(batch, *args)
        return RowShards(self, self._parts(function, batch, args, keep_rows=True), batch_size_of(batch))

    def map_columns(self, function: Callable[[Batch, Batch], tf.Tensor], samples: Batch, batch: Batch) -> tf.Tensor:
        """``function(samples, batch)`` for a ``function`` giving one column per row of ``batch``,
        ``(len(samples), len(batch))``: each replica computes the columns of its shard of ``batch`` (against
        all of ``samples``), gathered in row order."""
        if not self.distributed:
            return function(samples, batch)
        return tf.transpose(self.map_rows(lambda shard: tf.transpose(function(samples, shard)), batch))

    def split(self, rows: object, size: int) -> "RowShards | object":
        """The rows of a batch of ``size`` held by this worker — every row (from :meth:`map_rows`), or only this
        worker's (:meth:`RowShards.local_rows`) — as a :class:`RowShards`, each part copied to its replica's
        device; ``rows`` itself when not distributed.

        Raises
        ------
        ValueError
            ``rows`` has neither ``size`` rows nor this worker's number of rows.
        """
        if not self.distributed:
            return rows
        bounds = self.local_bounds(size)
        count = batch_size_of(rows)
        first = 0 if count == size else bounds[0][0]
        if count not in (size, bounds[-1][1] - bounds[0][0]):
            raise ValueError(
                f"{count} rows for a batch of {size} split over {self.replicas} replicas: expected {size} or this "
                f"worker's {bounds[-1][1] - bounds[0][0]}."
            )
        parts = [
            self.on_replica(index, lambda s=start, e=end: tf.nest.map_structure(
                lambda value: tf.identity(value[s - first:e - first]), rows))
            for index, (start, end) in enumerate(bounds)
        ]
        return RowShards(self, parts, size)

    def sum_rows(self, function: Callable[..., object], batch: Batch, *args) -> object:
        """``function(batch, *args)`` for a ``function`` that sums over the samples of ``batch``.

        Each replica computes ``function`` on its shard of ``batch`` (its real rows, never padding); the
        outputs are all-reduced (summed over replicas and workers).
        """
        if not self.distributed:
            return function(batch, *args)
        parts = self._parts(function, batch, args, keep_rows=False)
        if self.multi_worker:
            return self._collective(parts, "sum", 0)
        return tf.nest.map_structure(lambda *values: tf.add_n(list(values)), *parts)

    def gather(self, parts: list, size: int, axis: int = 0) -> object:
        """Concatenate the local replicas' ``parts`` of a batch of ``size`` rows along ``axis`` in replica
        order, across workers too (all-gather).

        ``parts[i]`` holds the rows :meth:`local_bounds` gives this worker's ``i``-th replica. With
        :attr:`padded` shards, each part is zero-padded to :func:`padded_rows` along ``axis`` before the
        collective and the padding dropped after it (:func:`valid_positions`).
        """
        padded = self.padded
        if padded:
            rows = padded_rows(size, self.replicas)
            parts = [tf.nest.map_structure(lambda value: _pad_to(value, rows, axis), part) for part in parts]
        if self.multi_worker:
            combined = self._collective(parts, "gather", axis)
        else:
            combined = tf.nest.map_structure(lambda *values: tf.concat(values, axis=axis), *parts)
        if not padded:
            return combined
        positions = tf.constant(valid_positions(size, self.replicas), tf.int32)
        return tf.nest.map_structure(lambda value: tf.gather(value, positions, axis=axis), combined)

    def _collective(self, parts: list, operation: str, axis: int) -> object:
        """All-gather along ``axis`` (``operation='gather'``) or all-reduce (``'sum'``) the local replicas'
        ``parts`` across workers, in one compiled step per operation and axis."""
        key = (operation, axis)
        steps = self.__dict__.setdefault("_steps", {})
        if key not in steps:
            replica_function = functools.partial(_all_gather, axis=axis) if operation == "gather" else _all_sum
            steps[key] = compiled_function(lambda values: self.strategy.run(replica_function, (values,)))
        local_index = {replica: index for index, replica in enumerate(self._replica_ids)}

        def value_fn(context: tf.distribute.experimental.ValueContext):
            index = local_index[int(context.replica_id_in_sync_group)]
            with tf.device(self._devices[index]):
                return tf.nest.map_structure(tf.identity, parts[index])

        per_replica = self.strategy.experimental_distribute_values_from_function(value_fn)
        combined = steps[key](per_replica)
        return tf.nest.map_structure(lambda value: self.strategy.experimental_local_results(value)[0], combined)

    def _parts(self, function: Callable[..., object], batch: Batch, args: tuple, keep_rows: bool) -> list:
        """``function`` on each local replica's shard of ``batch``, on its device: per-sample outputs (real rows
        only) when ``keep_rows``, else sums."""
        size = batch_size_of(batch)
        padded = keep_rows and self.padded
        rows = padded_rows(size, self.replicas)

        def compute(start: int, end: int):
            if padded:
                value = function(_padded_shard(batch, size, start, end, rows), *args)
                return tf.nest.map_structure(lambda t: t[: end - start], value)
            if end > start:
                return function(_rows(batch, start, end), *args)
            # No row for this replica (a batch smaller than the number of replicas): compute one row for the
            # output's dtype and shape, and contribute nothing.
            value = function(_rows(batch, size - 1, size), *args)
            return tf.nest.map_structure(lambda t: t[:0] if keep_rows else tf.zeros_like(t), value)

        return [
            self.on_replica(index, lambda s=start, e=end: compute(s, e))
            for index, (start, end) in enumerate(self.local_bounds(size))
        ]


def _pad_to(value: tf.Tensor, rows: int, axis: int) -> tf.Tensor:
    """``value`` zero-padded at the end of ``axis`` to ``rows`` entries."""
    missing = rows - int(value.shape[axis])
    if missing == 0:
        return value
    paddings = [[0, 0]] * value.shape.rank
    paddings[axis] = [0, missing]
    return tf.pad(value, paddings)


def _sums(tensor: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Sum of the entries of ``tensor`` and their sum weighted by position in ``(0, 1]`` (float64)."""
    flat = tf.reshape(tf.cast(tensor, tf.float64), [-1])
    positions = tf.cast(tf.range(1, tf.size(flat) + 1), tf.float64) / tf.cast(tf.maximum(tf.size(flat), 1), tf.float64)
    return tf.reduce_sum(flat), tf.reduce_sum(flat * positions)


def _all_gather(values, axis: int):
    """Replica function: all-gather each value along ``axis`` (shards may differ in length unless padded). The
    identity re-creates the value inside the replica's device scope, which the collective addresses."""
    context = tf.distribute.get_replica_context()
    return tf.nest.map_structure(lambda value: context.all_gather(tf.identity(value), axis=axis), values)


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
