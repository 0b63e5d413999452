"""Result lengths and to_numpy / extract_only_values for every result kind, against NumPy float64 TracIn."""
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from tests.reference_math import softmax_gradients, softmax_regression

RATE = 0.5


@pytest.fixture(scope="module")
def setup():
    model, dataset, x, y = softmax_regression(n=20, batch_size=6)
    tracin = il.TracIn([il.InfluenceModel(model)], RATE, show_progress=False)
    kernel, bias = (w.numpy().astype(np.float64) for w in model.layers[-1].weights)
    gradients = softmax_gradients(x, y, kernel, bias)
    evaluate = tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(3)
    return tracin, dataset, evaluate, RATE * gradients[:7] @ gradients.T, RATE * (gradients**2).sum(1), gradients


def test_lengths_follow_the_inputs(setup):
    tracin, dataset, evaluate, *_ = setup
    assert len(tracin.compute_influence_values(dataset)) == 4
    assert len(tracin.compute_influence_vector(dataset)) == 4
    assert len(tracin.estimate_influence_values_in_batches(evaluate, dataset)) == 3
    assert len(tracin.top_k(evaluate, dataset, k=2)) == 3
    unknown = dataset.filter(lambda x, y: True)
    with pytest.raises(TypeError):
        len(tracin.compute_influence_values(unknown))
    assert len(list(tracin.compute_influence_values(unknown))) == 4


def test_to_numpy_and_extract_only_values_for_every_result(setup):
    tracin, dataset, evaluate, pairwise, self_influence, gradients = setup
    result = il.to_numpy(tracin.compute_influence_values(dataset))
    np.testing.assert_allclose(result.values, self_influence, rtol=1e-5)
    np.testing.assert_array_equal(result.indices, np.arange(20))
    vectors = il.to_numpy(tracin.compute_influence_vector(dataset))
    np.testing.assert_allclose(vectors.values, RATE * gradients, atol=1e-6)
    matrix = il.to_numpy(tracin.estimate_influence_values_in_batches(evaluate, dataset))
    np.testing.assert_allclose(matrix.values, pairwise, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(matrix.indices, np.arange(20))
    top = il.to_numpy(tracin.top_k(evaluate, dataset, k=3))
    expected_indices = np.argsort(-pairwise, axis=1)[:, :3]
    np.testing.assert_array_equal(top.indices, expected_indices)
    np.testing.assert_allclose(top.values, np.take_along_axis(pairwise, expected_indices, 1), rtol=1e-5)
    best = il.to_numpy(tracin.compute_top_k_from_training_dataset(dataset, 4))
    np.testing.assert_array_equal(best.indices, np.argsort(-self_influence)[:4])
    for kind, expected in [
        (tracin.compute_influence_values(dataset), self_influence),
        (tracin.estimate_influence_values_in_batches(evaluate, dataset), pairwise),
        (tracin.top_k(evaluate, dataset, k=3), top.values),
        (tracin.compute_top_k_from_training_dataset(dataset, 4), best.values),
    ]:
        np.testing.assert_allclose(il.extract_only_values(kind).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_to_numpy_refuses_what_is_not_a_result():
    with pytest.raises(TypeError, match="to_numpy expects a result"):
        il.to_numpy(3)
    with pytest.raises(TypeError, match="to_numpy expects a result"):
        il.to_numpy([1, 2])
