"""ForwardOverBackwardHVP against the exact Hessian: closed form for softmax regression, finite
differences of a hand-written float64 gradient for an MLP."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.curvature import batched_conjugate_gradient


def _float64_regression(n=20, d=4, c=3, seed=0):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([keras.Input((d,), dtype="float64"),
                              keras.layers.Dense(c, activation="softmax", dtype="float64")])
    model.set_weights([rng.normal(scale=0.5, size=(d, c)), rng.normal(scale=0.2, size=c)])
    x, y = rng.normal(size=(n, d)), np.eye(c)[rng.integers(0, c, n)]
    return il.InfluenceModel(model), tf.data.Dataset.from_tensor_slices((x, y)).batch(7), x, y


def test_matches_the_closed_form_hessian_of_softmax_regression():
    influence_model, dataset, x, y = _float64_regression()
    kernel, bias = (w.numpy() for w in influence_model.weights)
    hessian = rm.softmax_hessian(x, kernel, bias)
    vectors = np.random.default_rng(1).normal(size=(5, influence_model.nb_params))
    operator = il.ForwardOverBackwardHVP(influence_model, dataset)
    np.testing.assert_allclose(operator.matmat(vectors).numpy(), vectors @ hessian, rtol=1e-12, atol=1e-13)
    columns = operator(vectors[0])
    assert columns.shape == (influence_model.nb_params, 1)
    np.testing.assert_allclose(columns.numpy()[:, 0], hessian @ vectors[0], rtol=1e-12, atol=1e-13)


def _mlp_mean_gradient(theta, shapes, x, y):
    """Mean cross-entropy gradient of tanh → softmax at flat parameters ``theta`` (hand-written backprop)."""
    parts, start = [], 0
    for shape in shapes:
        size = int(np.prod(shape))
        parts.append(theta[start:start + size].reshape(shape))
        start += size
    w1, b1, w2, b2 = parts
    hidden = np.tanh(x @ w1 + b1)
    delta2 = rm.softmax(hidden @ w2 + b2) - y
    delta1 = (delta2 @ w2.T) * (1 - hidden**2)
    return np.concatenate([(x.T @ delta1).ravel(), delta1.sum(0), (hidden.T @ delta2).ravel(), delta2.sum(0)]) / len(x)


def test_matches_finite_differences_of_the_gradient_for_an_mlp():
    rng = np.random.default_rng(2)
    model = keras.Sequential([keras.Input((3,), dtype="float64"),
                              keras.layers.Dense(4, activation="tanh", dtype="float64"),
                              keras.layers.Dense(3, activation="softmax", dtype="float64")])
    model.set_weights([rng.normal(scale=0.7, size=w.shape) for w in model.weights])
    x, y = rng.normal(size=(10, 3)), np.eye(3)[rng.integers(0, 3, 10)]
    influence_model = il.InfluenceModel(model, 0, 1)
    theta = np.concatenate([w.numpy().ravel() for w in influence_model.weights])
    shapes = influence_model.weight_shapes
    step = 1e-5
    hessian = np.stack([
        (_mlp_mean_gradient(theta + step * e, shapes, x, y) - _mlp_mean_gradient(theta - step * e, shapes, x, y))
        / (2 * step)
        for e in np.eye(theta.size)
    ])
    vectors = rng.normal(size=(3, theta.size))
    operator = il.ForwardOverBackwardHVP(influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(4))
    np.testing.assert_allclose(operator.matmat(vectors).numpy(), vectors @ hessian, rtol=1e-7, atol=1e-8)


def test_drives_conjugate_gradient_like_the_hessian_operator():
    influence_model, dataset, x, y = _float64_regression(seed=3)
    damping = 0.05
    operator = il.ForwardOverBackwardHVP(influence_model, dataset)
    rhs = tf.constant(np.random.default_rng(4).normal(size=(2, influence_model.nb_params)))
    solution, converged = batched_conjugate_gradient(
        lambda v: operator.matmat(v) + damping * v, rhs, tolerance=1e-10, max_iterations=100
    )
    kernel, bias = (w.numpy() for w in influence_model.weights)
    damped = rm.softmax_hessian(x, kernel, bias) + damping * np.eye(influence_model.nb_params)
    assert bool(tf.reduce_all(converged))
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(damped, rhs.numpy().T).T, rtol=1e-8, atol=1e-10)


def test_bad_arguments():
    influence_model, dataset, _, _ = _float64_regression()
    with pytest.raises(TypeError, match="InfluenceModel"):
        il.ForwardOverBackwardHVP(influence_model.model, dataset)
    with pytest.raises(ValueError, match="weights_to_watch"):
        il.ForwardOverBackwardHVP(influence_model, dataset, weights=influence_model.weights[:1])
    with pytest.raises(ValueError, match="shape"):
        il.ForwardOverBackwardHVP(influence_model, dataset).matmat(np.zeros((2, 3)))
