"""``damping='auto'`` reads the training run of a model's SGD optimizer when the whole model is watched.

Ground truth: the NumPy float64 Hessian of a softmax regression (its mean eigenvalue) and the
early-stopping ridge ``(1 − β)/(η T)`` from the optimizer's own settings and step count.
"""
import keras
import numpy as np
import pytest

import influence_lib as il
from influence_lib.curvature.spectrum import recorded_training_damping
from tests.reference_math import softmax_hessian, softmax_regression


def _trained(optimizer, epochs=3):
    model, dataset, x, y = softmax_regression(n=64, d=4, c=3, batch_size=16)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, shuffle=False)
    return model, dataset, x


def _spectral(model, x):
    kernel, bias = (w.numpy().astype(np.float64) for w in model.layers[-1].weights)
    hessian = softmax_hessian(x, kernel, bias)
    return 0.1 * np.trace(hessian) / len(hessian)


def test_auto_damping_of_an_sgd_trained_whole_model_is_the_early_stopping_ridge():
    model, dataset, x = _trained(keras.optimizers.SGD(0.05, momentum=0.5), epochs=3)
    ridge = (1 - 0.5) / (0.05 * 3 * 4)  # 3 epochs of 4 batches
    assert ridge > _spectral(model, x)
    influence_model = il.InfluenceModel(model, start_layer=0)
    assert recorded_training_damping(influence_model) == pytest.approx(ridge)
    exact = il.ExactIHVP(influence_model, dataset)
    assert exact.damping == pytest.approx(ridge, rel=1e-6)
    cg = il.ConjugateGradientDescentIHVP(influence_model, dataset)
    assert cg.damping == pytest.approx(ridge, rel=1e-6)
    explicit = il.ExactIHVP(influence_model, dataset, damping=0.01)
    assert explicit.damping == 0.01


def test_auto_damping_keeps_the_spectral_rule_when_the_training_run_does_not_apply():
    long_run, dataset, x = _trained(keras.optimizers.SGD(0.5), epochs=200)
    assert 1 / (0.5 * 200 * 4) < _spectral(long_run, x)
    assert il.ExactIHVP(il.InfluenceModel(long_run, start_layer=0), dataset).damping == pytest.approx(
        _spectral(long_run, x), rel=1e-5
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(0.05, 4, 0.5)
    for optimizer in (keras.optimizers.Adam(0.05), keras.optimizers.SGD(schedule)):
        model, dataset, x = _trained(optimizer)
        influence_model = il.InfluenceModel(model, start_layer=0)
        assert recorded_training_damping(influence_model) is None
        assert il.ExactIHVP(influence_model, dataset).damping == pytest.approx(_spectral(model, x), rel=1e-5)
    untrained = softmax_regression()[0]
    untrained.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
    assert recorded_training_damping(il.InfluenceModel(untrained, start_layer=0)) is None


def test_a_layer_watched_alone_gets_the_spectral_rule():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3, activation="softmax")]
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), np.eye(3, dtype="float32")[rng.integers(0, 3, 32)]
    model.fit(x, y, batch_size=16, epochs=2, verbose=0)
    assert recorded_training_damping(il.InfluenceModel(model)) is None
    whole = il.InfluenceModel(model, start_layer=0, last_layer=-1)
    assert recorded_training_damping(whole) == pytest.approx(1 / (0.05 * 4))
