"""TRAK against its closed form computed in float64 NumPy from materialized margin gradients;
ensembles; feature shards that survive a SIGKILL and reload identically."""
import os
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from influence_lib.common import storage
from influence_lib.common.enums import CACHE
from influence_lib.influence.base import extract_only_values
from influence_lib.model.projection import dense_matrix

IN_DIM, CLASSES = 4, 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(seed: int) -> keras.Model:
    model = keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Dense(CLASSES, activation="softmax")])
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in model.weights])
    return model


def _data(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, IN_DIM)).astype(np.float32)
    y = np.eye(CLASSES, dtype=np.float32)[rng.integers(CLASSES, size=n)]
    return x, y


def _dataset(x, y, batch_size=8):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def _margin_gradients_and_weights(model: keras.Model, x: np.ndarray, y: np.ndarray):
    """∇_θ (z_y − logsumexp_{k≠y} z_k) = (x ⊗ dz, dz), dz = e_y − softmax over k≠y; and 1 − p_y."""
    kernel, bias = (w.numpy().astype(np.float64) for w in model.weights)
    logits = x.astype(np.float64) @ kernel + bias
    mask = y.astype(bool)
    others = np.where(mask, -np.inf, logits)
    soft = np.exp(others - others.max(axis=1, keepdims=True))
    soft /= soft.sum(axis=1, keepdims=True)
    dz = mask - soft
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    gradients = np.concatenate([np.einsum("nd,nc->ndc", x, dz).reshape(len(x), -1), dz], axis=1)
    return gradients, 1.0 - probabilities[mask]


def _expected_trak(models, x_train, y_train, x_test, y_test, damping):
    kernel_terms, weights = [], []
    for model in models:
        train, weight = _margin_gradients_and_weights(model, x_train, y_train)
        test, _ = _margin_gradients_and_weights(model, x_test, y_test)
        gram = train.T @ train + damping * np.eye(train.shape[1])
        kernel = np.linalg.inv(gram) if damping > 0 else np.linalg.pinv(gram)
        kernel_terms.append(test @ kernel @ train.T)
        weights.append(weight)
    return np.mean(kernel_terms, axis=0) * np.mean(weights, axis=0)[None, :]


def _pairwise(calculator, test_set, train_set, **kwargs):
    rows = []
    for _, values in calculator.estimate_influence_values_in_batches(test_set, train_set, **kwargs):
        rows.append(np.concatenate([v.numpy() for _, v in values], axis=1))
    return np.concatenate(rows)


@pytest.mark.parametrize("damping, nb_train", [(0.0, 40), (0.5, 40), (0.0, 9)])
def test_trak_without_projection_equals_its_numpy_closed_form(damping, nb_train):
    """Also with fewer training samples (9) than parameters (15): ΦᵀΦ is singular, its pseudo-inverse is used."""
    model = _model(0)
    x_train, y_train = _data(nb_train, 1)
    x_test, y_test = _data(6, 2)
    train_set, test_set = _dataset(x_train, y_train), _dataset(x_test, y_test, 4)
    trak = il.TRAK(il.InfluenceModel(model), train_set, projection=None, damping=damping, show_progress=False)
    expected = _expected_trak([model], x_train, y_train, x_test, y_test, damping)

    np.testing.assert_allclose(_pairwise(trak, test_set, train_set), expected, rtol=2e-4, atol=2e-5)
    pairwise = trak.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy()
    np.testing.assert_allclose(pairwise, expected, rtol=2e-4, atol=2e-5)
    self_expected = np.diag(_expected_trak([model], x_train, y_train, x_train, y_train, damping))
    self_values = extract_only_values(trak.compute_influence_values(train_set)).numpy()
    np.testing.assert_allclose(self_values, self_expected, rtol=2e-4, atol=2e-5)
    top = next(iter(trak.top_k(test_set, train_set, k=3, influence_vector_in_cache=CACHE.NO_CACHE)))
    np.testing.assert_array_equal(top[3].numpy(), np.argsort(-expected[:4], axis=1)[:, :3])
    wide = il.TRAK(il.InfluenceModel(model), train_set, projection=il.Projection(64), damping=damping,
                   show_progress=False)
    assert wide.projection is None  # k ≥ P: the gradients themselves
    np.testing.assert_allclose(wide.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy(), expected,
                               rtol=2e-4, atol=2e-5)


def test_a_float64_model_gives_float64_values_equal_to_numpy():
    model = keras.Sequential([keras.Input((IN_DIM,), dtype="float64"),
                              keras.layers.Dense(CLASSES, activation="softmax", dtype="float64")])
    model.set_weights([w.astype(np.float64) for w in _model(0).get_weights()])
    x_train, y_train = (a.astype(np.float64) for a in _data(40, 1))
    x_test, y_test = (a.astype(np.float64) for a in _data(6, 2))
    trak = il.TRAK(il.InfluenceModel(model), _dataset(x_train, y_train), projection=None, damping=0.5,
                   show_progress=False)
    values = trak.influence_between_batches((x_test, y_test), (x_train, y_train))
    assert values.dtype == tf.float64
    expected = _expected_trak([model], x_train, y_train, x_test, y_test, 0.5)
    np.testing.assert_allclose(values.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_an_ensemble_averages_the_kernel_terms_and_the_weights():
    models = [_model(0), _model(1), _model(2)]
    x_train, y_train = _data(30, 3)
    x_test, y_test = _data(5, 4)
    train_set = _dataset(x_train, y_train)
    trak = il.TRAK.from_models(models, train_set, projection=None, damping=0.1, show_progress=False)
    expected = _expected_trak(models, x_train, y_train, x_test, y_test, 0.1)
    pairwise = trak.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy()
    np.testing.assert_allclose(pairwise, expected, rtol=2e-4, atol=2e-5)
    single = _expected_trak(models[:1], x_train, y_train, x_test, y_test, 0.1)
    assert not np.allclose(pairwise, single, rtol=0.05)


def test_from_checkpoints_loads_each_checkpoint_into_a_clone(tmp_path):
    models = [_model(0), _model(1)]
    paths = []
    for index, model in enumerate(models):
        paths.append(str(tmp_path / f"checkpoint_{index}.weights.h5"))
        model.save_weights(paths[-1])
    x_train, y_train = _data(30, 3)
    x_test, y_test = _data(5, 4)
    architecture = _model(9)
    before = [w.numpy().copy() for w in architecture.weights]
    trak = il.TRAK.from_checkpoints(architecture, paths, _dataset(x_train, y_train), projection=None, damping=0.1,
                                    show_progress=False)
    expected = _expected_trak(models, x_train, y_train, x_test, y_test, 0.1)
    pairwise = trak.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy()
    np.testing.assert_allclose(pairwise, expected, rtol=2e-4, atol=2e-5)
    for old, new in zip(before, architecture.weights):
        np.testing.assert_array_equal(old, new.numpy())
    with pytest.raises(ValueError, match="non-empty list"):
        il.TRAK.from_checkpoints(architecture, "one.weights.h5", _dataset(x_train, y_train))


def test_projected_trak_is_the_closed_form_on_the_projected_features():
    """With a projection R, TRAK is the same formula on the features Rᵀ∇f (seed + m for model m)."""
    models = [_model(0), _model(5)]
    x_train, y_train = _data(40, 6)
    x_test, y_test = _data(5, 7)
    projection = il.Projection(8, seed=11, structured=False)
    trak = il.TRAK.from_models(models, _dataset(x_train, y_train), projection=projection, damping=0.01,
                               show_progress=False)
    kernel_terms, weights = [], []
    for index, model in enumerate(models):
        matrix = dense_matrix(projection.with_seed(11 + index), 0, 15).numpy().astype(np.float64)
        train, weight = _margin_gradients_and_weights(model, x_train, y_train)
        test, _ = _margin_gradients_and_weights(model, x_test, y_test)
        train, test = train @ matrix, test @ matrix
        kernel_terms.append(test @ np.linalg.inv(train.T @ train + 0.01 * np.eye(8)) @ train.T)
        weights.append(weight)
    expected = np.mean(kernel_terms, axis=0) * np.mean(weights, axis=0)
    pairwise = trak.influence_between_batches((x_test, y_test), (x_train, y_train)).numpy()
    np.testing.assert_allclose(pairwise, expected, rtol=1e-3, atol=1e-4)


def test_bad_arguments_are_clear_errors():
    train_set = _dataset(*_data(8, 0))
    with pytest.raises(TypeError, match="InfluenceModel"):
        il.TRAK([_model(0)], train_set)
    with pytest.raises(TypeError, match="Projection"):
        il.TRAK(il.InfluenceModel(_model(0)), train_set, projection=64)
    with pytest.raises(ValueError, match="damping"):
        il.TRAK(il.InfluenceModel(_model(0)), train_set, damping=-1.0)
    wider = keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Dense(CLASSES + 1, activation="softmax")])
    with pytest.raises(ValueError, match="same weights"):
        il.TRAK([il.InfluenceModel(_model(0)), il.InfluenceModel(wider)], train_set)
    with pytest.raises(TypeError, match="keras.Model"):
        il.TRAK.from_models([il.InfluenceModel(_model(0))], train_set)
    with pytest.raises(ValueError, match="at least 2 classes"):
        regression = keras.Sequential([keras.Input((IN_DIM,)), keras.layers.Dense(1)])
        x, _ = _data(8, 0)
        il.TRAK(il.InfluenceModel(regression, loss_function=keras.losses.MeanSquaredError(reduction=None)),
                _dataset(x, np.zeros((8, 1), np.float32)), projection=None, show_progress=False)


_CRASHING_FEATURIZATION = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np, keras, tensorflow as tf
    import influence_lib as il
    from influence_lib.common import storage

    data = np.load(sys.argv[1])
    model = keras.Sequential([keras.Input((data["x"].shape[1],)), keras.layers.Dense(3, activation="softmax")])
    model.set_weights([data["kernel"], data["bias"]])
    writes = []
    original = storage.ShardStore.write

    def write_then_die(self, name, **arrays):
        original(self, name, **arrays)
        writes.append(name)
        if len(writes) == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    storage.ShardStore.write = write_then_die
    train_set = tf.data.Dataset.from_tensor_slices((data["x"], data["y"])).batch(8)
    il.TRAK(il.InfluenceModel(model), train_set, projection=il.Projection(8, seed=1), feature_store=sys.argv[2],
            show_progress=False)
    """
)


def test_feature_shards_survive_a_crash_resume_and_reload_identically(tmp_path, monkeypatch):
    model = _model(0)
    x_train, y_train = _data(40, 8)  # 5 batches
    x_test, y_test = _data(5, 9)
    data_path, store = str(tmp_path / "data.npz"), str(tmp_path / "features")
    kernel, bias = (w.numpy() for w in model.weights)
    np.savez(data_path, x=x_train, y=y_train, kernel=kernel, bias=bias)
    script = tmp_path / "crash.py"
    script.write_text(_CRASHING_FEATURIZATION)
    completed = subprocess.run([sys.executable, str(script), data_path, store], cwd=ROOT, capture_output=True,
                               timeout=300, env={**os.environ, "PYTHONPATH": ROOT})
    assert completed.returncode == -signal.SIGKILL, completed.stderr.decode()[-2000:]
    shards = sorted(name for name in os.listdir(store) if name.endswith(".npz"))
    assert shards == ["batch_000000.npz", "batch_000001.npz"]

    writes = []
    original = storage.ShardStore.write
    monkeypatch.setattr(storage.ShardStore, "write",
                        lambda self, name, **arrays: (writes.append(name), original(self, name, **arrays))[1])
    train_set, test_set = _dataset(x_train, y_train), _dataset(x_test, y_test, 5)
    projection = il.Projection(8, seed=1)
    resumed = il.TRAK(il.InfluenceModel(model), train_set, projection=projection, feature_store=store,
                      show_progress=False)
    assert writes == ["batch_000002", "batch_000003", "batch_000004"]
    fresh = il.TRAK(il.InfluenceModel(model), train_set, projection=projection, show_progress=False)
    for left, right in zip(resumed.kernels, fresh.kernels):
        np.testing.assert_allclose(left.numpy(), right.numpy(), rtol=1e-6, atol=1e-9)
    reloaded = il.TRAK(il.InfluenceModel(model), train_set, projection=projection, feature_store=store,
                       show_progress=False)
    assert len(writes) == 3  # everything read back
    from_store = _pairwise(reloaded, test_set, train_set, influence_vector_in_cache=CACHE.NO_CACHE)
    np.testing.assert_allclose(from_store, _pairwise(fresh, test_set, train_set), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="different setup"):
        il.TRAK(il.InfluenceModel(_model(3)), train_set, projection=projection, feature_store=store,
                show_progress=False)
