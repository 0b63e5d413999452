"""Gradient dot products and squared norms (factored shortcuts) against explicit products.

Ground truth: the gradients of each sample's loss computed alone with ``tape.gradient``; the
expected products are their explicit float64 matrix products.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf
from reference_math import one_sample_gradients

from influence_lib.model import InfluenceModel
from influence_lib.model.layer_rules import DenseRule, LayerCall


def check_products(model, inputs, targets, start, last):
    influence_model = InfluenceModel(model, start, last)
    split = len(targets) // 2
    batch_a, batch_b = (inputs[:split], targets[:split]), (inputs[split:], targets[split:])
    dots = influence_model.batch_gradient_dot_tensor(batch_a, batch_b)
    norms = influence_model.batch_gradient_norm_sq_tensor(batch_a)
    assert influence_model.fallback_reason is None
    grads = one_sample_gradients(model, influence_model.weights, inputs, targets)
    expected_dots, expected_norms = grads[:split] @ grads[split:].T, (grads[:split] ** 2).sum(1)
    np.testing.assert_allclose(dots, expected_dots, atol=1e-5 * np.abs(expected_dots).max())
    np.testing.assert_allclose(norms, expected_norms, atol=1e-5 * expected_norms.max())


def labels(rng, n, classes):
    return np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]


@pytest.mark.parametrize("bias", ["trainable", "frozen", "absent"])
def test_dense_flat_inputs(bias):
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", use_bias=bias != "absent"),
                              keras.layers.Dense(3, activation="softmax")])
    if bias == "frozen":
        model.layers[0].bias.trainable = False
    check_products(model, rng.normal(size=(8, 5)).astype(np.float32), labels(rng, 8, 3), 0, 1)


@pytest.mark.parametrize("steps, width", [(2, 16), (8, 3)])
def test_dense_sequence_inputs_factored_and_explicit(steps, width):
    rng = np.random.default_rng(1)
    model = keras.Sequential([keras.Input((steps, width)), keras.layers.Dense(width, activation="tanh"),
                              keras.layers.Flatten(), keras.layers.Dense(3, activation="softmax")])
    calls = [LayerCall(tf.zeros((1, steps, width)), tf.zeros((1, steps, width)), tf.zeros((1, steps, width)))] * 2
    assert DenseRule._factored_is_cheaper(*calls) == (steps == 2)
    check_products(model, rng.normal(size=(8, steps, width)).astype(np.float32), labels(rng, 8, 3), 0, 2)


def test_embedding_conv_and_shared_layer():
    """6×6 token pairs ≤ 12×4 embedding entries: the same-token factored product is used."""
    rng = np.random.default_rng(2)
    inputs = keras.Input((6,), dtype="int32")
    embedded = keras.layers.Embedding(12, 4)(inputs)
    convolved = keras.layers.Conv1D(3, 2, activation="relu")(embedded)
    shared = keras.layers.Dense(3, activation="tanh")
    pooled = keras.layers.GlobalAveragePooling1D()(shared(shared(convolved)))
    outputs = keras.layers.Dense(2, activation="softmax")(pooled)
    model = keras.Model(inputs, outputs)
    ids = rng.integers(0, 12, (8, 6)).astype(np.int32)
    check_products(model, ids, labels(rng, 8, 2), 1, len(model.layers) - 1)
