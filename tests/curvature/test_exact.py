"""ExactIHVP against float64 NumPy closed forms on tiny models."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il


def _softmax_setup():
    model, dataset, x, y = rm.softmax_regression()
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    return influence_model, dataset, x, y, kernel, bias


def test_hessian_matches_closed_form_softmax():
    influence_model, dataset, x, _, kernel, bias = _softmax_setup()
    ihvp = il.ExactIHVP(influence_model, dataset, show_progress=False)
    np.testing.assert_allclose(ihvp.hessian.numpy(), rm.softmax_hessian(x, kernel, bias), atol=1e-6)


def test_pseudo_inverse_on_singular_softmax_hessian():
    influence_model, dataset, x, y, kernel, bias = _softmax_setup()
    ihvp = il.ExactIHVP(influence_model, dataset, damping=0.0, show_progress=False)
    gradients = rm.softmax_gradients(x, y, kernel, bias)
    expected = gradients @ rm.pseudo_inverse(rm.softmax_hessian(x, kernel, bias))
    result = ihvp.ihvp(gradients.astype(np.float32)).numpy()
    np.testing.assert_allclose(result, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())


def test_damped_solve_and_hvp_are_inverse_of_each_other():
    influence_model, dataset, x, y, kernel, bias = _softmax_setup()
    damping = 0.05
    ihvp = il.ExactIHVP(influence_model, dataset, damping=damping, show_progress=False)
    hessian = rm.softmax_hessian(x, kernel, bias) + damping * np.eye(influence_model.nb_params)
    vectors = np.random.default_rng(1).normal(size=(7, influence_model.nb_params))
    np.testing.assert_allclose(ihvp.ihvp(vectors).numpy(), np.linalg.solve(hessian, vectors.T).T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ihvp.hvp(vectors).numpy(), vectors @ hessian, rtol=1e-5, atol=1e-5)


def test_precomputed_hessian_and_influenciae_layout():
    model, dataset, x, y = rm.linear_regression()
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    kernel, bias = [w.numpy() for w in influence_model.weights]
    hessian = rm.mse_hessian(x, outputs=2)
    ihvp = il.ExactIHVP(influence_model, train_hessian=hessian.astype(np.float32), damping=0.0)
    per_batch = list(ihvp.compute_ihvp(dataset))
    assert per_batch[0].shape == (influence_model.nb_params, 16)
    result = np.concatenate([batch.numpy() for batch in per_batch], axis=1)
    expected = np.linalg.solve(hessian, rm.mse_gradients(x, y, kernel, bias).T)
    np.testing.assert_allclose(result, expected, rtol=1e-3, atol=1e-4)
    hvps = np.concatenate([b.numpy() for b in ihvp.compute_hvp(dataset)], axis=1)
    np.testing.assert_allclose(hvps, hessian @ rm.mse_gradients(x, y, kernel, bias).T, rtol=1e-4, atol=1e-4)


def test_hessian_over_two_layers_matches_finite_differences_of_gradients():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(20, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 20)]
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax")])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=-1)
    hessian = il.HessianOperator(influence_model, dataset).dense().numpy()
    # Central differences of the mean gradient, in float64 via NumPy on the flattened weights.
    original = [w.numpy() for w in influence_model.weights]
    flat = np.concatenate([w.ravel() for w in original]).astype(np.float64)

    def mean_gradient(theta):
        offset = 0
        for weight, value in zip(influence_model.weights, original):
            weight.assign(theta[offset : offset + value.size].reshape(value.shape).astype(np.float32))
            offset += value.size
        return np.mean(influence_model.batch_jacobian(dataset).numpy().astype(np.float64), axis=0)

    step = 1e-2
    columns = []
    try:
        for index in range(flat.size):
            shift = np.zeros_like(flat)
            shift[index] = step
            columns.append((mean_gradient(flat + shift) - mean_gradient(flat - shift)) / (2 * step))
    finally:
        for weight, value in zip(influence_model.weights, original):
            weight.assign(value)
    finite_differences = np.stack(columns, axis=1)
    np.testing.assert_allclose(hessian, 0.5 * (finite_differences + finite_differences.T), atol=2e-3)


def test_damped_indefinite_singular_matrix_raises():
    model, dataset, _, _ = rm.linear_regression()
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    size = influence_model.nb_params
    indefinite = -0.1 * np.eye(size, dtype=np.float32)
    with pytest.raises(il.SingularHessianError, match="Increase damping"):
        il.ExactIHVP(influence_model, train_hessian=indefinite, damping=0.1)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({}, "exactly one"),
        ({"train_hessian": np.eye(3, dtype=np.float32)}, "must have shape"),
        ({"train_hessian": np.full((12, 12), np.nan, dtype=np.float32)}, "NaN"),
    ],
)
def test_bad_arguments(kwargs, error):
    model, _, _, _ = rm.linear_regression()
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    with pytest.raises((ValueError, FloatingPointError), match=error):
        il.ExactIHVP(influence_model, **kwargs)


def test_vectors_of_wrong_size_are_rejected():
    influence_model, dataset, *_ = _softmax_setup()
    ihvp = il.ExactIHVP(influence_model, dataset, show_progress=False)
    with pytest.raises(ValueError, match="one entry per watched parameter"):
        ihvp.ihvp(np.zeros((2, influence_model.nb_params + 1), np.float32))
    with pytest.raises(ValueError, match="damping"):
        il.ExactIHVP(influence_model, dataset, damping=-1.0, show_progress=False)


def test_small_damping_on_a_singular_hessian_is_a_plain_damped_solve():
    influence_model, dataset, x, y, kernel, bias = _softmax_setup()
    damping = 1e-4
    ihvp = il.ExactIHVP(influence_model, dataset, damping=damping, show_progress=False)
    gradients = rm.softmax_gradients(x, y, kernel, bias)
    hessian = rm.softmax_hessian(x, kernel, bias) + damping * np.eye(influence_model.nb_params)
    expected = np.linalg.solve(hessian, gradients.T).T
    np.testing.assert_allclose(ihvp.ihvp(gradients).numpy(), expected, rtol=1e-2, atol=1e-3 * np.abs(expected).max())
