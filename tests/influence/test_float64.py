"""float64 models stay float64 end to end: per-sample gradients (closed form and jacobian), caches,
influence vectors, pairwise values, top-k and self-influence, against NumPy float64 at ~1e-12."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.common.enums import CACHE

RTOL = 1e-11


def _close(actual, expected, rtol=RTOL):
    actual = np.asarray(actual)
    assert actual.dtype == np.float64
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _mlp(d=4, hidden=5, classes=3, seed=0) -> keras.Model:
    rng = np.random.default_rng(seed)
    model = keras.Sequential([
        keras.Input((d,), dtype="float64"),
        keras.layers.Dense(hidden, activation="tanh", dtype="float64"),
        keras.layers.Dense(classes, activation="softmax", dtype="float64"),
    ])
    model.set_weights([rng.normal(scale=0.7, size=w.shape) for w in model.weights])
    return model


def _mlp_gradients(model: keras.Model, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-sample cross-entropy gradients of tanh → softmax by hand-written backprop, [W1, b1, W2, b2]."""
    w1, b1, w2, b2 = (w.numpy() for w in model.weights)
    hidden = np.tanh(x @ w1 + b1)
    delta2 = rm.softmax(hidden @ w2 + b2) - y
    delta1 = (delta2 @ w2.T) * (1.0 - hidden**2)
    return np.concatenate(
        [np.einsum("ni,no->nio", x, delta1).reshape(len(x), -1), delta1,
         np.einsum("ni,no->nio", hidden, delta2).reshape(len(x), -1), delta2],
        axis=1,
    )


def _data(n, d=4, classes=3, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), np.eye(classes)[rng.integers(0, classes, n)]


def _dataset(x, y, batch_size):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


@pytest.mark.parametrize("mode", ["auto", "jacobian"])
def test_per_sample_gradients_of_a_float64_mlp_match_numpy(mode):
    model = _mlp()
    x, y = _data(7)
    influence_model = il.InfluenceModel(model, 0, 1, per_sample_gradients=mode)
    assert influence_model.dtype == tf.float64
    jacobian = influence_model.batch_jacobian_tensor((x, y))
    if mode == "auto":
        assert influence_model.fallback_reason is None
    expected = _mlp_gradients(model, x, y)
    _close(jacobian, expected)
    _close(influence_model.batch_gradient_norm_sq_tensor((x, y)), (expected**2).sum(1))
    _close(influence_model.batch_gradient_dot_tensor((x[:3], y[:3]), (x, y)), expected[:3] @ expected.T)
    _close(influence_model.batch_loss_tensor((x, y)), -np.log((rm.softmax(
        np.tanh(x @ model.weights[0].numpy() + model.weights[1].numpy()) @ model.weights[2].numpy()
        + model.weights[3].numpy()) * y).sum(1)))


@pytest.fixture(scope="module")
def regression():
    """float64 softmax regression, its exact influence matrix and self-influence in NumPy."""
    rng = np.random.default_rng(3)
    model = keras.Sequential([keras.Input((4,), dtype="float64"),
                              keras.layers.Dense(3, activation="softmax", dtype="float64")])
    model.set_weights([rng.normal(scale=0.5, size=(4, 3)), rng.normal(scale=0.1, size=3)])
    x, y = _data(24, seed=4)
    x_test, y_test = _data(6, seed=5)
    kernel, bias = (w.numpy() for w in model.weights)
    inverse = np.linalg.pinv(rm.softmax_hessian(x, kernel, bias), rcond=1e-10, hermitian=True)
    g_train, g_test = rm.softmax_gradients(x, y, kernel, bias), rm.softmax_gradients(x_test, y_test, kernel, bias)
    return {
        "model": il.InfluenceModel(model),
        "train": _dataset(x, y, 8),
        "test": _dataset(x_test, y_test, 4),
        "pairwise": g_test @ inverse @ g_train.T,
        "self": np.einsum("np,pq,nq->n", g_train, inverse, g_train),
    }


def _calculator(problem):
    # The reference is the pseudo-inverse: damping 0 (Influenciae's behaviour), not the default damping='auto'.
    undamped = il.ExactIHVPFactory(damping=0.0, show_progress=False)
    return il.FirstOrderInfluenceCalculator(problem["model"], problem["train"], undamped, show_progress=False)


def test_first_order_self_influence_is_float64(regression):
    calculator = _calculator(regression)
    assert calculator.value_dtype == tf.float64
    _close(il.extract_only_values(calculator.compute_influence_values(regression["train"])), regression["self"])


@pytest.mark.parametrize("cache", [CACHE.MEMORY, CACHE.DISK, CACHE.NO_CACHE])
def test_first_order_pairwise_values_and_top_k_are_float64(regression, cache):
    calculator = _calculator(regression)
    rows = []
    for _, inner in calculator.estimate_influence_values_in_batches(regression["test"], regression["train"], cache):
        rows.append(np.concatenate([values.numpy() for _, values in inner], axis=1))
    _close(np.concatenate(rows), regression["pairwise"])
    top = list(calculator.top_k(regression["test"], regression["train"], k=3, influence_vector_in_cache=cache))
    values = np.concatenate([element[1].numpy() for element in top])
    indices = np.concatenate([element[3].numpy() for element in top])
    expected_indices = np.argsort(-regression["pairwise"], axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(indices, expected_indices)
    _close(values, np.take_along_axis(regression["pairwise"], expected_indices, axis=1))


def test_influence_vectors_saved_and_loaded_stay_float64(regression, tmp_path):
    calculator = _calculator(regression)
    path = str(tmp_path / "vectors")
    list(calculator.compute_influence_vector(regression["train"], save_influence_vector_ds_path=path))
    batches = calculator.estimate_influence_values_in_batches(
        regression["test"], regression["train"], CACHE.DISK, load_influence_vector_path=path
    )
    rows = [np.concatenate([values.numpy() for _, values in inner], axis=1) for _, inner in batches]
    _close(np.concatenate(rows), regression["pairwise"])


def test_tracin_on_float64_checkpoints_matches_numpy():
    models = [_mlp(seed=seed) for seed in (0, 1)]
    rates = [0.3, 0.05]
    x, y = _data(9, seed=6)
    x_test, y_test = _data(4, seed=7)
    tracin = il.TracIn([il.InfluenceModel(model, 0, 1) for model in models], rates, show_progress=False)
    expected = sum(
        rate * _mlp_gradients(m, x_test, y_test) @ _mlp_gradients(m, x, y).T for m, rate in zip(models, rates)
    )
    train, test = _dataset(x, y, 4), _dataset(x_test, y_test, 2)
    rows = [np.concatenate([values.numpy() for _, values in inner], axis=1)
            for _, inner in tracin.estimate_influence_values_in_batches(test, train)]
    _close(np.concatenate(rows), expected)
    top = next(iter(tracin.top_k(test, train, k=2)))
    _close(top[1], -np.sort(-expected[:2], axis=1)[:, :2])
    self_expected = sum(rate * (_mlp_gradients(m, x, y) ** 2).sum(1) for m, rate in zip(models, rates))
    _close(il.extract_only_values(tracin.compute_influence_values(train)), self_expected)


def test_float64_keras_loss_is_computed_in_float64_without_touching_the_users_loss():
    model = _mlp()
    loss = keras.losses.CategoricalCrossentropy(reduction=None)
    x, y = _data(5)
    influence_model = il.InfluenceModel(model, 0, 1, loss_function=loss)
    assert influence_model.batch_loss_tensor((x, y)).dtype == tf.float64
    assert loss.dtype == "float32"
    _close(influence_model.batch_jacobian_tensor((x, y)), _mlp_gradients(model, x, y))


def test_float32_models_keep_float32_results():
    model, train, x, y = rm.softmax_regression(n=8, batch_size=4)
    calculator = il.FirstOrderInfluenceCalculator(il.InfluenceModel(model), train, show_progress=False)
    assert calculator.value_dtype == tf.float32
    values = il.extract_only_values(calculator.compute_influence_values(train))
    assert values.dtype == tf.float32


@pytest.mark.parametrize("policy", ["float16", "bfloat16", "mixed_float16"])
def test_low_precision_models_compute_and_return_float32(policy):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax", dtype=policy)])
    x, y = (part.astype(np.float32) for part in _data(8, seed=8))
    influence_model = il.InfluenceModel(model)
    assert influence_model.dtype == tf.float32
    jacobian = influence_model.batch_jacobian_tensor((x, y))
    assert jacobian.dtype == tf.float32
    kernel, bias = (w.numpy().astype(np.float64) for w in influence_model.weights)
    expected = rm.softmax_gradients(x, y, kernel, bias)
    # The forward pass runs in the layer's 16-bit compute dtype: agreement to that precision.
    np.testing.assert_allclose(jacobian.numpy(), expected, atol=0.05 * np.abs(expected).max())
    calculator = il.TracIn([influence_model], 0.1, show_progress=False)
    values = il.extract_only_values(calculator.compute_influence_values(_dataset(x, y, 4)))
    assert values.dtype == tf.float32
    np.testing.assert_allclose(values.numpy(), 0.1 * (expected**2).sum(1), rtol=0.1)
