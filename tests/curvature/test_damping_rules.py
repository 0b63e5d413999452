"""Damping rules: ``'mean'`` (0.1·tr/P), ``'weighted'`` (0.1·tr(H²)/tr(H)), ``'auto'``'s choice, the
spectral moments they come from, and the early-stopping ridge.

Ground truths: float64 NumPy on matrices with a known spectrum, the MSE Hessian of a linear
regression in closed form (``reference_math``), NumPy's Hutchinson estimate with the same probes,
NumPy solves, and gradient descent run in NumPy against ridge regression.
"""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.curvature.spectrum import (
    TRACE_PROBES,
    default_damping_rule,
    early_stopping_damping,
    hutchinson_moments,
)


def _known_spectrum(eigenvalues, seed=0):
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))[0]
    return (rotation * eigenvalues) @ rotation.T


def _mlp(start_layer=None, last_layer=None):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    return il.InfluenceModel(
        model, start_layer=start_layer, last_layer=last_layer,
        loss_function=keras.losses.MeanSquaredError(reduction=None),
    )


def test_weighted_damping_is_a_tenth_of_the_curvature_weighted_mean_eigenvalue():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    eigenvalues = np.concatenate([np.logspace(1, -3, 10), np.zeros(5)])  # P = 15, rank 10
    hessian = _known_spectrum(eigenvalues)
    exact = il.ExactIHVP(influence_model, train_hessian=hessian, damping="weighted")
    expected_damping = 0.1 * np.sum(eigenvalues**2) / np.sum(eigenvalues)
    assert exact.damping == pytest.approx(expected_damping, rel=1e-6)
    vectors = np.random.default_rng(1).normal(size=(4, 15))
    expected = np.linalg.solve(hessian + expected_damping * np.eye(15), vectors.T).T
    np.testing.assert_allclose(exact.ihvp(vectors.astype(np.float32)).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_auto_takes_weighted_for_a_whole_model_and_mean_for_a_last_layer():
    cases = {"whole": (_mlp(0, -1), "weighted"), "last layer": (_mlp(), "mean")}
    for name, (influence_model, rule) in cases.items():
        assert default_damping_rule(influence_model) == rule, name
        eigenvalues = np.logspace(0, -6, influence_model.nb_params)
        hessian = _known_spectrum(eigenvalues)
        exact = il.ExactIHVP(influence_model, train_hessian=hessian)
        expected = 0.1 * (
            np.sum(eigenvalues**2) / np.sum(eigenvalues) if rule == "weighted" else np.mean(eigenvalues)
        )
        assert exact.damping == pytest.approx(expected, rel=1e-6), name
    assert _mlp(0, -1).nb_params == 26 and _mlp().nb_params == 10


def test_hutchinson_moments_are_within_their_error_bounds():
    eigenvalues = np.linspace(0.1, 2.0, 300)
    matrix = tf.constant(_known_spectrum(eigenvalues))
    moments = hutchinson_moments(lambda v: tf.matmul(v, matrix), 300, tf.float64, probes=32)
    trace_bound = 3 * np.sqrt(2 / 32) * np.linalg.norm(eigenvalues) / eigenvalues.sum()
    assert abs(moments.trace / eigenvalues.sum() - 1) < trace_bound
    squared = eigenvalues**2
    square_bound = 3 * np.sqrt(2 / 32) * np.linalg.norm(squared) / squared.sum()
    assert abs(moments.trace_of_square / squared.sum() - 1) < square_bound
    assert moments.weighted_mean_eigenvalue == pytest.approx(squared.sum() / eigenvalues.sum(), rel=0.2)


def _numpy_hutchinson_weighted_damping(hessian: np.ndarray, seed: int) -> float:
    signs = np.random.default_rng(seed).integers(0, 2, size=(TRACE_PROBES, len(hessian))) * 2.0 - 1.0
    products = signs @ hessian
    return 0.1 * np.mean(np.sum(products**2, axis=1)) / np.mean(np.sum(signs * products, axis=1))


def test_iterative_and_arnoldi_auto_damping_on_a_whole_model_is_the_weighted_rule():
    model, dataset, x, _ = rm.linear_regression()
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    hessian = rm.mse_hessian(x, outputs=2)
    true_damping = 0.1 * np.trace(hessian @ hessian) / np.trace(hessian)
    calculators = {
        "cg": il.ConjugateGradientDescentIHVP(influence_model, dataset),
        "lissa": il.LissaIHVP(influence_model, dataset),
        "arnoldi": il.ArnoldiIHVP(influence_model, dataset, show_progress=False),
    }
    for name, calculator in calculators.items():
        assert calculator.damping == pytest.approx(_numpy_hutchinson_weighted_damping(hessian, 0), rel=1e-3), name
        assert calculator.damping == pytest.approx(true_damping, rel=0.5), name
    vectors = np.random.default_rng(2).normal(size=(3, influence_model.nb_params))
    damping = calculators["cg"].damping
    expected = np.linalg.solve(hessian + damping * np.eye(len(hessian)), vectors.T).T
    np.testing.assert_allclose(calculators["cg"].ihvp(vectors).numpy(), expected, rtol=1e-3, atol=1e-4)


def test_damping_rules_reject_unknown_names_and_a_flat_curvature():
    influence_model = _mlp()
    with pytest.raises(ValueError, match="'auto', 'mean', 'weighted'"):
        il.ExactIHVP(influence_model, train_hessian=np.eye(10), damping="largest")
    for rule in ("auto", "mean", "weighted"):
        with pytest.raises(ValueError, match="not positive"):
            il.ExactIHVP(influence_model, train_hessian=np.zeros((10, 10)), damping=rule)


def _gradient_descent(hessian, target, learning_rate, steps, momentum):
    theta, velocity = np.zeros(len(target)), np.zeros(len(target))
    for _ in range(steps):
        velocity = momentum * velocity + hessian @ theta - target
        theta = theta - learning_rate * velocity
    return theta


@pytest.mark.parametrize("learning_rate, steps, momentum", [(0.1, 50, 0.0), (0.1, 500, 0.0), (0.02, 200, 0.9)])
def test_early_stopping_damping_is_the_ridge_closest_to_gradient_descent(learning_rate, steps, momentum):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 30)) * np.logspace(0, -2, 30)
    y = x @ rng.normal(size=30) + 0.1 * rng.normal(size=200)
    hessian, target = x.T @ x / 200, x.T @ y / 200
    stopped = _gradient_descent(hessian, target, learning_rate, steps, momentum)
    grid = np.logspace(-6, 1, 300)
    distances = [np.linalg.norm(stopped - np.linalg.solve(hessian + value * np.eye(30), target)) for value in grid]
    closest = grid[int(np.argmin(distances))]
    assert 0.5 < closest / early_stopping_damping(learning_rate, steps, momentum) < 2.0


def test_early_stopping_damping_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        early_stopping_damping(0.01, 0)
    with pytest.raises(ValueError, match="learning_rate"):
        early_stopping_damping(-1.0, 10)
    with pytest.raises(ValueError, match="momentum"):
        early_stopping_damping(0.01, 10, momentum=1.0)
