"""influence_lib.utils against NumPy: BatchSort and LinearNearestNeighbors vs argsort, conjugate gradients
vs np.linalg.solve, the Armijo search on a quadratic, and the Keras / tf.data helpers."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.common.errors import SingularHessianError
from influence_lib.utils import (
    ORDER,
    BacktrackingLineSearch,
    BatchSort,
    LinearNearestNeighbors,
    array_to_dataset,
    conjugate_gradients_solve,
    dataset_to_tensor,
    find_layer,
    is_dataset_batched,
    split_model,
)


@pytest.mark.parametrize("order", [ORDER.DESCENDING, ORDER.ASCENDING])
def test_batch_sort_keeps_the_k_best_per_query(order):
    rng = np.random.default_rng(0)
    queries, k, batches, n = 3, 4, 3, 5
    keys = rng.normal(size=(batches, queries, n, 2))
    values = rng.normal(size=(batches, queries, n))
    sorter = BatchSort((2,), (queries, k), dtype=tf.float64, order=order)
    for batch_keys, batch_values in zip(keys, values):
        sorter.add_all(batch_keys, batch_values)
    best_keys, best_values = sorter.get()
    all_values = np.concatenate(list(values), axis=1)
    all_keys = np.concatenate(list(keys), axis=1)
    sign = -1 if order == ORDER.DESCENDING else 1
    positions = np.argsort(sign * all_values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(best_values.numpy(), np.take_along_axis(all_values, positions, 1))
    np.testing.assert_array_equal(best_keys.numpy(), np.take_along_axis(all_keys, positions[..., None], 1))
    sorter.reset()
    assert np.all(np.isinf(sorter.get()[1].numpy()))
    with pytest.raises(ValueError, match="add_all"):
        sorter.add_all(keys[0][:, :, 0], values[0])


def test_linear_nearest_neighbors_query_matches_argsort():
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(10, 2)).astype(np.float32)
    vectors = rng.normal(size=(10, 3)).astype(np.float32)
    queries = rng.normal(size=(4, 3)).astype(np.float32)
    pairs = tf.data.Dataset.from_tensor_slices(((inputs, np.zeros(10, np.float32)), vectors)).batch(3)
    search = LinearNearestNeighbors()
    search.build(pairs, lambda q, v: tf.matmul(q, v, transpose_b=True), k=3, query_batch_size=4)
    values, samples = search.query(queries)
    scores = queries @ vectors.T
    positions = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    np.testing.assert_allclose(values.numpy(), np.take_along_axis(scores, positions, 1), rtol=1e-6)
    np.testing.assert_array_equal(samples.numpy(), inputs[positions])
    np.testing.assert_array_equal(search.search(queries).indices.numpy(), positions)
    with pytest.raises(ValueError, match="build"):
        LinearNearestNeighbors().search(queries)


def test_conjugate_gradients_solve_vectors_columns_and_initial_guess():
    rng = np.random.default_rng(2)
    factor = rng.normal(size=(6, 6))
    matrix = factor @ factor.T + 0.5 * np.eye(6)
    operator = lambda x: tf.matmul(tf.constant(matrix), tf.reshape(x, [6, -1]))
    b = rng.normal(size=6)
    x = conjugate_gradients_solve(lambda v: tf.reshape(operator(v), [6]), tf.constant(b), maxiter=50, tol=1e-12)
    assert x.shape == (6,)
    np.testing.assert_allclose(x.numpy(), np.linalg.solve(matrix, b), rtol=1e-9)
    columns = rng.normal(size=(6, 3))
    solved = conjugate_gradients_solve(operator, tf.constant(columns), x0=tf.ones((6, 3), tf.float64), maxiter=50,
                                       tol=1e-12)
    np.testing.assert_allclose(solved.numpy(), np.linalg.solve(matrix, columns), rtol=1e-9)
    loose = conjugate_gradients_solve(operator, tf.constant(columns), maxiter=50, tol=0.5, atol=1e3)
    np.testing.assert_array_equal(loose.numpy(), np.zeros_like(columns))
    with pytest.raises(SingularHessianError):
        conjugate_gradients_solve(lambda v: -v, tf.constant(b), maxiter=5)
    with pytest.raises(ValueError, match="maxiter"):
        conjugate_gradients_solve(operator, tf.constant(b), maxiter=0)


def test_backtracking_line_search_finds_the_armijo_step_of_a_quadratic():
    search = BacktrackingLineSearch(scaling_factor=0.5, armijo_fraction=0.1)
    objective = lambda x: 0.5 * tf.reduce_sum(x * x)
    point = tf.constant([2.0, -1.0], tf.float64)
    direction = -4.0 * point
    # f(x + η d) = ½‖x‖²(1 − 4η)²: η = 1 and ½ give no Armijo decrease, η = ¼ reaches the minimum.
    step = search.search(objective, point, direction, float(objective(point)), float(tf.reduce_sum(point * direction)))
    assert step.size == 0.25
    np.testing.assert_allclose(step.point.numpy(), [0.0, 0.0])
    assert step.value == 0.0
    assert BacktrackingLineSearch(max_backtracks=1).search(objective, point, direction, 2.5, -20.0) is None
    with pytest.raises(ValueError, match="descent"):
        search.search(objective, point, -direction, 2.5, 20.0)
    with pytest.raises(ValueError, match="scaling_factor"):
        BacktrackingLineSearch(scaling_factor=1.5)


def _functional():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(5, activation="relu", name="hidden")(inputs)
    features = keras.layers.Dense(3, name="features")(hidden)
    outputs = keras.layers.Dense(2, activation="softmax", name="head")(keras.layers.Activation("tanh")(features))
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("kind", ["functional", "sequential"])
def test_split_model_recomposes_the_model(kind):
    if kind == "functional":
        model = _functional()
    else:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu", name="hidden"),
                                  keras.layers.Dense(3, name="features"), keras.layers.Dense(2, name="head")])
    x = np.random.default_rng(3).normal(size=(6, 4)).astype(np.float32)
    features, head = split_model(model, "features")
    np.testing.assert_allclose(head(features(x)).numpy(), model(x).numpy(), rtol=1e-6)
    assert features.output_shape == (None, 5)
    assert find_layer(model, "head") is model.layers[-1]
    assert find_layer(model, -1) is model.layers[-1]
    with pytest.raises(ValueError, match="Unknown layer"):
        find_layer(model, "nope")


def test_dataset_helpers():
    x = np.arange(10, dtype=np.float64).reshape(5, 2)
    y = np.arange(5)
    batched = array_to_dataset((x, y), batch_size=2)
    assert is_dataset_batched(batched) == 2
    assert is_dataset_batched(batched.map(lambda a, b: (a * 2, b))) == 2
    assert is_dataset_batched(array_to_dataset(x)) is False
    assert is_dataset_batched(batched.unbatch()) is False
    inputs, labels = dataset_to_tensor(batched)
    assert inputs.dtype == tf.float64
    np.testing.assert_array_equal(inputs.numpy(), x)
    np.testing.assert_array_equal(labels.numpy(), y)
    shuffled = dataset_to_tensor(array_to_dataset(x, batch_size=5, shuffle=True, seed=0))
    np.testing.assert_array_equal(np.sort(shuffled.numpy(), axis=0), x)
    with pytest.raises(ValueError, match="same number of rows"):
        array_to_dataset((x, y[:3]))
    with pytest.raises(ValueError, match="batch_size"):
        array_to_dataset(x, batch_size=0)
    with pytest.raises(ValueError, match="unbatched"):
        dataset_to_tensor(array_to_dataset(x))
