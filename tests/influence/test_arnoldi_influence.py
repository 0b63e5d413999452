"""ArnoldiInfluenceCalculator against float64 NumPy: g_tᵀ (Σ_{top-k |λ|} u uᵀ/λ) g_z.

L2-regularized softmax regression with features on very different scales (spread Hessian
spectrum), so projecting on the k SMALLEST eigenvalues would fail these tests (checked).
"""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

from influence_lib.common.enums import CACHE, ORDER
from influence_lib.influence import ArnoldiInfluenceCalculator, extract_only_values

L2 = 1e-2


def _softmax_problem(n=48, classes=3, seed=0):
    return rm.spread_softmax_problem(n, L2, classes, seed)


def _numpy_hessian_and_gradients(influence_model, x, y):
    """Mean Hessian (P, P) and per-sample gradients (n, P), float64, θ = [vec(W) row-major, b]."""
    kernel, bias = [w.numpy() for w in influence_model.weights]
    return rm.regularized_softmax_hessian_and_gradients(x, y, kernel, bias, L2)


def _projected_inverse(hessian, k, largest=True):
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    order = np.argsort(-np.abs(eigenvalues))
    chosen = order[:k] if largest else order[-k:]
    return (eigenvectors[:, chosen] / eigenvalues[chosen]) @ eigenvectors[:, chosen].T


@pytest.fixture(scope="module")
def fitted():
    keras.utils.set_random_seed(0)
    influence_model, x, y = _softmax_problem()
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    calculator = ArnoldiInfluenceCalculator(
        influence_model, train, subspace_dim=18, k_largest_eig_vals=7, dtype=tf.float64, damping=0.0, show_progress=False
    )
    hessian, gradients = _numpy_hessian_and_gradients(influence_model, x, y)
    return calculator, train, x, y, hessian, gradients


def test_pairwise_influence_matches_top_k_projection(fitted):
    calculator, train, x, y, hessian, gradients = fitted
    evaluate = tf.data.Dataset.from_tensor_slices((x[:10], y[:10])).batch(4)
    values = np.concatenate(
        [np.concatenate([v.numpy() for _, v in per_train], axis=1)
         for _, per_train in calculator.estimate_influence_values_in_batches(evaluate, train)],
        axis=0,
    )
    expected = gradients[:10] @ _projected_inverse(hessian, 7) @ gradients.T
    wrong_end = gradients[:10] @ _projected_inverse(hessian, 7, largest=False) @ gradients.T
    tolerance = 1e-2 * np.abs(expected).max()
    np.testing.assert_allclose(values, expected, atol=tolerance)
    assert np.abs(wrong_end - expected).max() > 20 * tolerance


def test_self_influence_and_top_k(fitted):
    calculator, train, _, _, hessian, gradients = fitted
    values = extract_only_values(calculator.compute_influence_values(train)).numpy()
    expected = np.einsum("np,pq,nq->n", gradients, _projected_inverse(hessian, 7), gradients)
    np.testing.assert_allclose(values, expected, rtol=1e-2, atol=1e-3 * expected.max())
    top = calculator.compute_top_k_from_training_dataset(train, 5, ORDER.DESCENDING)
    np.testing.assert_array_equal(np.sort(top.indices.numpy()), np.sort(np.argsort(-expected)[:5]))


def test_influence_vectors_are_k_dimensional_and_cached_on_disk(fitted, tmp_path):
    calculator, train, x, y, hessian, gradients = fitted
    assert calculator.eig_vals.shape == (7,) and calculator.G.shape == (7, 21)
    vectors = np.concatenate([v.numpy() for _, v in calculator.compute_influence_vector(train)])
    assert vectors.shape == (48, 7)
    evaluate = tf.data.Dataset.from_tensor_slices((x[:3], y[:3])).batch(3)
    results = list(calculator.top_k(evaluate, train, k=4, influence_vector_in_cache=CACHE.DISK))
    expected = gradients[:3] @ _projected_inverse(hessian, 7) @ gradients.T
    np.testing.assert_allclose(
        results[0][1].numpy(), -np.sort(-expected, axis=1)[:, :4], rtol=1e-2, atol=1e-2 * np.abs(expected).max()
    )


def test_full_subspace_equals_exact_influence():
    influence_model, x, y = _softmax_problem(n=32)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    calculator = ArnoldiInfluenceCalculator(influence_model, train, subspace_dim=21, damping=0.0, show_progress=False)
    hessian, gradients = _numpy_hessian_and_gradients(influence_model, x, y)
    values = extract_only_values(calculator.compute_influence_values(train)).numpy()
    expected = np.einsum("np,pq,nq->n", gradients, np.linalg.inv(hessian), gradients)
    np.testing.assert_allclose(values, expected, rtol=5e-3)


def test_bad_inputs_raise():
    influence_model, x, y = _softmax_problem(n=16)
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    with pytest.raises(TypeError, match="InfluenceModel"):
        ArnoldiInfluenceCalculator(influence_model.model, train, subspace_dim=4)
    with pytest.raises(ValueError, match="subspace_dim"):
        ArnoldiInfluenceCalculator(influence_model, train, subspace_dim=100, show_progress=False)
    with pytest.raises(ValueError, match="unbatched"):
        ArnoldiInfluenceCalculator(
            influence_model, tf.data.Dataset.from_tensor_slices((x, y)), subspace_dim=4, show_progress=False
        )
