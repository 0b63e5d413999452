"""The registry entries that attribute through every layer: K-FAC, EK-FAC and CG on the Gauss-Newton matrix."""
import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il
from influence_lib.benchmark.factories import METHODS
from influence_lib.benchmark.training import MLPTrainingProcedure


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 30)]
    trained = MLPTrainingProcedure((5,), epochs=2, batch_size=10).train(x, y, x, y, seed=0)
    return trained, x, y


def _expected_attributions(trained, x, y, ihvp):
    """``τ(t, i) = −∇m(t)ᵀ C⁻¹ ∇ℓ(i)``: including training sample ``i`` moves the weights by
    ``−C⁻¹∇ℓ(i)`` (per unit weight), hence the margin ``m`` of test sample ``t`` by ``τ(t, i)``."""
    model = il.InfluenceModel(trained.model, start_layer=0, last_layer=-1)
    train_gradients = model.batch_jacobian_tensor((x, y))
    test_gradients = model.with_measurement("margin").batch_jacobian_tensor((x[:7], y[:7]))
    return -test_gradients.numpy().astype(np.float64) @ ihvp(model).ihvp(train_gradients).numpy().T.astype(np.float64)


@pytest.mark.parametrize("name, kind", [("first_order_kfac", il.KFACIHVP), ("first_order_ekfac", il.EKFACIHVP)])
def test_kronecker_entries_attribute_through_every_layer(tiny, name, kind):
    trained, x, y = tiny
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    test_set = tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(4)
    attributions = METHODS[name].attribute(trained, train_set, test_set, "margin")
    expected = _expected_attributions(
        trained, x, y, lambda model: kind(model, train_set, damping="heuristic", show_progress=False)
    )
    assert attributions.shape == (7, 30)
    np.testing.assert_allclose(attributions, expected, rtol=1e-3, atol=1e-5 * np.abs(expected).max())


def test_cg_all_layers_entry_solves_the_damped_gauss_newton_system(tiny):
    trained, x, y = tiny
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    test_set = tf.data.Dataset.from_tensor_slices((x[:7], y[:7])).batch(4)
    factory = METHODS["first_order_cg_all"]
    assert (factory.start_layer, factory.last_layer, factory.curvature) == (0, -1, "ggn")
    solver = factory.build(trained, train_set).ihvp_calculator
    assert solver.curvature == "ggn" and solver.damping > 0.0
    expected = _expected_attributions(
        trained, x, y, lambda model: il.ExactIHVP(model, train_set, damping=solver.damping, curvature="ggn", show_progress=False)
    )
    scale = np.abs(expected).max()
    attributions = factory.attribute(trained, train_set, test_set, "margin")
    np.testing.assert_allclose(attributions, expected, atol=0.05 * scale)
    converged = dataclasses.replace(factory, n_opt_iters=200).attribute(trained, train_set, test_set, "margin")
    np.testing.assert_allclose(converged, expected, rtol=1e-3, atol=1e-4 * scale)
