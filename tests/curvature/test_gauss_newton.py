"""Closed-form Gauss-Newton Hessian of a last Dense layer under softmax cross-entropy.

Ground truths: an independent float64 NumPy loop over samples of
``w_i (ã ãᵀ) ⊗ (diag p − p pᵀ)``, and the exact Hessian from second derivatives
(:class:`HessianOperator`), which it must equal since the logits are linear in the weights.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.curvature.exact import ExactIHVP
from influence_lib.curvature.hessian import HessianOperator, closed_form_refusal, gauss_newton_hessian
from influence_lib.model import InfluenceModel

CCE = keras.losses.CategoricalCrossentropy(reduction=None)


def mlp(classes=3, activation="softmax", use_bias=True):
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"),
                             keras.layers.Dense(classes, activation=activation, use_bias=use_bias)])


def numpy_gauss_newton(features, logits, sample_weight):
    """(1/n) Σ_i w_i (ã_i ã_iᵀ) ⊗ (diag p_i − p_i p_iᵀ) in float64, one sample at a time."""
    total = 0.0
    for a, z, w in zip(features.astype(np.float64), logits.astype(np.float64), sample_weight):
        p = np.exp(z - z.max())
        p /= p.sum()
        total = total + w * np.kron(np.outer(a, a), np.diag(p) - np.outer(p, p))
    return total / len(features)


def hidden_and_logits(model, x):
    hidden = model.layers[0](x).numpy().astype(np.float64)
    kernel, *bias = [w.astype(np.float64) for w in model.layers[1].get_weights()]
    return hidden, hidden @ kernel + (bias[0] if bias else 0.0)


@pytest.mark.parametrize("use_bias, frozen_bias", [(True, False), (True, True), (False, False)])
def test_softmax_head_with_sample_weights(use_bias, frozen_bias):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(11, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 11)]
    sample_weight = rng.uniform(0.2, 2.0, 11).astype(np.float32)
    model = mlp(use_bias=use_bias)
    if frozen_bias:
        model.layers[1].bias.trainable = False
    influence_model = InfluenceModel(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, sample_weight)).batch(4)
    gauss_newton = gauss_newton_hessian(influence_model, dataset).numpy()

    hidden, logits = hidden_and_logits(model, x)
    features = np.concatenate([hidden, np.ones((11, 1))], axis=1) if use_bias and not frozen_bias else hidden
    expected = numpy_gauss_newton(features, logits, sample_weight)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(gauss_newton, expected, atol=1e-5 * scale)
    np.testing.assert_allclose(gauss_newton, HessianOperator(influence_model, dataset).dense(), atol=1e-5 * scale)


def test_sparse_logits_on_sequences_with_label_smoothing_equivalent():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(7, 3, 4)).astype(np.float32)
    targets = rng.integers(0, 3, (7, 3))
    model = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(3)])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    influence_model = InfluenceModel(model, loss_function=loss)
    dataset = tf.data.Dataset.from_tensor_slices((x, targets)).batch(3)
    gauss_newton = gauss_newton_hessian(influence_model, dataset).numpy()
    np.testing.assert_allclose(gauss_newton, HessianOperator(influence_model, dataset).dense(), atol=1e-6)

    kernel, bias = [w.astype(np.float64) for w in model.layers[0].get_weights()]
    flat = x.reshape(-1, 4).astype(np.float64)
    features = np.concatenate([flat, np.ones((len(flat), 1))], axis=1)
    expected = numpy_gauss_newton(features, flat @ kernel + bias, np.full(len(flat), 1.0 / 3)) * len(flat) / 7
    np.testing.assert_allclose(gauss_newton, expected, atol=1e-6)

    smoothed = InfluenceModel(
        model, loss_function=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2, reduction=None)
    )
    one_hot = tf.data.Dataset.from_tensor_slices((x, np.eye(3, dtype=np.float32)[targets])).batch(3)
    np.testing.assert_allclose(gauss_newton_hessian(smoothed, one_hot), gauss_newton, atol=1e-6)


def test_exact_ihvp_uses_the_closed_form_where_it_is_exact():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 20)]
    influence_model = InfluenceModel(mlp())
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    assert closed_form_refusal(influence_model) is None
    exact = ExactIHVP(influence_model, dataset, damping=1e-2, show_progress=False, curvature="hessian")
    second_derivatives = HessianOperator(influence_model, dataset, curvature="hessian").dense().numpy()
    np.testing.assert_allclose(exact.hessian, second_derivatives, atol=1e-6)
    expected = np.linalg.inv(second_derivatives.astype(np.float64) + 1e-2 * np.eye(influence_model.nb_params))
    np.testing.assert_allclose(exact.inv_hessian, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["sigmoid", "binary_logits", "mse"])
def test_closed_form_for_sigmoid_cross_entropy_and_mse_equals_second_derivatives(case):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(9, 4)).astype(np.float32)
    if case == "mse":
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
        loss = keras.losses.MeanSquaredError(reduction=None)
        y = rng.normal(size=(9, 2)).astype(np.float32)
    else:
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="sigmoid" if case == "sigmoid" else None)])
        loss = keras.losses.BinaryCrossentropy(from_logits=case == "binary_logits", label_smoothing=0.1, reduction=None)
        y = rng.integers(0, 2, (9, 2)).astype(np.float32)
    sample_weight = rng.uniform(0.5, 2.0, 9).astype(np.float32)
    influence_model = InfluenceModel(model, loss_function=loss)
    dataset = tf.data.Dataset.from_tensor_slices((x, y, sample_weight)).batch(4)
    closed = gauss_newton_hessian(influence_model, dataset).numpy()
    np.testing.assert_allclose(closed, HessianOperator(influence_model, dataset, curvature="hessian").dense(), atol=1e-5)
    features = np.concatenate([x, np.ones((9, 1))], axis=1).astype(np.float64)
    if case == "mse":
        blocks = np.broadcast_to(np.eye(2), (9, 2, 2)) * 2.0 / 2
    else:
        kernel, bias = [w.astype(np.float64) for w in model.layers[0].get_weights()]
        p = 1.0 / (1.0 + np.exp(-(features[:, :4] @ kernel + bias)))
        blocks = np.einsum("nc,cd->ncd", p * (1 - p) / 2, np.eye(2))
    expected = sum(w * np.kron(np.outer(a, a), b) for w, a, b in zip(sample_weight, features, blocks)) / 9
    np.testing.assert_allclose(closed, expected, atol=1e-5)


def test_refuses_what_it_cannot_do_exactly():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    model = mlp()
    cases = {
        "watched layers": InfluenceModel(model, 0, 1),
        "needs 'linear'": InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None)),
        "not one of": InfluenceModel(model, loss_function=keras.losses.KLDivergence(reduction=None)),
        "not the layer producing": InfluenceModel(
            keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Activation("softmax")])
        ),
    }
    for message, influence_model in cases.items():
        with pytest.raises(ValueError, match=message):
            gauss_newton_hessian(influence_model, dataset)
    with pytest.raises(ValueError, match="from_logits=True"):
        InfluenceModel(model, loss_function=keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None))

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.head = keras.layers.Dense(3, activation="softmax")

        def call(self, inputs):
            return self.head(inputs)

    subclassed = Subclassed()
    subclassed(x)
    with pytest.raises(ValueError, match="cannot be identified"):
        gauss_newton_hessian(InfluenceModel(subclassed), dataset)


def test_earlier_hessian_argument_still_works():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(3)
    head = InfluenceModel(mlp())
    closed = ExactIHVP(head, dataset, damping=0.1, show_progress=False, hessian="gauss_newton")
    exact = ExactIHVP(head, dataset, damping=0.1, show_progress=False, hessian="exact")
    assert exact.curvature == "hessian"
    np.testing.assert_allclose(closed.hessian, HessianOperator(head, dataset, curvature="hessian").dense(), atol=1e-6)
    np.testing.assert_allclose(exact.hessian, closed.hessian, atol=1e-6)
    with pytest.raises(ValueError, match="hessian='gauss_newton'.*watched layers"):
        ExactIHVP(InfluenceModel(mlp(), 0, 1), dataset, show_progress=False, hessian="gauss_newton")
    with pytest.raises(ValueError, match="hessian must be"):
        ExactIHVP(head, dataset, hessian="gn")


def test_kronecker_sum_streams_rows_in_chunks():
    """Σ_r (f fᵀ) ⊗ B_r with a budget of 7 rows per product, fed in uneven pieces, equals NumPy's kron sum."""
    from influence_lib.curvature.hessian import _KroneckerSum

    rng = np.random.default_rng(6)
    features = rng.normal(size=(23, 4))
    factors = rng.normal(size=(23, 3, 3))
    blocks = factors @ np.transpose(factors, (0, 2, 1))
    accumulator = _KroneckerSum(4, 3, budget=7 * 4 * 3)
    for start, stop in [(0, 5), (5, 6), (6, 20), (20, 23)]:
        accumulator.add(tf.constant(features[start:stop]), tf.constant(blocks[start:stop]))
    expected = sum(np.kron(np.outer(f, f), b) for f, b in zip(features, blocks))
    np.testing.assert_allclose(accumulator.result(), expected, rtol=1e-12, atol=1e-12)
