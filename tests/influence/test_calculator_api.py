"""Influenciae's calculator arguments: ``device=``, ``top_k(nearest_neighbors=, d_type=)`` and inner datasets
that yield the training batch, checked against the NumPy closed form of softmax regression."""
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.utils import BaseNearestNeighbors, LinearNearestNeighbors


@pytest.fixture(scope="module")
def problem():
    model, train, x, y = rm.softmax_regression(n=20, seed=3, batch_size=6)
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    rng = np.random.default_rng(4)
    x_test = rng.normal(size=(5, 4)).astype(np.float32)
    y_test = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 5)]
    inverse = rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias))
    g_train, g_test = rm.softmax_gradients(x, y, kernel, bias), rm.softmax_gradients(x_test, y_test, kernel, bias)
    # The reference is the pseudo-inverse: damping 0 (Influenciae's behaviour), not the default damping='auto'.
    undamped = il.ExactIHVPFactory(damping=0.0, show_progress=False)
    calculator = il.FirstOrderInfluenceCalculator(influence_model, train, undamped, show_progress=False)
    return {
        "calculator": calculator, "train": train, "x": x, "y": y,
        "test": tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(2),
        "pairwise": g_test @ inverse @ g_train.T,
        "self": np.einsum("np,pq,nq->n", g_train, inverse, g_train),
    }


def _close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_inner_datasets_yield_the_training_batch_and_device_runs_on_the_cpu(problem):
    calculator = problem["calculator"]
    rows, seen_x, seen_y = [], [], []
    for _, inner in calculator.estimate_influence_values_in_batches(problem["test"], problem["train"], device="/CPU:0"):
        row = []
        for (x, y), values in inner:
            seen_x.append(x.numpy())
            seen_y.append(y.numpy())
            row.append(values.numpy())
        rows.append(np.concatenate(row, axis=1))
    _close(np.concatenate(rows), problem["pairwise"])
    np.testing.assert_array_equal(np.concatenate(seen_x[:4]), problem["x"])
    np.testing.assert_array_equal(np.concatenate(seen_y[:4]), problem["y"])
    values = il.extract_only_values(calculator.compute_influence_values(problem["train"], device="CPU:0"))
    _close(values.numpy(), problem["self"])
    vectors = list(calculator.compute_influence_vector(problem["train"], device="/CPU:0"))
    assert [v.shape[0] for _, v in vectors] == [6, 6, 6, 2]


def test_top_k_with_nearest_neighbors_d_type_and_device(problem):
    calculator = problem["calculator"]
    expected_indices = np.argsort(-problem["pairwise"], axis=1, kind="stable")[:, :3]
    for kwargs in ({}, {"nearest_neighbors": LinearNearestNeighbors(), "d_type": tf.float64, "device": "/CPU:0"}):
        top = list(calculator.top_k(problem["test"], problem["train"], k=3, **kwargs))
        values = np.concatenate([element[1].numpy() for element in top])
        np.testing.assert_array_equal(np.concatenate([element[3].numpy() for element in top]), expected_indices)
        np.testing.assert_array_equal(np.concatenate([element[2].numpy() for element in top]),
                                      problem["x"][expected_indices])
        _close(values, np.take_along_axis(problem["pairwise"], expected_indices, axis=1))
        assert top[0][1].dtype == kwargs.get("d_type", tf.float32)


def test_a_custom_nearest_neighbors_search_is_used(problem):
    class Counting(LinearNearestNeighbors):
        searches = 0

        def search(self, vectors):
            Counting.searches += 1
            return super().search(vectors)

    list(problem["calculator"].top_k(problem["test"], problem["train"], k=2, nearest_neighbors=Counting()))
    assert Counting.searches == 3
    assert issubclass(Counting, BaseNearestNeighbors)


def test_bad_device_and_nearest_neighbors(problem):
    calculator = problem["calculator"]
    with pytest.raises(ValueError, match="does not exist"):
        calculator.compute_influence_values(problem["train"], device="/GPU:7")
    with pytest.raises(ValueError, match="not a device name"):
        calculator.top_k(problem["test"], problem["train"], device="banana:::")
    with pytest.raises(TypeError, match="device"):
        calculator.compute_influence_vector(problem["train"], device=0)
    with pytest.raises(TypeError, match="BaseNearestNeighbors"):
        calculator.top_k(problem["test"], problem["train"], nearest_neighbors="linear")
