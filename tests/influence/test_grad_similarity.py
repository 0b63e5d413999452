"""GradDot and GradCos against float64 NumPy gradients; projected TracIn converges to TracIn as k grows."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from influence_lib.influence.base import extract_only_values

IN_DIM, CLASSES = 5, 3


def _model(seed: int = 0) -> keras.Model:
    model = keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Dense(CLASSES, activation="softmax")])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.weights])
    return model


def _data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, IN_DIM)).astype(np.float32),
            np.eye(CLASSES, dtype=np.float32)[rng.integers(CLASSES, size=n)])


def _loss_gradients(model, x, y) -> np.ndarray:
    """∇_θ CE(softmax(xW + b), y) = (x ⊗ (p − y), p − y), float64."""
    kernel, bias = (w.numpy().astype(np.float64) for w in model.weights)
    logits = x.astype(np.float64) @ kernel + bias
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    residual = p - y
    return np.concatenate([np.einsum("nd,nc->ndc", x, residual).reshape(len(x), -1), residual], axis=1)


def _unit(g):
    return g / np.linalg.norm(g, axis=1, keepdims=True)


def _pairwise(calculator, test_set, train_set):
    rows = []
    for _, values in calculator.estimate_influence_values_in_batches(test_set, train_set):
        rows.append(np.concatenate([v.numpy() for _, v in values], axis=1))
    return np.concatenate(rows)


@pytest.mark.parametrize("cls", [il.GradDot, il.GradCos])
def test_grad_dot_and_cos_equal_numpy(cls):
    model = _model()
    x_train, y_train = _data(12, 1)
    x_test, y_test = _data(5, 2)
    train, test = _loss_gradients(model, x_train, y_train), _loss_gradients(model, x_test, y_test)
    expected = test @ train.T if cls is il.GradDot else _unit(test) @ _unit(train).T
    expected_self = (train**2).sum(1) if cls is il.GradDot else np.ones(len(train))
    calculator = cls(il.InfluenceModel(model), show_progress=False)
    train_set = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(5)
    test_set = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(3)
    np.testing.assert_allclose(_pairwise(calculator, test_set, train_set), expected, rtol=1e-4, atol=1e-6)
    pairwise = calculator.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy()
    np.testing.assert_allclose(pairwise, expected, rtol=1e-4, atol=1e-6)
    self_values = extract_only_values(calculator.compute_influence_values(train_set)).numpy()
    np.testing.assert_allclose(self_values, expected_self, rtol=1e-4, atol=1e-6)
    top = next(iter(calculator.top_k(test_set, train_set, k=4)))
    np.testing.assert_array_equal(top[3].numpy(), np.argsort(-expected[:3], axis=1)[:, :4])


def test_grad_cos_with_a_margin_query_and_a_projection():
    model = _model(3)
    x_train, y_train = _data(10, 4)
    x_test, y_test = _data(4, 5)
    projection = il.Projection(6, seed=2, structured=False)
    calculator = il.GradCos(il.InfluenceModel(model), projection=projection, measurement="margin",
                            show_progress=False)
    matrix = il.model.projection.dense_matrix(projection, 0, 18).numpy()
    kernel, bias = (w.numpy().astype(np.float64) for w in model.weights)
    logits = x_test.astype(np.float64) @ kernel + bias
    mask = y_test.astype(bool)
    others = np.exp(np.where(mask, -np.inf, logits) - logits.max(1, keepdims=True))
    dz = mask - others / others.sum(1, keepdims=True)
    margin_gradients = np.concatenate([np.einsum("nd,nc->ndc", x_test, dz).reshape(4, -1), dz], axis=1)
    expected = _unit(margin_gradients @ matrix) @ _unit(_loss_gradients(model, x_train, y_train) @ matrix).T
    pairwise = calculator.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy()
    np.testing.assert_allclose(pairwise, expected, rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(TypeError, match="InfluenceModel"):
        il.GradDot(_model())
    with pytest.raises(TypeError, match="Projection"):
        il.GradCos(il.InfluenceModel(_model()), projection=16)
    with pytest.raises(TypeError, match="Projection"):
        il.TracIn([il.InfluenceModel(_model())], 0.1, projection=16)


@pytest.mark.parametrize("structured", [False, True])
def test_projected_tracin_converges_to_tracin_as_k_grows(structured):
    model = keras.Sequential([
        keras.Input((8,)), keras.layers.Dense(64, activation="tanh"), keras.layers.Dense(4, activation="softmax"),
    ])
    checkpoints = []
    for seed in range(2):
        clone = keras.models.clone_model(model)
        rng = np.random.default_rng(seed)
        clone.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.weights])
        checkpoints.append(il.InfluenceModel(clone, start_layer=0, last_layer=1))
    rng = np.random.default_rng(9)
    x = rng.normal(size=(24, 8)).astype(np.float32)
    y = np.eye(4, dtype=np.float32)[rng.integers(4, size=24)]
    rates = [0.3, 0.1]
    exact = il.TracIn(checkpoints, rates, show_progress=False).influence_between_batches((x[:6], y[:6]), (x, y)).numpy()
    errors = []
    for k in (16, 256, 4096):
        projected = il.TracIn(checkpoints, rates, show_progress=False,
                              projection=il.Projection(k, seed=4, structured=structured))
        values = projected.influence_between_batches((x[:6], y[:6]), (x, y)).numpy()
        errors.append(np.linalg.norm(values - exact) / np.linalg.norm(exact))
        self_values = extract_only_values(projected.compute_influence_values(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(8))).numpy()
        np.testing.assert_allclose(self_values, np.diag(projected.influence_between_batches((x, y), (x, y)).numpy()),
                                   rtol=1e-4, atol=1e-5)
    assert errors[0] > errors[1] > errors[2]
    if structured:  # 576 + 260 parameters fit in k = 4096: the structured projection is then exact
        assert errors[2] < 1e-5
    else:  # error ∝ 1/√k
        assert errors[2] < 0.08
        assert errors[2] < errors[0] / 8
