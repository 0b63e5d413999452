"""RPS-L2 against an independent float64 SciPy fit of the same regularized objective, and the
representer theorem checked numerically."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import minimize

from influence_lib.influence.base import extract_only_values
from influence_lib.influence.representer_l2 import RepresenterPointL2

N, IN_DIM, HIDDEN, CLASSES, LAMBDA = 30, 4, 5, 3, 0.01


def _model() -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((IN_DIM,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(CLASSES, activation="softmax"),
        ]
    )


def _data(n=N):
    x = np.random.normal(size=(n, IN_DIM)).astype(np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[np.random.randint(CLASSES, size=n)]
    return x, y


def _reference(model, x):
    """Float64 minimizer of (1/n)Σ CE(p_i, softmax(f_i W)) + λ‖W‖² with SciPy, and its α."""
    features = keras.Model(model.inputs[0], model.layers[-1].input)(x).numpy().astype(np.float64)
    targets = model(x).numpy().astype(np.float64)
    n = len(x)

    def softmax(z):
        e = np.exp(z - z.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    def objective(w):
        kernel = w.reshape(HIDDEN, CLASSES)
        z = features @ kernel
        log_p = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
        value = -np.mean(np.sum(targets * log_p, 1)) + LAMBDA * np.sum(kernel**2)
        gradient = features.T @ (softmax(z) - targets) / n + 2 * LAMBDA * kernel
        return value, gradient.ravel()

    solution = minimize(objective, np.zeros(HIDDEN * CLASSES), jac=True, method="L-BFGS-B",
                        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    kernel = solution.x.reshape(HIDDEN, CLASSES)
    alpha = -(softmax(features @ kernel) - targets) / (2 * LAMBDA * n)
    return features, kernel, alpha


def _calculator(model, dataset, **kwargs):
    loss = keras.losses.CategoricalCrossentropy(reduction=None)
    return RepresenterPointL2(model, dataset, loss, LAMBDA, show_progress=False, **kwargs)


def test_fit_alpha_and_influence_match_an_independent_float64_fit():
    model = _model()
    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    calculator = _calculator(model, dataset)
    features, kernel, alpha = _reference(model, x)
    np.testing.assert_allclose(calculator.kernel.numpy(), kernel, rtol=1e-3, atol=1e-4)
    assert calculator.fit_gradient_norm < 1e-5

    x_test, y_test = _data(7)
    test_features = keras.Model(model.inputs[0], model.layers[-1].input)(x_test).numpy().astype(np.float64)
    predicted = model(x_test).numpy().argmax(1)
    expected = (test_features @ features.T) * alpha[:, predicted].T
    test_set = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(4)
    rows = [np.concatenate([v.numpy() for _, v in values], axis=1)
            for _, values in calculator.estimate_influence_values_in_batches(test_set, dataset)]
    np.testing.assert_allclose(np.concatenate(rows), expected, rtol=2e-3, atol=1e-4)

    self_influence = extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    label_probabilities = np.exp(features @ kernel - (features @ kernel).max(1, keepdims=True))
    label_probabilities /= label_probabilities.sum(1, keepdims=True)
    label_alpha = (1.0 - label_probabilities[np.arange(N), y.argmax(1)]) / (2 * LAMBDA * N)
    expected_self = label_alpha * np.sum(features**2, 1)
    np.testing.assert_allclose(self_influence, expected_self, rtol=2e-3, atol=1e-4)


def test_representer_theorem_the_decomposition_reproduces_the_surrogate_logits():
    model = _model()
    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(7)
    calculator = _calculator(model, dataset)
    x_test, y_test = _data(6)
    test_features = keras.Model(model.inputs[0], model.layers[-1].input)(x_test).numpy()
    surrogate_logits = test_features @ calculator.kernel.numpy()
    np.testing.assert_allclose(calculator.predict_with_kernel((x_test, y_test)).numpy(), surrogate_logits,
                               rtol=1e-3, atol=1e-4)
    # Summing the influences over the training set gives the logit of the predicted class.
    test_set = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(6)
    _, values = next(iter(calculator.estimate_influence_values_in_batches(test_set, dataset)))
    total = sum(v.numpy().sum(1) for _, v in values)
    predicted = model(x_test).numpy().argmax(1)
    np.testing.assert_allclose(total, surrogate_logits[np.arange(6), predicted], rtol=1e-3, atol=1e-4)


def test_labels_may_be_sparse_and_the_model_is_not_modified():
    model = _model()
    before = [w.numpy().copy() for w in model.weights]
    x, y = _data()
    one_hot = _calculator(model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8))
    sparse_set = tf.data.Dataset.from_tensor_slices((x, y.argmax(1))).batch(8)
    sparse = _calculator(model, sparse_set)
    np.testing.assert_allclose(
        extract_only_values(sparse.compute_influence_values(sparse_set)).numpy(),
        extract_only_values(one_hot.compute_influence_values(tf.data.Dataset.from_tensor_slices((x, y)).batch(8))),
        rtol=1e-5,
    )
    for saved, current in zip(before, model.weights):
        assert np.array_equal(saved, current.numpy())


def test_bad_arguments_raise_clear_errors():
    model = _model()
    x, y = _data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    loss = keras.losses.CategoricalCrossentropy(reduction=None)
    with pytest.raises(ValueError, match="lambda_regularization"):
        RepresenterPointL2(model, dataset, loss, 0.0)
    with pytest.raises(ValueError, match="lambda_regularization"):
        RepresenterPointL2(model, dataset, loss, -1.0)
    with pytest.raises(ValueError, match="reduction"):
        RepresenterPointL2(model, dataset, keras.losses.CategoricalCrossentropy(), 0.1)
    with pytest.raises(ValueError, match="Dense"):
        RepresenterPointL2(keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Softmax()]), dataset, loss, 0.1)
    with pytest.raises(ValueError, match="output layer"):
        RepresenterPointL2(model, dataset, loss, 0.1, layer_index=0)
    with pytest.raises(ValueError, match="does not exist"):
        RepresenterPointL2(model, dataset, loss, 0.1, layer_index=7)
    with pytest.raises(ValueError, match="empty"):
        RepresenterPointL2(model, dataset.take(0), loss, 0.1)
    with pytest.raises(ValueError, match="epochs"):
        RepresenterPointL2(model, dataset, loss, 0.1, epochs=0)
