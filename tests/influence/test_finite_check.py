"""The finiteness check of the result streams: read back one batch late, yet no NaN ever reaches the user.

Values are checked against float64 NumPy TracIn (``η ‖g‖²`` and ``η g``) on a softmax regression.
"""
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from influence_lib.influence.base import _checked_finite
from tests.reference_math import softmax_gradients, softmax_regression

RATE = 0.5


def _problem():
    model, _, x, y = softmax_regression(n=12, batch_size=4)
    tracin = il.TracIn([il.InfluenceModel(model, 0, -1)], RATE, show_progress=False)
    kernel, bias = (w.numpy().astype(np.float64) for w in model.layers[-1].weights)
    return tracin, x, y, RATE * softmax_gradients(x, y, kernel, bias)


def _poisoned(x, y, index, value=np.nan):
    x = x.copy()
    x[index, 1] = value
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(4)


@pytest.mark.parametrize("stream", ["compute_influence_values", "compute_influence_vector"])
def test_batches_before_a_non_finite_one_are_yielded_exact_then_the_error_names_the_samples(stream):
    tracin, x, y, vectors = _problem()
    expected = (vectors * (vectors / RATE)).sum(axis=1) if stream == "compute_influence_values" else vectors
    received = []
    with pytest.raises(il.NonFiniteError, match=r"starting at sample 4: .* at indices \[6\]"):
        for _, values in getattr(tracin, stream)(_poisoned(x, y, 6)):
            received.append(values.numpy())
    assert len(received) == 1
    np.testing.assert_allclose(received[0], expected[:4], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_non_finite_last_batch_raises_before_it_is_yielded(value):
    tracin, x, y, vectors = _problem()
    received = []
    with pytest.raises(il.NonFiniteError, match=r"starting at sample 8: Influence vectors .* indices \[9\]"):
        for _, values in tracin.compute_influence_vector(_poisoned(x, y, 9, value)):
            received.append(values.numpy())
    np.testing.assert_allclose(np.concatenate(received), vectors[:8], rtol=1e-5, atol=1e-7)


def test_every_consumer_of_the_streams_raises():
    tracin, x, y, _ = _problem()
    poisoned = _poisoned(x, y, 10)
    with pytest.raises(il.NonFiniteError, match=r"indices \[10\]"):
        tracin.compute_top_k_from_training_dataset(poisoned, 2)
    for cache in (il.CACHE.MEMORY, il.CACHE.DISK, il.CACHE.NO_CACHE):
        with pytest.raises(il.NonFiniteError, match=r"indices \[10\]"):
            list(tracin.top_k(poisoned, poisoned, k=2, influence_vector_in_cache=cache))


def test_finite_streams_are_unchanged_by_the_look_ahead():
    tracin, x, y, vectors = _problem()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    pairs = list(tracin.compute_influence_vector(dataset))
    assert [batch[0].numpy().tolist() for batch, _ in pairs] == [x[i:i + 4].tolist() for i in (0, 4, 8)]
    np.testing.assert_allclose(np.concatenate([v.numpy() for _, v in pairs]), vectors, rtol=1e-5, atol=1e-7)
    values = il.extract_only_values(tracin.compute_influence_values(dataset)).numpy()
    np.testing.assert_allclose(values, (vectors * vectors).sum(axis=1) / RATE, rtol=1e-5)


def test_an_error_while_computing_a_batch_comes_after_the_batches_before_it():
    def computed():
        yield ("first",), tf.constant([1.0, 2.0]), 0
        yield ("second",), tf.constant([3.0]), 2
        raise ValueError("the third batch failed")

    received = []
    with pytest.raises(ValueError, match="the third batch failed"):
        for batch, values in _checked_finite(computed(), "Values"):
            received.append((batch, values.numpy().tolist()))
    assert received == [(("first",), [1.0, 2.0]), (("second",), [3.0])]


def test_a_non_finite_batch_is_reported_even_when_the_next_one_fails():
    def computed():
        yield ("first",), tf.constant([[1.0], [np.inf]]), 5
        raise ValueError("the next batch failed")

    with pytest.raises(il.NonFiniteError, match=r"starting at sample 5: Values .* indices \[6\]"):
        list(_checked_finite(computed(), "Values"))
