"""Checks and helpers for the batched ``tf.data.Dataset`` objects every method consumes."""
from collections.abc import Iterator

import tensorflow as tf

Batch = tuple[tf.Tensor, ...]

RESHUFFLE_FIX = (
    "Training-set indices are positions in the iteration order, so the order must be the same on every pass: "
    "shuffle once with a fixed seed and reshuffle_each_iteration=False "
    "(dataset.shuffle(buffer, seed=0, reshuffle_each_iteration=False)), or do not shuffle."
)
_STATELESS_PREFIXES = ("Stateless", "AnonymousRandomSeedGenerator", "DummySeedGenerator")
_RANDOM_OP_MARKERS = ("Random", "TruncatedNormal", "Multinomial", "StatefulUniform", "StatefulStandardNormal", "RngSkip",
                      "RngReadAndSkip")


def check_dataset(dataset: tf.data.Dataset, name: str = "dataset") -> None:
    """Raise a clear error if ``dataset`` is not a non-empty ``tf.data.Dataset`` of tuples."""
    if not isinstance(dataset, tf.data.Dataset):
        raise TypeError(
            f"{name} must be a batched tf.data.Dataset of (inputs, targets[, sample_weight]) tuples, "
            f"got {type(dataset).__name__}. Build one with "
            "tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)."
        )
    check_finite(dataset, name)
    if int(dataset.cardinality()) == 0:
        raise ValueError(f"{name} is empty: it yields no batch. Pass a dataset with at least one sample.")
    leaves = tf.nest.flatten(dataset.element_spec)
    if any(not isinstance(spec, tf.TensorSpec) for spec in leaves):
        raise TypeError(f"{name} must yield tensors, got element_spec {dataset.element_spec}.")
    if leaves[0].shape.rank == 0:
        raise ValueError(
            f"{name} looks unbatched: its first component is a scalar per element. "
            f"Call {name}.batch(batch_size) before passing it."
        )


def check_finite(dataset: tf.data.Dataset, name: str = "dataset") -> None:
    """Raise if ``dataset`` is known to be infinite (``.repeat()`` without a count): every pass over it would hang."""
    if int(dataset.cardinality()) == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"{name} is infinite (tf.data.INFINITE_CARDINALITY, e.g. built with .repeat()): a pass over it would "
            f"never end. Pass a finite dataset: drop .repeat(), or use .repeat(count) or .take(n)."
        )


def _random_ops_in(function) -> list[str]:
    """Types of the stateful random ops in a traced ``tf.data`` function (and the functions it calls)."""
    graph = getattr(getattr(function, "function", None), "graph", None) or getattr(function, "graph", None)
    if graph is None:
        return []
    graphs = [graph, *(getattr(nested, "graph", None) for nested in getattr(graph, "_functions", {}).values())]
    return sorted({
        op.type
        for current in graphs if current is not None
        for op in current.get_operations()
        if any(marker in op.type for marker in _RANDOM_OP_MARKERS) and not op.type.startswith(_STATELESS_PREFIXES)
    })


def _order_problem(dataset: tf.data.Dataset) -> str | None:
    """Why ``dataset`` may yield other samples or another order on each pass, or ``None``."""
    pending, seen = [dataset], set()
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        kind = type(current).__name__
        if getattr(current, "_reshuffle_each_iteration", False) is True or kind == "_ShuffleAndRepeatDataset":
            return "it is shuffled with reshuffle_each_iteration=True (the default of Dataset.shuffle)"
        if kind == "_RandomDataset":
            return "it draws random numbers (Dataset.random)"
        if str(getattr(current, "_deterministic", "")).lower() == "false":
            return "a parallel map/interleave runs with deterministic=False"
        random_ops = _random_ops_in(getattr(current, "_map_func", None))
        if random_ops:
            return f"its map function uses stateful random ops {random_ops} (random augmentation)"
        try:
            pending.extend(current._inputs())
        except (AttributeError, NotImplementedError, TypeError):
            continue
    if dataset.options().deterministic is False:
        return "its options set deterministic=False"
    return None


def check_fixed_order(dataset: tf.data.Dataset, name: str = "train_set") -> None:
    """Raise if ``dataset`` visibly yields another order or other samples on each pass.

    Inspects the dataset's pipeline (a reshuffling ``shuffle``, ``Dataset.random``, a
    non-deterministic parallel map, stateful random ops in a map function). A pipeline hidden in
    a generator is not inspected; caches additionally compare the data's contents between passes.
    """
    problem = _order_problem(dataset)
    if problem is not None:
        raise ValueError(f"{name} does not iterate in a fixed order: {problem}. {RESHUFFLE_FIX}")


def iterate_batches(dataset: tf.data.Dataset, name: str = "dataset") -> Iterator[Batch]:
    """Yield the batches of ``dataset`` as tuples; raise if it is infinite or turns out to be empty."""
    check_finite(dataset, name)
    empty = True
    for batch in dataset:
        empty = False
        yield tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
    if empty:
        raise ValueError(f"{name} is empty: it yields no batch. Pass a dataset with at least one sample.")


def size_of(tensor: tf.Tensor, axis: int = 0) -> int:
    """Length of an eager ``tensor`` along ``axis``, read from its shape: no op runs (in a
    per-batch loop ``int(tf.shape(t)[0])`` costs two eager op dispatches, ≈ 0.1 ms)."""
    return int(tensor.shape[axis])


def batch_size_of(batch: Batch) -> int:
    """Number of samples in ``batch`` (the leading dimension of its first tensor)."""
    return size_of(tf.nest.flatten(batch)[0])


def targets_of(batch: Batch, method: str):
    """The targets (second component) of a batch; a clear error for a dataset without labels."""
    if len(batch) < 2:
        raise ValueError(
            f"{method} needs labels, but the dataset's batches hold inputs only. Pass a dataset of "
            "(inputs, labels) batches, e.g. tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)."
        )
    return batch[1]


def inputs_of(batch: Batch):
    """The inputs (first component) of a batch: what top-k results return as training samples."""
    return batch[0]


def element_count(dataset: tf.data.Dataset) -> int:
    """Number of samples in a batched dataset (iterates over it once, reading data only)."""
    return sum(batch_size_of(batch) for batch in iterate_batches(dataset))
