"""Exact Hessian of the watched weights: batch jacobian of the gradient and the dense operator.

Ground truths: the float64 NumPy closed form of a softmax regression's Hessian, and central
finite differences of tape gradients of a float64 MLP.
"""
import keras
import numpy as np
import tensorflow as tf

from influence_lib.curvature.hessian import HessianOperator
from influence_lib.model import InfluenceModel


def softmax_regression(n=12, d=3, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(classes, activation="softmax")])
    return model, x, y


def numpy_softmax_hessian_sum(x, kernel, bias):
    """Σ_i (ã_i ã_iᵀ) ⊗ (diag p_i − p_i p_iᵀ), ã = [x; 1], float64."""
    x = x.astype(np.float64)
    logits = x @ kernel + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    augmented = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return sum(np.kron(np.outer(a, a), np.diag(q) - np.outer(q, q)) for a, q in zip(augmented, p))


def test_batch_hessian_matches_numpy_closed_form():
    model, x, y = softmax_regression()
    influence_model = InfluenceModel(model)
    kernel, bias = [w.astype(np.float64) for w in model.layers[0].get_weights()]
    expected = numpy_softmax_hessian_sum(x, kernel, bias)
    hessian = influence_model.batch_hessian_tensor((x, y))
    np.testing.assert_allclose(hessian, expected, atol=1e-5 * np.abs(expected).max())


def test_dense_hessian_jacobian_and_chunked_paths_agree_with_closed_form():
    model, x, y = softmax_regression(n=14)
    influence_model = InfluenceModel(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    operator = HessianOperator(influence_model, dataset)
    kernel, bias = [w.astype(np.float64) for w in model.layers[0].get_weights()]
    expected = numpy_softmax_hessian_sum(x, kernel, bias) / len(x)
    tolerance = 1e-5 * np.abs(expected).max()
    np.testing.assert_allclose(operator.dense(), expected, atol=tolerance)
    np.testing.assert_allclose(operator.dense(chunk_size=5), expected, atol=tolerance)


def test_mlp_hessian_matches_finite_differences_in_float64():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 3))
    y = np.eye(2)[rng.integers(0, 2, 6)]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="tanh", dtype="float64"),
                              keras.layers.Dense(2, activation="softmax", dtype="float64")])
    loss_function = keras.losses.CategoricalCrossentropy(reduction=None, dtype="float64")
    influence_model = InfluenceModel(model, 0, 1, loss_function=loss_function)
    hessian = influence_model.batch_hessian_tensor((x, y)).numpy()

    weights = influence_model.weights
    sizes = [int(np.prod(w.shape)) for w in weights]
    flat = np.concatenate([w.numpy().ravel() for w in weights])

    def gradient_at(theta):
        for w, part in zip(weights, np.split(theta, np.cumsum(sizes)[:-1])):
            w.assign(part.reshape(w.shape))
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(loss_function(y, model(x, training=False)))
        return np.concatenate([np.ravel(g) for g in tape.gradient(loss, weights)])

    step = 1e-5
    try:
        columns = [
            (gradient_at(flat + step * e) - gradient_at(flat - step * e)) / (2 * step) for e in np.eye(flat.size)
        ]
    finally:
        gradient_at(flat)
    np.testing.assert_allclose(hessian, np.stack(columns, axis=1), atol=1e-7)
