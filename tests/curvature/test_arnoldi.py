"""ArnoldiIHVP and the Arnoldi iteration against float64 NumPy eigendecompositions.

The model is an L2-regularized softmax regression whose input features have very different
scales, so the Hessian spectrum spans several orders of magnitude: keeping the k SMALLEST
eigenvalues instead of the largest gives a completely different answer (checked explicitly).
"""
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

from influence_lib.common.errors import SingularHessianError
from influence_lib.curvature import (
    ArnoldiIHVP,
    ArnoldiIHVPFactory,
    IHVPCalculator,
    arnoldi_iteration,
    make_ihvp,
)
from influence_lib.curvature.arnoldi import top_eigenpairs
from influence_lib.model.influence_model import InfluenceModel

L2 = 1e-2
FEATURE_SCALES = rm.SPREAD_FEATURE_SCALES


def _softmax_problem(n=60, classes=3, l2=L2, seed=0):
    """L2-regularized softmax regression (P = 6·3 + 3 = 21) with a widely spread Hessian spectrum."""
    influence_model, x, y = rm.spread_softmax_problem(n, l2, classes, seed)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    return influence_model, dataset, x, y


def _numpy_hessian_and_gradients(influence_model, x, y, l2=L2):
    """Mean Hessian (P, P) and per-sample gradients (n, P) in float64, parameters = [vec(W) row-major, b]."""
    kernel, bias = [w.numpy() for w in influence_model.weights]
    return rm.regularized_softmax_hessian_and_gradients(x, y, kernel, bias, l2)


def _projected_inverse(hessian, vectors, k, largest=True):
    """vectors @ Σ_{top-k |λ|} u uᵀ / λ (or the k smallest |λ| when largest=False)."""
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    order = np.argsort(-np.abs(eigenvalues))
    chosen = order[:k] if largest else order[-k:]
    basis = eigenvectors[:, chosen]
    return ((vectors @ basis) / eigenvalues[chosen]) @ basis.T


@pytest.fixture(scope="module")
def softmax():
    """The regularized problem and its NumPy Hessian and gradients, shared (one traced model)."""
    influence_model, dataset, x, y = _softmax_problem()
    hessian, gradients = _numpy_hessian_and_gradients(influence_model, x, y)
    return influence_model, dataset, hessian, gradients


def test_hessian_spectrum_is_spread(softmax):
    hessian = softmax[2]
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert eigenvalues.min() > 0 and eigenvalues.max() / eigenvalues.min() > 100


def test_full_subspace_reproduces_exact_inverse(softmax):
    influence_model, dataset, hessian, gradients = softmax
    nb_params = influence_model.nb_params
    arnoldi = ArnoldiIHVP(influence_model, dataset, subspace_dim=nb_params, damping=0.0, dtype=tf.float64, show_progress=False)
    expected = np.linalg.solve(hessian, gradients[:10].T).T
    result = arnoldi.ihvp(gradients[:10]).numpy()
    np.testing.assert_allclose(result, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    np.testing.assert_allclose(
        np.sort(arnoldi.eigenvalues.numpy()), np.linalg.eigvalsh(hessian), rtol=1e-3, atol=1e-6
    )


@pytest.mark.parametrize("subspace_dim", [21, 16])
def test_top_k_projection_matches_numpy_eigh(softmax, subspace_dim):
    influence_model, dataset, hessian, gradients = softmax
    k = 6
    arnoldi = ArnoldiIHVP(
        influence_model, dataset, subspace_dim=subspace_dim, k_largest_eig_vals=k, damping=0.0, dtype=tf.float64,
        show_progress=False,
    )
    expected = _projected_inverse(hessian, gradients, k)
    wrong_end = _projected_inverse(hessian, gradients, k, largest=False)
    result = arnoldi.ihvp(gradients).numpy()
    tolerance = 1e-2 * np.abs(expected).max()
    np.testing.assert_allclose(result, expected, atol=tolerance)
    assert np.abs(wrong_end - expected).max() > 100 * tolerance
    top = np.sort(np.abs(np.linalg.eigvalsh(hessian)))[::-1][:k]
    np.testing.assert_allclose(arnoldi.eigenvalues.numpy(), top, rtol=1e-3)


def test_force_hermitian_false_gives_the_same_inverse(softmax):
    influence_model, dataset, hessian, gradients = softmax
    arnoldi = ArnoldiIHVP(
        influence_model, dataset, subspace_dim=21, k_largest_eig_vals=8, force_hermitian=False, damping=0.0, dtype=tf.float64,
        show_progress=False,
    )
    expected = _projected_inverse(hessian, gradients, 8)
    np.testing.assert_allclose(arnoldi.ihvp(gradients).numpy(), expected, atol=1e-2 * np.abs(expected).max())


def test_damping_shifts_the_kept_eigenvalues_and_hvp_is_exact(softmax):
    influence_model, dataset, hessian, gradients = softmax
    damping = 0.3
    arnoldi = ArnoldiIHVP(influence_model, dataset, subspace_dim=21, damping=damping, show_progress=False)
    damped = hessian + damping * np.eye(21)
    expected = np.linalg.solve(damped, gradients[:5].T).T
    np.testing.assert_allclose(arnoldi.ihvp(gradients[:5]).numpy(), expected, atol=1e-3 * np.abs(expected).max())
    np.testing.assert_allclose(arnoldi.hvp(gradients[:5]).numpy(), gradients[:5] @ damped, rtol=1e-4, atol=1e-5)


def test_arnoldi_iteration_on_a_matrix_with_repeated_eigenvalues_restarts():
    """A diagonal operator with 3 distinct eigenvalues: the Krylov space is invariant after 3 steps
    and the iteration must restart to produce an orthonormal basis with W H Wᵀ = A."""
    diagonal = np.array([5.0, 5.0, 5.0, 2.0, 2.0, 0.5, 0.5, 0.5], dtype=np.float64)
    matrix = tf.constant(np.diag(diagonal))
    start = tf.constant(np.random.default_rng(0).standard_normal(8))
    basis, projected = arnoldi_iteration(lambda v: tf.matmul(v, matrix), start, 8)
    basis = basis.numpy()
    np.testing.assert_allclose(basis @ basis.T, np.eye(8), atol=1e-10)
    np.testing.assert_allclose(basis @ np.diag(diagonal) @ basis.T, np.triu(projected, -1), atol=1e-10)
    ritz_values = np.linalg.eigvalsh(0.5 * (projected + projected.T))
    np.testing.assert_allclose(np.sort(ritz_values), np.sort(diagonal), atol=1e-10)


@pytest.mark.parametrize("force_hermitian", [True, False])
def test_top_eigenpairs_keep_largest_magnitude_and_reconstruct(force_hermitian):
    """Known spectrum with a negative eigenvalue: the kept pairs are the largest |λ| and A = Y Λ Y⁻¹."""
    rng = np.random.default_rng(2)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    spectrum = np.array([4.0, -3.0, 2.0, 0.5, 0.1, -0.01])
    matrix = rotation @ np.diag(spectrum) @ rotation.T
    eigenvalues, eigenvectors, dual = top_eigenpairs(matrix, 6, force_hermitian)
    np.testing.assert_allclose(eigenvectors @ np.diag(eigenvalues) @ dual, matrix, atol=1e-12)
    eigenvalues, eigenvectors, dual = top_eigenpairs(matrix, 3, force_hermitian)
    np.testing.assert_allclose(eigenvalues, [4.0, -3.0, 2.0], atol=1e-12)
    kept = rotation[:, :3]
    expected = kept @ np.diag(1 / spectrum[:3]) @ kept.T
    np.testing.assert_allclose(eigenvectors @ np.diag(1 / eigenvalues) @ dual, expected, atol=1e-12)


def test_singular_hessian_uses_pseudo_inverse():
    """Without L2 the softmax Hessian is singular: the full-subspace Arnoldi IHVP is the pseudo-inverse."""
    influence_model, dataset, x, y = _softmax_problem(l2=0.0)
    hessian, gradients = _numpy_hessian_and_gradients(influence_model, x, y, l2=0.0)
    arnoldi = ArnoldiIHVP(influence_model, dataset, subspace_dim=21, damping=0.0, dtype=tf.float64, show_progress=False)
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    kept = eigenvalues > 1e-6 * eigenvalues.max()
    pinv = (eigenvectors[:, kept] / eigenvalues[kept]) @ eigenvectors[:, kept].T
    expected = gradients[:5] @ pinv
    np.testing.assert_allclose(arnoldi.ihvp(gradients[:5]).numpy(), expected, atol=5e-3 * np.abs(expected).max())
    assert arnoldi.eigenvalues.shape[0] == int(kept.sum())


def test_factory_and_string_build_arnoldi(softmax):
    influence_model, dataset, _, _ = softmax
    assert IHVPCalculator.from_string("Arnoldi") is IHVPCalculator.Arnoldi
    from_string = make_ihvp("arnoldi", influence_model, dataset, show_progress=False)
    assert isinstance(from_string, ArnoldiIHVP)
    assert from_string.subspace_dim == 21 and from_string.k_largest_eig_vals == 21
    factory = ArnoldiIHVPFactory(subspace_dim=10, k_largest_eig_vals=4, show_progress=False)
    built = make_ihvp(factory, influence_model, dataset)
    assert built.subspace_dim == 10 and built.eigenvalues.shape == (4,)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"subspace_dim": 0}, ValueError),
        ({"subspace_dim": 22}, ValueError),
        ({"subspace_dim": 2.5}, ValueError),
        ({"subspace_dim": 5, "k_largest_eig_vals": 6}, ValueError),
        ({"subspace_dim": 5, "damping": -1.0}, ValueError),
        ({"subspace_dim": 5, "dtype": tf.int32}, TypeError),
    ],
)
def test_bad_arguments_raise_clear_errors(softmax, kwargs, error):
    influence_model, dataset, _, _ = softmax
    with pytest.raises(error):
        ArnoldiIHVP(influence_model, dataset, show_progress=False, **kwargs)


def test_zero_hessian_raises_singular_error():
    influence_model, dataset, x, y = _softmax_problem(l2=0.0)
    for weight in influence_model.weights:
        weight.assign(tf.zeros_like(weight))
    flat = dataset.map(lambda inputs, targets: (inputs * 0.0, targets))
    constant_model = InfluenceModel(
        influence_model.model, loss_function=lambda y_true, y_pred: tf.reduce_sum(y_true * 0.0, axis=1)
    )
    with pytest.raises(SingularHessianError):
        ArnoldiIHVP(constant_model, flat, subspace_dim=3, damping=0.0, show_progress=False)


def test_wrong_vector_shape_raises(softmax):
    influence_model, dataset, _, _ = softmax
    arnoldi = ArnoldiIHVP(influence_model, dataset, subspace_dim=5, show_progress=False)
    with pytest.raises(ValueError, match="watched parameter"):
        arnoldi.ihvp(np.ones((2, 7), dtype=np.float32))
