"""Streaming top-k against NumPy sorting of the full score matrix."""
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.common import ORDER, StreamingTopK


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
@pytest.mark.parametrize("k", [1, 4, 30])
def test_matches_full_sort_across_uneven_batches(order, k):
    rng = np.random.default_rng(k)
    scores = rng.normal(size=(6, 23)).astype(np.float32)
    samples = rng.normal(size=(23, 2, 3)).astype(np.float32)
    best = StreamingTopK(k, order)
    for start, stop in [(0, 5), (5, 6), (6, 17), (17, 23)]:
        best.update(scores[:, start:stop], tf.range(start, stop), samples[start:stop])
    result = best.result()
    keys = -scores if order == ORDER.DESCENDING else scores
    expected = np.argsort(keys, axis=1, kind="stable")[:, : min(k, 23)]
    np.testing.assert_array_equal(result.indices.numpy(), expected)
    np.testing.assert_array_equal(result.values.numpy(), np.take_along_axis(scores, expected, axis=1))
    np.testing.assert_array_equal(result.samples.numpy(), samples[expected])


def test_ties_keep_the_earlier_training_index_and_nested_samples_follow():
    best = StreamingTopK(3, ORDER.DESCENDING)
    images = np.arange(12, dtype=np.float32).reshape(6, 2)
    ids = np.arange(6, dtype=np.int32)
    best.update(np.array([[1.0, 2.0, 2.0]], np.float32), tf.range(0, 3), {"image": images[:3], "id": ids[:3]})
    best.update(np.array([[2.0, 0.5, 3.0]], np.float32), tf.range(3, 6), {"image": images[3:], "id": ids[3:]})
    result = best.result()
    np.testing.assert_array_equal(result.indices.numpy(), [[5, 1, 2]])
    np.testing.assert_array_equal(result.samples["id"].numpy(), [[5, 1, 2]])
    np.testing.assert_array_equal(result.samples["image"].numpy(), images[[[5, 1, 2]]])


def test_bad_arguments_and_nothing_seen():
    with pytest.raises(ValueError, match="positive integer"):
        StreamingTopK(0)
    with pytest.raises(TypeError, match="ORDER"):
        StreamingTopK(2, "descending")
    with pytest.raises(ValueError, match="empty"):
        StreamingTopK(2).result()
