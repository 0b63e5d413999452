"""TracIn against an explicit float64 sum over checkpoints of closed-form gradient dot products."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.common.enums import CACHE
from influence_lib.influence.base import extract_only_values
from influence_lib.influence.tracin import TracIn
from influence_lib.model.influence_model import InfluenceModel

IN_DIM, CLASSES = 4, 3


def _softmax_regression() -> keras.Model:
    return keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Dense(CLASSES, activation="softmax")])


def _checkpoints(count: int) -> list[keras.Model]:
    models = []
    for _ in range(count):
        model = _softmax_regression()
        model.set_weights([np.random.normal(size=w.shape).astype(np.float32) for w in model.weights])
        models.append(model)
    return models


def _data(n: int):
    x = np.random.normal(size=(n, IN_DIM)).astype(np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[np.random.randint(CLASSES, size=n)]
    return x, y


def _closed_form_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample gradients of CE(softmax(xW + b)) w.r.t. (W, b): (x ⊗ (p − y), p − y), in float64."""
    kernel, bias = (w.numpy().astype(np.float64) for w in model.weights)
    logits = x.astype(np.float64) @ kernel + bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    residual = probabilities - y
    return np.concatenate([np.einsum("nd,nc->ndc", x, residual).reshape(len(x), -1), residual], axis=1)


def _expected_tracin(models, rates, x_test, y_test, x_train, y_train) -> np.ndarray:
    return sum(
        rate * _closed_form_gradients(model, x_test, y_test) @ _closed_form_gradients(model, x_train, y_train).T
        for model, rate in zip(models, rates)
    )


def _dataset(x, y, batch_size=4):
    return tf.data.Dataset.from_tensors((x, y)).unbatch().batch(batch_size)


def test_tracin_equals_the_explicit_sum_over_checkpoints_of_gradient_dot_products():
    models = _checkpoints(3)
    rates = [0.5, 0.1, 0.02]
    x_train, y_train = _data(10)
    x_test, y_test = _data(5)
    expected = _expected_tracin(models, rates, x_test, y_test, x_train, y_train)
    tracin = TracIn([InfluenceModel(m) for m in models], rates, show_progress=False)
    train_set, test_set = _dataset(x_train, y_train), _dataset(x_test, y_test, batch_size=3)

    rows = []
    for _, values in tracin.estimate_influence_values_in_batches(test_set, train_set):
        rows.append(np.concatenate([v.numpy() for _, v in values], axis=1))
    np.testing.assert_allclose(np.concatenate(rows), expected, rtol=1e-4, atol=1e-5)

    self_influence = extract_only_values(tracin.compute_influence_values(train_set)).numpy()
    expected_self = np.diag(_expected_tracin(models, rates, x_train, y_train, x_train, y_train))
    np.testing.assert_allclose(self_influence, expected_self, rtol=1e-4, atol=1e-5)

    pairwise = tracin.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy()
    np.testing.assert_allclose(pairwise, expected, rtol=1e-4, atol=1e-5)

    top = next(iter(tracin.top_k(test_set, train_set, k=2, influence_vector_in_cache=CACHE.NO_CACHE)))
    np.testing.assert_array_equal(top[3].numpy(), np.argsort(-expected[:3], axis=1)[:, :2])
    np.testing.assert_allclose(top[1].numpy(), -np.sort(-expected[:3], axis=1)[:, :2], rtol=1e-4, atol=1e-5)


def test_a_single_learning_rate_applies_to_every_checkpoint():
    models = _checkpoints(2)
    x, y = _data(6)
    expected = np.diag(_expected_tracin(models, [0.3, 0.3], x, y, x, y))
    tracin = TracIn([InfluenceModel(m) for m in models], 0.3, show_progress=False)
    values = extract_only_values(tracin.compute_influence_values(_dataset(x, y))).numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-5)


def test_from_checkpoints_loads_weight_files_without_touching_the_model(tmp_path):
    models = _checkpoints(2)
    paths = []
    for index, model in enumerate(models):
        paths.append(str(tmp_path / f"c{index}.weights.h5"))
        model.save_weights(paths[-1])
    architecture = _softmax_regression()
    before = [w.numpy().copy() for w in architecture.weights]
    x, y = _data(7)
    tracin = TracIn.from_checkpoints(architecture, paths, [0.2, 0.05], show_progress=False)
    values = extract_only_values(tracin.compute_influence_values(_dataset(x, y))).numpy()
    np.testing.assert_allclose(values, np.diag(_expected_tracin(models, [0.2, 0.05], x, y, x, y)), rtol=1e-4, atol=1e-5)
    for saved, current in zip(before, architecture.weights):
        assert np.array_equal(saved, current.numpy())


def test_bad_arguments_raise_clear_errors():
    models = [InfluenceModel(m) for m in _checkpoints(2)]
    with pytest.raises(ValueError, match="2 learning rates for 3 checkpoints|learning rates for"):
        TracIn(models + models[:1], [0.1, 0.2])
    with pytest.raises(ValueError, match="positive"):
        TracIn(models, [0.1, -0.2])
    with pytest.raises(TypeError, match="non-empty list"):
        TracIn([], 0.1)
    with pytest.raises(TypeError, match="InfluenceModel"):
        TracIn([_softmax_regression()], 0.1)
    with pytest.raises(ValueError, match="non-empty list of weight files"):
        TracIn.from_checkpoints(_softmax_regression(), [], 0.1)
    x, y = _data(4)
    with pytest.raises(ValueError, match="empty"):
        TracIn(models, 0.1).compute_influence_values(_dataset(x, y).take(0))
