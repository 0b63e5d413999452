"""Influence must predict actual leave-one-out retraining on a convex model (Pearson ≥ 0.99).

Model: L2-regularized binary logistic regression, per-sample objective
ℓ_i(θ) = BCE(σ(wᵀx_i + b), y_i) + (λ/2)‖θ‖², trained to its optimum by Newton's method in float64.
Removing z_i and retraining to the optimum of (1/(n−1)) Σ_{j≠i} ℓ_j changes a test objective by
about I(z_i, t)/n — the library's convention (no minus sign, no 1/n).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il

L2 = 0.01


def _objective_terms(theta, x, y):
    logits = x @ theta[:-1] + theta[-1]
    p = 1.0 / (1.0 + np.exp(-logits))
    losses = -(y * np.log(p) + (1 - y) * np.log(1 - p)) + 0.5 * L2 * theta @ theta
    augmented = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    gradient = augmented.T @ (p - y) / len(x) + L2 * theta
    hessian = (augmented * (p * (1 - p))[:, None]).T @ augmented / len(x) + L2 * np.eye(len(theta))
    return losses, gradient, hessian


def _newton(x, y, theta):
    for _ in range(50):
        _, gradient, hessian = _objective_terms(theta, x, y)
        step = np.linalg.solve(hessian, gradient)
        theta = theta - step
        if np.abs(step).max() < 1e-13:
            break
    return theta


# Retraining is undamped: damping 0, not the default damping='auto' (which biases a well-conditioned problem).
@pytest.mark.parametrize("ihvp", [il.ExactIHVPFactory(damping=0.0), il.CGDIHVPFactory(damping=0.0)])
def test_influence_predicts_leave_one_out_retraining(ihvp):
    rng = np.random.default_rng(0)
    n, d = 120, 3
    x = rng.normal(size=(n, d))
    y = (x @ np.array([1.5, -2.0, 0.5]) + 0.8 * rng.normal(size=n) > 0).astype(np.float64)
    x_test = rng.normal(size=(1, d)) * 1.5
    y_test = np.array([1.0])
    theta = _newton(x, y, np.zeros(d + 1))

    # Ground truth: retrain without each training point, measure the test objective change.
    test_before = _objective_terms(theta, x_test, y_test)[0][0]
    keep = np.ones(n, dtype=bool)
    actual = np.empty(n)
    for i in range(n):
        keep[i] = False
        retrained = _newton(x[keep], y[keep], theta)
        actual[i] = _objective_terms(retrained, x_test, y_test)[0][0] - test_before
        keep[i] = True

    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1, activation="sigmoid")])
    layer = model.layers[-1]
    layer.set_weights([theta[:-1, None].astype(np.float32), theta[-1:].astype(np.float32)])
    bce = keras.losses.BinaryCrossentropy(reduction=None)

    def loss(y_true, y_pred):
        # The regularizer is part of each per-sample term, so its Hessian is part of H.
        penalty = tf.reduce_sum(tf.square(layer.kernel.value)) + tf.reduce_sum(tf.square(layer.bias.value))
        return bce(y_true, y_pred) + 0.5 * L2 * penalty

    influence_model = il.InfluenceModel(model, loss_function=loss)
    train = tf.data.Dataset.from_tensor_slices((x.astype(np.float32), y[:, None].astype(np.float32))).batch(32)
    test = tf.data.Dataset.from_tensor_slices((x_test.astype(np.float32), y_test[:, None].astype(np.float32))).batch(1)
    calculator = il.FirstOrderInfluenceCalculator(influence_model, train, ihvp_calculator=ihvp, show_progress=False)
    (_, inner), = list(calculator.estimate_influence_values_in_batches(test, train))
    predicted = np.concatenate([values.numpy()[0] for _, values in inner]) / n

    assert np.corrcoef(predicted, actual)[0, 1] >= 0.99
    np.testing.assert_allclose(predicted, actual, rtol=0.1, atol=0.05 * np.abs(actual).max())
