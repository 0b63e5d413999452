"""RPS-L2 on logits models: the surrogate is fit to the model's distributions (softmax / sigmoid of its
logits) with the loss applied to the surrogate's logits, checked against an independent float64
SciPy fit; impossible loss / activation combinations are rejected."""
import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import minimize

from influence_lib.influence.base import extract_only_values
from influence_lib.influence.representer_l2 import RepresenterPointL2

N, IN_DIM, HIDDEN, LAMBDA = 24, 3, 4, 0.02


def _model(outputs: int, activation=None, seed=0) -> keras.Model:
    rng = np.random.default_rng(seed)
    model = keras.Sequential([
        keras.Input((IN_DIM,)),
        keras.layers.Dense(HIDDEN, activation="tanh"),
        keras.layers.Dense(outputs, activation=activation),
    ])
    model.set_weights([rng.normal(scale=1.5, size=w.shape).astype(np.float32) for w in model.weights])
    return model


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _numpy_fit(features, targets, binary: bool):
    """Minimizer of (1/n)Σ CE(t_i, σ(f_i W)) + λ‖W‖² in float64 (σ = sigmoid or softmax) and its α."""
    n, d = features.shape
    outputs = targets.shape[1]
    link = _sigmoid if binary else _softmax

    def objective(w):
        kernel = w.reshape(d, outputs)
        z = features @ kernel
        if binary:
            losses = np.logaddexp(0, z) - targets * z
        else:
            losses = -(targets * (z - z.max(1, keepdims=True)
                                  - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))))
        gradient = features.T @ (link(z) - targets) / n + 2 * LAMBDA * kernel
        return losses.sum() / n + LAMBDA * np.sum(kernel**2), gradient.ravel()

    solution = minimize(objective, np.zeros(d * outputs), jac=True, method="L-BFGS-B",
                        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    kernel = solution.x.reshape(d, outputs)
    return kernel, -(link(features @ kernel) - targets) / (2 * LAMBDA * n)


@pytest.mark.parametrize("binary", [True, False])
def test_logits_loss_fits_the_models_distributions_like_numpy(binary):
    outputs = 1 if binary else 3
    model = _model(outputs)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N, IN_DIM)).astype(np.float32)
    labels = rng.integers(0, 2 if binary else 3, N)
    y = labels[:, None].astype(np.float32) if binary else np.eye(3, dtype=np.float32)[labels]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    loss_type = keras.losses.BinaryCrossentropy if binary else keras.losses.CategoricalCrossentropy
    calculator = RepresenterPointL2(model, dataset, loss_type(from_logits=True, reduction=None), LAMBDA,
                                    show_progress=False)

    features = keras.Model(model.inputs[0], model.layers[-1].input)(x).numpy().astype(np.float64)
    logits = model(x).numpy().astype(np.float64)
    targets = _sigmoid(logits) if binary else _softmax(logits)
    kernel, alpha = _numpy_fit(features, targets, binary)
    np.testing.assert_allclose(calculator.kernel.numpy(), kernel, rtol=1e-3, atol=1e-4)

    x_test = rng.normal(size=(5, IN_DIM)).astype(np.float32)
    test_features = keras.Model(model.inputs[0], model.layers[-1].input)(x_test).numpy().astype(np.float64)
    rebuilt = calculator.predict_with_kernel(x_test).numpy()
    np.testing.assert_allclose(rebuilt, test_features @ kernel, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(rebuilt, (test_features @ features.T) @ alpha, rtol=1e-3, atol=1e-4)

    test_set = tf.data.Dataset.from_tensor_slices((x_test, np.zeros((5, outputs), np.float32))).batch(5)
    _, inner = next(iter(calculator.estimate_influence_values_in_batches(test_set, dataset)))
    values = np.concatenate([v.numpy() for _, v in inner], axis=1)
    test_logits = model(x_test).numpy()
    if binary:
        signs = np.where(test_logits[:, 0] > 0, 1.0, -1.0)
        expected = signs[:, None] * (test_features @ features.T) * alpha[:, 0][None]
    else:
        expected = (test_features @ features.T) * alpha[:, test_logits.argmax(1)].T
    np.testing.assert_allclose(values, expected, rtol=2e-3, atol=1e-4)

    self_values = extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    if binary:
        label_alpha = (labels - _sigmoid(features @ kernel)[:, 0]) / (2 * LAMBDA * N) * (2 * labels - 1)
    else:
        label_alpha = (1 - _softmax(features @ kernel)[np.arange(N), labels]) / (2 * LAMBDA * N)
    np.testing.assert_allclose(self_values, label_alpha * (features**2).sum(1), rtol=2e-3, atol=1e-4)


def test_float64_model_is_fit_in_float64():
    model = keras.Sequential([keras.Input((IN_DIM,), dtype="float64"),
                              keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64"),
                              keras.layers.Dense(3, dtype="float64")])
    rng = np.random.default_rng(2)
    model.set_weights([rng.normal(size=w.shape) for w in model.weights])
    x = rng.normal(size=(N, IN_DIM))
    dataset = tf.data.Dataset.from_tensor_slices((x, np.eye(3)[rng.integers(0, 3, N)])).batch(8)
    calculator = RepresenterPointL2(
        model, dataset, keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None), LAMBDA,
        show_progress=False,
    )
    features = keras.Model(model.inputs[0], model.layers[-1].input)(x).numpy()
    kernel, _ = _numpy_fit(features, _softmax(model(x).numpy()), binary=False)
    assert calculator.kernel.dtype == tf.float64
    np.testing.assert_allclose(calculator.kernel.numpy(), kernel, rtol=1e-6, atol=1e-7)


def test_impossible_logits_combinations_are_rejected():
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.zeros((4, IN_DIM), np.float32), np.eye(3, dtype=np.float32)[[0, 1, 2, 0]])
    ).batch(2)
    with pytest.raises(ValueError, match="from_logits=True"):
        RepresenterPointL2(_model(3), dataset, keras.losses.CategoricalCrossentropy(reduction=None), LAMBDA)
    with pytest.raises(ValueError, match="from_logits=False"):
        RepresenterPointL2(_model(3, "softmax"), dataset,
                           keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None), LAMBDA)
    with pytest.raises(ValueError, match="sparse"):
        RepresenterPointL2(_model(3), dataset,
                           keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), LAMBDA)
