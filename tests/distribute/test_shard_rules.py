"""The pieces of the distributed path that need no second device: padded shards and their validity mask, and
the merge of per-replica top-k candidates (checked against a NumPy sort of all the scores, ties included)."""
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from influence_lib.common.distribute import _padded_shard, padded_rows, shard_bounds, valid_positions
from influence_lib.common.top_k import StreamingTopK, TopK, merge_candidates


@pytest.mark.parametrize("size, replicas", [(7, 2), (1, 2), (10, 3), (5, 8), (16, 4)])
def test_padded_shards_have_equal_size_and_the_mask_keeps_every_real_row_once_in_order(size, replicas):
    rows = padded_rows(size, replicas)
    batch = tf.range(size)
    gathered = []
    for replica in range(replicas):
        start, end = shard_bounds(size, replicas, replica)
        shard = _padded_shard(batch, size, start, end, rows)
        assert shard.shape == (rows,)  # the same static shape on every replica
        np.testing.assert_array_equal(shard[: end - start], np.arange(start, end))
        gathered.append(shard)
    positions = valid_positions(size, replicas)
    np.testing.assert_array_equal(tf.gather(tf.concat(gathered, 0), positions), np.arange(size))
    assert rows == -(-size // replicas) and len(positions) == size


def _numpy_top_k(scores: np.ndarray, k: int, descending: bool) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per row: by value, then smallest index."""
    keys = -scores if descending else scores
    order = np.stack([np.lexsort((np.arange(scores.shape[1]), row))[:k] for row in keys])
    return np.take_along_axis(scores, order, 1), order


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("replicas, k", [(2, 3), (3, 4), (4, 20)])
def test_per_replica_candidates_merge_to_the_top_k_of_all_scores(descending, replicas, k):
    # Scores with many exact ties, 3 queries, batches of 7 then 3: each replica keeps the top-k of its contiguous
    # shard of every batch (uneven shards; some replicas get no row of the last batch).
    rng = np.random.default_rng(replicas * k)
    scores = rng.integers(0, 4, size=(3, 31)).astype(np.float32)
    inputs = np.arange(31, dtype=np.float32)[:, None] * 10.0
    order = il.ORDER.DESCENDING if descending else il.ORDER.ASCENDING
    kept = [StreamingTopK(k, order) for _ in range(replicas)]
    offset = 0
    for size in (7, 7, 7, 7, 3):
        for replica, best in enumerate(kept):
            start, end = shard_bounds(size, replicas, replica)
            rows = slice(offset + start, offset + end)
            best.update(scores[:, rows], tf.range(offset + start, offset + end, dtype=tf.int64), inputs[rows])
        offset += size
    candidates = [best.candidates() for best in kept]
    merged = merge_candidates(
        TopK(*(tf.concat([getattr(c, field) for c in candidates], axis=1) for field in TopK._fields)),
        k, order, seen=31,
    )
    values, indices = _numpy_top_k(scores, min(k, 31), descending)
    np.testing.assert_array_equal(merged.indices, indices)
    np.testing.assert_array_equal(merged.values, values)
    np.testing.assert_array_equal(merged.samples, inputs[indices])


def test_merging_fewer_samples_than_k_keeps_only_the_scored_ones():
    best = StreamingTopK(5, il.ORDER.DESCENDING)
    best.update(tf.constant([[1.0, 3.0]]), tf.constant([4, 9], tf.int64), tf.constant([[0.4], [0.9]]))
    empty = StreamingTopK(5, il.ORDER.DESCENDING)
    empty.update(tf.zeros([1, 0]), tf.zeros([0], tf.int64), tf.zeros([0, 1]))  # a replica without rows
    parts = [empty.candidates(), best.candidates()]
    merged = merge_candidates(
        TopK(*(tf.concat([getattr(c, field) for c in parts], axis=1) for field in TopK._fields)),
        5, il.ORDER.DESCENDING, seen=2,
    )
    np.testing.assert_array_equal(merged.indices, [[9, 4]])
    np.testing.assert_array_equal(merged.values, [[3.0, 1.0]])
    np.testing.assert_array_equal(merged.samples, np.float32([[[0.9], [0.4]]]))


def test_padding_is_off_by_default_and_forced_inside_padded_shards():
    parallel = il.DataParallel()
    assert not parallel.padded
    with il.padded_shards():
        assert parallel.padded
        with il.padded_shards(False):
            assert not parallel.padded
    assert not parallel.padded
    # One device: nothing is split, gathered nor agreed between workers.
    assert parallel.union_across_workers([7, 3, 5]) == [3, 5, 7] and parallel.layout() == {}
