"""RPS-LJE against a float64 NumPy implementation of the local Jacobian expansion on a tiny model."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.curvature.factory import ExactIHVPFactory
from influence_lib.influence.base import extract_only_values
from influence_lib.influence.representer_lje import RepresenterPointLJE
from influence_lib.model.influence_model import InfluenceModel

N, IN_DIM, HIDDEN, CLASSES, DAMPING, EPSILON = 12, 3, 4, 3, 0.05, 1e-2


def _model(use_bias=False) -> keras.Model:
    return keras.Sequential(
        [
            keras.Input((IN_DIM,)),
            keras.layers.Dense(HIDDEN, activation="tanh"),
            keras.layers.Dense(CLASSES, use_bias=use_bias, activation="softmax"),
        ]
    )


def _data(n):
    x = np.random.normal(size=(n, IN_DIM)).astype(np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[np.random.randint(CLASSES, size=n)]
    return x, y


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _numpy_lje(model, x, y):
    """Θ_0, and the per-sample terms (Θ_0 − (H_0 + δI)⁻¹ g_i) / n, all in float64."""
    features = keras.Model(model.inputs[0], model.layers[-1].input)(x).numpy().astype(np.float64)
    kernel = model.layers[-1].kernel.numpy().astype(np.float64)
    n = len(x)

    def gradients(theta):
        residual = _softmax(features @ theta) - y
        return np.einsum("nd,nc->ndc", features, residual).reshape(n, -1)

    theta_0 = kernel + EPSILON * gradients(kernel).sum(0).reshape(kernel.shape)
    probabilities = _softmax(features @ theta_0)
    hessian = np.zeros((HIDDEN * CLASSES, HIDDEN * CLASSES))
    for f, p in zip(features, probabilities):
        hessian += np.kron(np.outer(f, f), np.diag(p) - np.outer(p, p)) / n
    newton = np.linalg.solve(hessian + DAMPING * np.eye(len(hessian)), gradients(theta_0).T).T
    terms = (theta_0.reshape(1, -1) - newton) / n  # (n, d·C), kernel layout (d, C) row-major
    return features, theta_0, terms


def _calculator(model, dataset, **kwargs):
    return RepresenterPointLJE(
        InfluenceModel(model), dataset, ExactIHVPFactory(damping=DAMPING), epsilon=EPSILON, show_progress=False,
        **kwargs,
    )


def test_influence_and_self_influence_match_numpy_and_sum_to_the_lje_logits():
    model = _model()
    x, y = _data(N)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    calculator = _calculator(model, dataset)
    features, theta_0, terms = _numpy_lje(model, x, y)
    np.testing.assert_allclose(calculator.perturbed_kernel.numpy(), theta_0, rtol=1e-5, atol=1e-6)
    assert calculator.n_train == N

    x_test, y_test = _data(4)
    test_features = keras.Model(model.inputs[0], model.layers[-1].input)(x_test).numpy().astype(np.float64)
    predicted = model(x_test).numpy().argmax(1)
    per_class_terms = terms.reshape(N, HIDDEN, CLASSES)
    expected = np.einsum("td,ndt->tn", test_features, per_class_terms[:, :, predicted])
    test_set = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(4)
    _, values = next(iter(calculator.estimate_influence_values_in_batches(test_set, dataset)))
    values = np.concatenate([v.numpy() for _, v in values], axis=1)
    np.testing.assert_allclose(values, expected, rtol=1e-3, atol=1e-5)

    # The decomposition is exact: the influences sum to the logit of the Newton-expanded kernel.
    theta_lje = terms.sum(0).reshape(HIDDEN, CLASSES)
    np.testing.assert_allclose(values.sum(1), (test_features @ theta_lje)[np.arange(4), predicted], rtol=1e-3, atol=1e-5)

    self_influence = extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    labels = y.argmax(1)
    expected_self = np.einsum("nd,nd->n", features, per_class_terms[np.arange(N), :, labels])
    np.testing.assert_allclose(self_influence, expected_self, rtol=1e-3, atol=1e-5)


def test_n_is_the_training_set_size_even_with_a_hessian_subset():
    model = _model()
    x, y = _data(N)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    full = _calculator(model, dataset)
    # All N samples drawn in another order: same mean Hessian, so the same values; n stays N.
    reshuffled = _calculator(model, dataset, n_samples_for_hessian=N)
    subset = _calculator(model, dataset, n_samples_for_hessian=4)
    assert subset.n_train == N
    np.testing.assert_allclose(
        extract_only_values(reshuffled.compute_influence_values(dataset)),
        extract_only_values(full.compute_influence_values(dataset)),
        rtol=1e-4, atol=1e-6,
    )


def test_the_model_is_not_modified_and_bad_arguments_raise():
    model = _model()
    before = [w.numpy().copy() for w in model.weights]
    x, y = _data(N)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    _calculator(model, dataset)
    for saved, current in zip(before, model.weights):
        assert np.array_equal(saved, current.numpy())
    with pytest.raises(ValueError, match="bias"):
        _calculator(_model(use_bias=True), dataset)
    with pytest.raises(TypeError, match="InverseHessianVectorProductFactory"):
        RepresenterPointLJE(InfluenceModel(model), dataset, "exact")
    with pytest.raises(TypeError, match="InfluenceModel"):
        RepresenterPointLJE(model, dataset, ExactIHVPFactory())
    with pytest.raises(ValueError, match="epsilon"):
        RepresenterPointLJE(InfluenceModel(model), dataset, ExactIHVPFactory(), epsilon=-1.0)
    with pytest.raises(ValueError, match="output layer"):
        _calculator(model, dataset, target_layer=0)
    with pytest.raises(ValueError, match="empty"):
        _calculator(model, dataset.take(0))
    with pytest.raises(ValueError, match="n_samples_for_hessian"):
        _calculator(model, dataset, n_samples_for_hessian=0)


def test_float64_model_is_explained_in_float64():
    model = keras.Sequential([
        keras.Input((IN_DIM,), dtype="float64"),
        keras.layers.Dense(HIDDEN, activation="tanh", dtype="float64"),
        keras.layers.Dense(CLASSES, use_bias=False, activation="softmax", dtype="float64"),
    ])
    x, y = (part.astype(np.float64) for part in _data(N))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    calculator = _calculator(model, dataset)
    features, theta_0, terms = _numpy_lje(model, x, y)
    np.testing.assert_allclose(calculator.perturbed_kernel.numpy(), theta_0, rtol=1e-12)
    values = extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    assert values.dtype == np.float64
    labels = y.argmax(1)
    expected = np.einsum("nd,nd->n", features, terms.reshape(N, HIDDEN, CLASSES)[np.arange(N), :, labels])
    np.testing.assert_allclose(values, expected, rtol=1e-10, atol=1e-12)
