"""Default damping, cut-offs, LiSSA scale, CG with Gauss-Newton and preconditioning, memory refusal.

Ground truths: float64 NumPy on matrices with a known spectrum, explicit ``Jᵀ H_out J`` of a tiny
MLP (its analytic jacobian), ``tf.linalg.pinv`` for Influenciae's cut-off, and NumPy solves.
"""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.common import memory
from influence_lib.curvature.hessian import HessianOperator
from influence_lib.curvature.spectrum import hutchinson_mean_eigenvalue


def _known_spectrum(eigenvalues, seed=0):
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))[0]
    return (rotation * eigenvalues) @ rotation.T


def _regression_model(n_features=4, outputs=3):
    model = keras.Sequential([keras.Input((n_features,)), keras.layers.Dense(outputs)])
    return il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))


def test_exact_auto_damping_is_a_tenth_of_the_mean_eigenvalue():
    influence_model = _regression_model()  # P = 15
    eigenvalues = np.logspace(1, -9, 15)
    hessian = _known_spectrum(eigenvalues)
    exact = il.ExactIHVP(influence_model, train_hessian=hessian)
    assert exact.damping == pytest.approx(0.1 * eigenvalues.mean(), rel=1e-6)
    vectors = np.random.default_rng(1).normal(size=(4, 15))
    expected = np.linalg.solve(hessian + 0.1 * eigenvalues.mean() * np.eye(15), vectors.T).T
    np.testing.assert_allclose(exact.ihvp(vectors.astype(np.float32)).numpy(), expected, rtol=1e-4, atol=1e-6)


def test_exact_zero_damping_keeps_influenciae_pinv_cutoff():
    """``damping=0`` is ``tf.linalg.pinv`` of a float32 matrix: eigenvalues below 10·P·ε₃₂·λ_max are dropped."""
    influence_model = _regression_model(n_features=39, outputs=10)  # P = 400
    eigenvalues = np.logspace(0, -8, 400)
    hessian = _known_spectrum(eigenvalues)
    exact = il.ExactIHVP(influence_model, train_hessian=hessian, damping=0.0)
    cutoff = 10 * 400 * np.finfo(np.float32).eps
    kept = eigenvalues > cutoff
    assert 0 < kept.sum() < 400
    np.testing.assert_allclose(np.linalg.matrix_rank(exact.inv_hessian.numpy().astype(np.float64), tol=1e-3), kept.sum())
    pinv = np.linalg.pinv(hessian, rcond=cutoff, hermitian=True)
    np.testing.assert_allclose(exact.inv_hessian.numpy(), pinv, rtol=1e-3, atol=1e-3 * np.abs(pinv).max())


def test_hutchinson_mean_eigenvalue_is_within_its_error_bound():
    eigenvalues = np.linspace(0.1, 2.0, 300)
    matrix = tf.constant(_known_spectrum(eigenvalues))
    estimate = hutchinson_mean_eigenvalue(lambda v: tf.matmul(v, matrix), 300, tf.float64, probes=32)
    bound = 3 * np.sqrt(2 / 32) * np.linalg.norm(eigenvalues) / eigenvalues.sum()
    assert abs(estimate / eigenvalues.mean() - 1) < bound


def test_iterative_auto_damping_uses_the_estimated_mean_eigenvalue():
    model, dataset, x, _ = rm.linear_regression()
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    mean_eigenvalue = np.trace(rm.mse_hessian(x, outputs=2)) / influence_model.nb_params
    for calculator in (il.ConjugateGradientDescentIHVP(influence_model, dataset), il.LissaIHVP(influence_model, dataset)):
        assert calculator.curvature == "ggn"
        assert calculator.damping == pytest.approx(0.1 * mean_eigenvalue, rel=0.5)


def _indefinite_mlp_problem(n=40):
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)])
    for weight in model.weights:
        weight.assign(2.0 * weight.numpy())
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (3.0 * rng.normal(size=(n, 2))).astype(np.float32)
    influence_model = il.InfluenceModel(
        model, start_layer=0, last_layer=-1, loss_function=keras.losses.MeanSquaredError(reduction=None)
    )
    return influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16), model, x, y


def test_cg_with_gauss_newton_converges_without_damping_where_the_hessian_is_indefinite():
    influence_model, dataset, model, x, y = _indefinite_mlp_problem()
    hessian = HessianOperator(influence_model, dataset, curvature="hessian").dense().numpy()
    assert np.linalg.eigvalsh(hessian).min() < -1e-2 * np.linalg.eigvalsh(hessian).max()
    jacobians, _ = rm.tanh_mlp_logit_jacobians(model, x)
    ggn = np.einsum("ncp,nc,ncq->pq", jacobians, np.ones((len(x), 2)), jacobians) / len(x)  # H_out = (2/2)·I
    assert np.linalg.eigvalsh(ggn).min() > 0
    vectors = influence_model.batch_jacobian_tensor((x[:5], y[:5])).numpy()
    cg = il.ConjugateGradientDescentIHVP(influence_model, dataset, damping=0.0, n_opt_iters=400, tolerance=1e-6)
    assert cg.curvature == "ggn"
    expected = np.linalg.solve(ggn, vectors.T.astype(np.float64)).T
    np.testing.assert_allclose(cg.ihvp(vectors).numpy(), expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
    with pytest.raises(il.SingularHessianError, match="curvature='ggn'"):
        il.ConjugateGradientDescentIHVP(
            influence_model, dataset, damping=0.0, n_opt_iters=400, curvature="hessian"
        ).ihvp(vectors)


def test_diagonal_preconditioner_gives_the_same_solution_in_fewer_iterations():
    influence_model, dataset, model, x, y = _indefinite_mlp_problem()
    jacobians, _ = rm.tanh_mlp_logit_jacobians(model, x)
    ggn = np.einsum("ncp,ncq->pq", jacobians, jacobians) / len(x)
    vectors = influence_model.batch_jacobian_tensor((x[:5], y[:5])).numpy()
    expected = np.linalg.solve(ggn + 1e-3 * np.eye(len(ggn)), vectors.T.astype(np.float64)).T
    iterations = {}
    for preconditioner in (None, "diagonal"):
        cg = il.ConjugateGradientDescentIHVP(
            influence_model, dataset, damping=1e-3, n_opt_iters=400, tolerance=1e-6, preconditioner=preconditioner
        )
        counted = []
        original = cg.hvp
        cg.hvp = lambda v, original=original, counted=counted: counted.append(1) or original(v)
        result = cg.ihvp(vectors).numpy()
        iterations[preconditioner] = len(counted)
        np.testing.assert_allclose(result, expected, rtol=1e-2, atol=1e-2 * np.abs(expected).max())
    fisher = np.mean(np.square(influence_model.batch_jacobian(dataset).numpy().astype(np.float64)), axis=0)
    np.testing.assert_allclose(cg.inverse_diagonal.numpy(), (fisher + 1e-3) ** -0.75, rtol=1e-4)
    assert iterations["diagonal"] < iterations[None]
    with pytest.raises(ValueError, match="preconditioner must be one of"):
        il.ConjugateGradientDescentIHVP(influence_model, dataset, preconditioner="ilu")


def _steep_regression():
    """MSE regression with λ_max ≈ 70 > 2 × 10: LiSSA with Influenciae's scale (10) diverges."""
    rng = np.random.default_rng(0)
    x = (6.0 * rng.normal(size=(48, 3)) + 2.0).astype(np.float32)
    y = rng.normal(size=(48, 2)).astype(np.float32)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    kernel, bias = [w.numpy() for w in influence_model.weights]
    return influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(16), x, rm.mse_gradients(x, y, kernel, bias)


def test_lissa_auto_scale_converges_where_the_old_default_diverged():
    influence_model, dataset, x, gradients = _steep_regression()
    hessian = rm.mse_hessian(x, outputs=2)
    assert np.linalg.eigvalsh(hessian).max() > 20
    with pytest.raises(il.NonFiniteError, match="diverged"):
        il.LissaIHVP(influence_model, dataset, damping=1e-3, scale=10.0).ihvp(gradients[:4])
    damping = 1.0
    lissa = il.LissaIHVP(influence_model, dataset, n_opt_iters=300, damping=damping)
    assert np.linalg.eigvalsh(hessian).max() / 2 < lissa.scale <= np.linalg.eigvalsh(hessian).max() + damping + 1e-3
    expected = np.linalg.solve(hessian + damping * np.eye(len(hessian)), gradients[:4].T).T
    np.testing.assert_allclose(
        lissa.ihvp(gradients[:4].astype(np.float32)).numpy(), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max()
    )


def test_full_dataset_lissa_matches_the_pseudo_inverse_and_beats_one_batch_lissa():
    model, dataset, x, y = rm.softmax_regression()
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    gradients = rm.softmax_gradients(x, y, kernel, bias)[:8]
    expected = gradients @ rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias))
    errors = {}
    for batches in (None, 1):
        lissa = il.LissaIHVP(influence_model, dataset, n_opt_iters=400, damping=0.0, batches_per_iteration=batches)
        result = lissa.ihvp(gradients.astype(np.float32)).numpy()
        errors[batches] = np.linalg.norm(result - expected) / np.linalg.norm(expected)
    assert errors[None] < 1e-2
    assert errors[1] > 5 * errors[None]
    with pytest.raises(ValueError, match="batches_per_iteration"):
        il.LissaIHVP(influence_model, dataset, batches_per_iteration=0)


def test_exact_refuses_a_dense_matrix_that_does_not_fit(monkeypatch):
    model = keras.Sequential([keras.Input((99,)), keras.layers.Dense(100)])  # P = 10,000: 3.2 GB at 32 B/entry
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    dataset = tf.data.Dataset.from_tensor_slices((np.zeros((4, 99), np.float32), np.zeros((4, 100), np.float32))).batch(2)
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 2**30)
    with pytest.raises(MemoryError, match=r"10000 × 10000.*3\.0 GiB.*1\.0 GiB.*'cgd'.*'arnoldi'.*'ekfac'"):
        il.ExactIHVP(influence_model, dataset)
    with pytest.raises(ValueError):
        memory.check_memory(2.0 * 2**30, "this", "that", available=2**30)
    memory.check_memory(0.5 * 2**30, "this", "that", available=2**30)

