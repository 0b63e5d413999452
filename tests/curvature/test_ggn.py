"""Generalized Gauss-Newton products against explicit ``Jᵀ H_out J`` built in float64 NumPy.

Ground truths: the analytic jacobian of a tiny tanh MLP's logits and the softmax / MSE output
Hessians in NumPy; for a linear model the exact Hessian (second derivatives), which the GGN equals.
"""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il
from influence_lib.curvature.hessian import HessianOperator, resolve_curvature


def _mlp(seed=0, activation="softmax", outputs=3):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((4,)),
        keras.layers.Dense(5, activation="tanh"),
        keras.layers.Dense(outputs, activation=activation),
    ])


def _numpy_ggn(jacobians, output_hessians, sample_weight):
    return np.einsum("n,ncp,ncd,ndq->pq", sample_weight, jacobians, output_hessians, jacobians) / len(jacobians)


@pytest.mark.parametrize("loss_name", ["cce_probabilities", "sparse_logits", "mse"])
def test_ggn_products_equal_explicit_jacobian_products(loss_name):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 4)).astype(np.float32)
    labels = rng.integers(0, 3, 10)
    sample_weight = rng.uniform(0.5, 2.0, 10).astype(np.float32)
    if loss_name == "cce_probabilities":
        model, loss, targets = _mlp(), keras.losses.CategoricalCrossentropy(reduction=None), np.eye(3)[labels]
    elif loss_name == "sparse_logits":
        model = _mlp(activation=None)
        loss, targets = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), labels
    else:
        model, loss = _mlp(activation=None), keras.losses.MeanSquaredError(reduction=None)
        targets = rng.normal(size=(10, 3)).astype(np.float32)
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=-1, loss_function=loss)
    dataset = tf.data.Dataset.from_tensor_slices((x, targets.astype(np.float32), sample_weight)).batch(4)

    jacobians, logits = rm.tanh_mlp_logit_jacobians(model, x)
    if loss_name == "mse":
        output_hessians = np.broadcast_to(2.0 / 3 * np.eye(3), (10, 3, 3))
    else:
        p = rm.softmax(logits)
        output_hessians = np.einsum("nc,cd->ncd", p, np.eye(3)) - np.einsum("nc,nd->ncd", p, p)
    expected = _numpy_ggn(jacobians, output_hessians, sample_weight)

    vectors = rng.normal(size=(6, influence_model.nb_params))
    products = HessianOperator(influence_model, dataset, curvature="ggn").matmat(vectors.astype(np.float32))
    np.testing.assert_allclose(products.numpy(), vectors @ expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert np.linalg.eigvalsh(expected).min() > -1e-10  # the reference is PSD; the true Hessian is not
    dense = HessianOperator(influence_model, dataset, curvature="ggn").dense().numpy()
    np.testing.assert_allclose(dense, expected, atol=1e-5 * np.abs(expected).max())


def test_ggn_equals_hessian_for_a_linear_model():
    model, dataset, x, _ = rm.softmax_regression()
    influence_model = il.InfluenceModel(model)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    expected = rm.softmax_hessian(x, kernel, bias)
    ggn = HessianOperator(influence_model, dataset, curvature="ggn").dense().numpy()
    np.testing.assert_allclose(ggn, expected, atol=1e-6)
    assert resolve_curvature(influence_model, "auto") == "ggn"


def test_non_convex_loss_blocks_are_projected_to_psd():
    """A loss concave in the output (−‖z − y‖²) has a zero GGN after the projection."""
    model = _mlp(activation=None)
    influence_model = il.InfluenceModel(
        model, start_layer=0, last_layer=-1, loss_function=lambda y, z: -tf.reduce_sum(tf.square(z - y), axis=-1)
    )
    rng = np.random.default_rng(1)
    dataset = tf.data.Dataset.from_tensor_slices(
        (rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 3)).astype(np.float32))
    ).batch(3)
    products = HessianOperator(influence_model, dataset, curvature="ggn").matmat(
        rng.normal(size=(2, influence_model.nb_params)).astype(np.float32)
    )
    np.testing.assert_allclose(products.numpy(), 0.0, atol=1e-6)


def test_curvature_option_is_checked():
    model, dataset, _, _ = rm.softmax_regression()
    with pytest.raises(ValueError, match="curvature must be one of"):
        HessianOperator(il.InfluenceModel(model), dataset, curvature="fisher")
