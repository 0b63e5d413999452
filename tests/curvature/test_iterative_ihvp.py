"""Conjugate gradient and LiSSA IHVPs against float64 NumPy solves; their failure modes."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.curvature import batched_conjugate_gradient


def _regression(**kwargs):
    model, dataset, x, y = rm.linear_regression(**kwargs)
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    kernel, bias = [w.numpy() for w in influence_model.weights]
    return influence_model, dataset, x, y, rm.mse_gradients(x, y, kernel, bias)


def test_batched_conjugate_gradient_solves_every_right_hand_side():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(30, 30))
    matrix = basis @ basis.T + 0.5 * np.eye(30)
    rhs = rng.normal(size=(9, 30))
    rhs[4] = 0.0
    solution, converged = batched_conjugate_gradient(
        lambda v: tf.matmul(v, tf.constant(matrix)), tf.constant(rhs), tolerance=1e-10, max_iterations=200
    )
    assert bool(tf.reduce_all(converged))
    np.testing.assert_allclose(solution.numpy(), np.linalg.solve(matrix, rhs.T).T, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_cg_matches_numpy_solve_on_positive_definite_hessian(damping):
    influence_model, dataset, x, _, gradients = _regression()
    hessian = rm.mse_hessian(x, outputs=2) + damping * np.eye(influence_model.nb_params)
    cg = il.ConjugateGradientDescentIHVP(influence_model, dataset, damping=damping, tolerance=1e-6)
    result = cg.ihvp(gradients.astype(np.float32)).numpy()
    expected = np.linalg.solve(hessian, gradients.T).T
    np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    np.testing.assert_allclose(cg.hvp(gradients).numpy(), gradients @ hessian, rtol=1e-4, atol=1e-4)


def test_cg_on_singular_softmax_hessian_matches_pseudo_inverse():
    model, dataset, x, y = rm.softmax_regression()
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    gradients = rm.softmax_gradients(x, y, kernel, bias)
    expected = gradients @ rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias))
    cg = il.ConjugateGradientDescentIHVP(influence_model, dataset, n_opt_iters=200, damping=0.0, tolerance=1e-5)
    result = cg.ihvp(gradients.astype(np.float32)).numpy()
    np.testing.assert_allclose(result, expected, rtol=5e-3, atol=5e-3 * np.abs(expected).max())


def test_cg_singular_hessian_without_damping_raises_and_damping_fixes_it():
    influence_model, dataset, x, y, _ = _regression()
    # Feature 0 is zero in every Hessian sample: H is singular along the weights it multiplies.
    x_zeroed = x.copy()
    x_zeroed[:, 0] = 0.0
    hessian_data = tf.data.Dataset.from_tensor_slices((x_zeroed, y)).batch(16)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    gradients = rm.mse_gradients(x, y, kernel, bias).astype(np.float32)  # they do use feature 0
    with pytest.raises(il.SingularHessianError, match="damping"):
        il.ConjugateGradientDescentIHVP(influence_model, hessian_data, n_opt_iters=200, damping=0.0).ihvp(gradients)
    damped = il.ConjugateGradientDescentIHVP(influence_model, hessian_data, damping=0.1, n_opt_iters=200)
    expected = np.linalg.solve(rm.mse_hessian(x_zeroed, 2) + 0.1 * np.eye(12), gradients.T.astype(np.float64)).T
    np.testing.assert_allclose(damped.ihvp(gradients).numpy(), expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_cg_warns_when_not_converged():
    influence_model, dataset, _, _, gradients = _regression()
    cg = il.ConjugateGradientDescentIHVP(influence_model, dataset, n_opt_iters=1, tolerance=1e-8)
    with pytest.warns(RuntimeWarning, match="did not reach tolerance"):
        cg.ihvp(gradients[:3])


def test_lissa_converges_to_damped_inverse():
    influence_model, _, x, y, gradients = _regression(n=32)
    one_batch = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    damping = 0.1
    lissa = il.LissaIHVP(influence_model, one_batch, n_opt_iters=600, damping=damping, scale=12.0)
    expected = np.linalg.solve(rm.mse_hessian(x, 2) + damping * np.eye(12), gradients.T).T
    result = lissa.ihvp(gradients.astype(np.float32)).numpy()
    np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_lissa_stochastic_batches_average_to_the_full_hessian():
    influence_model, dataset, x, y, gradients = _regression(n=48)
    lissa = il.LissaIHVP(influence_model, dataset, n_opt_iters=900, damping=0.5, scale=12.0, batches_per_iteration=1)
    expected = np.linalg.solve(rm.mse_hessian(x, 2) + 0.5 * np.eye(12), gradients.T).T
    result = lissa.ihvp(gradients.astype(np.float32)).numpy()
    correlation = np.corrcoef(result.ravel(), expected.ravel())[0, 1]
    assert correlation > 0.98


def test_lissa_divergence_is_reported():
    influence_model, dataset, _, _, gradients = _regression()
    lissa = il.LissaIHVP(influence_model, dataset, n_opt_iters=300, damping=0.01, scale=0.05)
    with pytest.raises(il.NonFiniteError, match="raise `scale`"):
        lissa.ihvp(gradients[:4])


@pytest.mark.parametrize(
    "factory, kwargs, error",
    [
        (il.ConjugateGradientDescentIHVP, {"n_opt_iters": 0}, "n_opt_iters"),
        (il.ConjugateGradientDescentIHVP, {"tolerance": 2.0}, "tolerance"),
        (il.LissaIHVP, {"scale": 0.0}, "scale"),
        (il.LissaIHVP, {"damping": -1.0}, "damping"),
    ],
)
def test_bad_solver_settings(factory, kwargs, error):
    influence_model, dataset, *_ = _regression()
    with pytest.raises(ValueError, match=error):
        factory(influence_model, dataset, **kwargs)


def test_factory_resolves_names_enums_and_factories():
    influence_model, dataset, *_ = _regression()
    assert isinstance(il.IHVPCalculator.from_string("CGD").value(influence_model, dataset), il.ConjugateGradientDescentIHVP)
    assert isinstance(il.LissaIHVPFactory(damping=0.2).build(influence_model, dataset), il.LissaIHVP)
    assert il.ExactIHVPFactory(damping=0.2).build(influence_model, dataset).damping == 0.2
    with pytest.raises(ValueError, match="Unknown IHVP calculator"):
        il.IHVPCalculator.from_string("newton")
