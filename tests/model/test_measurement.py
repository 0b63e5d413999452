"""Measurement functions (query side): margin values and gradients against float64 NumPy, calculators with a margin."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.model.measurement import margin


def _numpy_margin(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    others = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits)
    top = others.max(axis=1, keepdims=True)
    return logits[np.arange(len(labels)), labels] - (top[:, 0] + np.log(np.exp(others - top).sum(axis=1)))


@pytest.mark.parametrize("one_hot", [False, True])
def test_margin_equals_numpy_from_logits_and_probabilities(one_hot):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(7, 4)).astype(np.float32)
    labels = rng.integers(0, 4, 7)
    targets = np.eye(4, dtype=np.float32)[labels] if one_hot else labels
    expected = _numpy_margin(logits, labels)
    np.testing.assert_allclose(margin(logits, targets, from_logits=True).numpy(), expected, rtol=1e-5, atol=1e-5)
    probabilities = rm.softmax(logits.astype(np.float64)).astype(np.float32)
    np.testing.assert_allclose(margin(probabilities, targets, from_logits=False).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_margin_rejects_single_output():
    with pytest.raises(ValueError, match="at least 2 classes"):
        margin(tf.zeros((3, 1)), tf.zeros((3,)))


def test_unknown_measurement_is_a_clear_error():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3)])
    influence_model = il.InfluenceModel(model)
    with pytest.raises(ValueError, match="Unknown measurement 'margn'"):
        influence_model.with_measurement("margn")
    with pytest.raises(TypeError, match="callable"):
        influence_model.with_measurement(3)
    assert influence_model.with_measurement("loss") is influence_model
    assert influence_model.with_measurement(None) is influence_model


def _logits_problem(n=24, d=4, c=3, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, c, n)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(c)])
    kernel = rng.normal(scale=0.7, size=(d, c)).astype(np.float32)
    bias = rng.normal(scale=0.2, size=c).astype(np.float32)
    model.layers[-1].set_weights([kernel, bias])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    dataset = tf.data.Dataset.from_tensor_slices((x, labels)).batch(8)
    return model, loss, dataset, x, labels, kernel.astype(np.float64), bias.astype(np.float64)


@pytest.mark.parametrize("mode", ["auto", "jacobian"])
def test_margin_gradients_equal_closed_form_and_finite_differences(mode):
    model, loss, dataset, x, labels, kernel, bias = _logits_problem()
    influence_model = il.InfluenceModel(model, loss_function=loss, per_sample_gradients=mode)
    view = influence_model.with_measurement("margin")
    gradients = np.concatenate([view.batch_jacobian_tensor(batch).numpy() for batch in dataset])
    expected = rm.margin_gradients(x, labels, kernel, bias)
    np.testing.assert_allclose(gradients, expected, rtol=1e-4, atol=1e-5)

    theta = np.concatenate([kernel.ravel(), bias])
    step = 1e-6

    def margins(parameters):
        k = parameters[: kernel.size].reshape(kernel.shape)
        return _numpy_margin(x.astype(np.float64) @ k + parameters[kernel.size :], labels)

    finite = np.stack(
        [(margins(theta + step * e) - margins(theta - step * e)) / (2 * step) for e in np.eye(theta.size)], axis=1
    )
    np.testing.assert_allclose(gradients, finite, rtol=1e-4, atol=1e-5)
    # The view shares the model; the original still differentiates the loss.
    assert view.model is model
    loss_gradients = influence_model.batch_jacobian_tensor(next(iter(dataset))).numpy()
    assert not np.allclose(loss_gradients, gradients[:8], atol=1e-3)


def test_margin_on_probabilities_matches_logits_model():
    model, train, x, y = rm.softmax_regression(n=32, d=4, c=3, seed=2, batch_size=8)
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy().astype(np.float64) for w in influence_model.weights]
    gradients = np.concatenate(
        [influence_model.with_measurement("margin").batch_jacobian_tensor(b).numpy() for b in train]
    )
    np.testing.assert_allclose(gradients, rm.margin_gradients(x, y.argmax(1), kernel, bias), rtol=1e-3, atol=1e-4)


def test_first_order_with_margin_equals_numpy():
    model, train, x, y = rm.softmax_regression(n=48, d=4, c=3, seed=5, batch_size=16)
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy().astype(np.float64) for w in influence_model.weights]
    rng = np.random.default_rng(1)
    x_test = rng.normal(size=(6, 4)).astype(np.float32)
    labels_test = rng.integers(0, 3, 6)
    y_test = np.eye(3, dtype=np.float32)[labels_test]
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(3)
    inverse = rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias))
    expected = rm.margin_gradients(x_test, labels_test, kernel, bias) @ inverse @ rm.softmax_gradients(
        x, y, kernel, bias
    ).T
    calculator = il.FirstOrderInfluenceCalculator(
        influence_model, train, ihvp_calculator=il.ExactIHVP(influence_model, train, damping=0.0, show_progress=False),
        show_progress=False, measurement="margin",
    )
    rows = []
    for _, inner in calculator.estimate_influence_values_in_batches(test, train):
        rows.append(np.concatenate([values.numpy() for _, values in inner], axis=1))
    np.testing.assert_allclose(np.concatenate(rows), expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_tracin_with_a_callable_measurement_equals_numpy():
    model, loss, dataset, x, labels, kernel, bias = _logits_problem(n=16)
    influence_model = il.InfluenceModel(model, loss_function=loss)

    def logit_of_label(outputs, targets):
        return tf.gather(outputs, tf.cast(targets, tf.int32), batch_dims=1)

    tracin = il.TracIn([influence_model], 0.5, show_progress=False, measurement=logit_of_label)
    batch = next(iter(dataset))
    dz = np.eye(3)[labels[:8]]
    query = np.concatenate([np.einsum("nd,nc->ndc", x[:8], dz).reshape(8, -1), dz], axis=1)
    logits = x.astype(np.float64) @ kernel + bias
    delta = rm.softmax(logits) - np.eye(3)[labels]
    train = np.concatenate([np.einsum("nd,nc->ndc", x, delta).reshape(len(x), -1), delta], axis=1)
    expected = 0.5 * query @ train[:8].T
    np.testing.assert_allclose(tracin.influence_between_batches(batch, batch).numpy(), expected, rtol=1e-4, atol=1e-5)
