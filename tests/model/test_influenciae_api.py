"""The attributes Influenciae code reads from an InfluenceModel: ``layers`` (every layer), ``weights``
(the Keras variables), ``weights_to_watch`` / ``BaseInfluenceModel``; per-sample gradients of an
explicit weight subset against one-sample tapes."""
import keras
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

import influence_lib as il


def _mlp():
    rng = np.random.default_rng(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dropout(0.1),
                              keras.layers.Dense(3, activation="softmax")])
    model.set_weights([rng.normal(scale=0.6, size=w.shape).astype(np.float32) for w in model.weights])
    x = rng.normal(size=(6, 4)).astype(np.float32)
    return model, x, np.eye(3, dtype=np.float32)[rng.integers(0, 3, 6)]


def test_layers_are_all_the_models_layers_and_weights_are_its_keras_variables():
    model, _, _ = _mlp()
    influence_model = il.InfluenceModel(model)
    assert influence_model.layers == model.layers
    assert influence_model.watched_layers == [model.layers[-1]]
    assert influence_model.weights == model.layers[-1].weights
    assert all(isinstance(w, keras.Variable) for w in influence_model.weights)
    assert [v.ref() for v in influence_model.tf_variables] == [w.value.ref() for w in model.layers[-1].weights]
    assert influence_model.nb_params == 5 * 3 + 3


@pytest.mark.parametrize("mode", ["auto", "jacobian"])
def test_weights_to_watch_selects_exactly_those_weights(mode):
    model, x, y = _mlp()
    hidden, head = model.layers[0], model.layers[-1]
    watched = [head.kernel, hidden.bias]
    influence_model = il.InfluenceModel(model, weights_to_watch=watched, per_sample_gradients=mode)
    assert influence_model.weights == [hidden.bias, head.kernel]
    assert influence_model.watched_layers == [hidden, head]
    jacobian = influence_model.batch_jacobian_tensor((x, y)).numpy()
    if mode == "auto":
        assert influence_model.fallback_reason is None
    expected = rm.one_sample_gradients(model, [hidden.bias.value, head.kernel.value], x, y)
    np.testing.assert_allclose(jacobian, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        influence_model.batch_gradient_norm_sq_tensor((x, y)).numpy(), (expected**2).sum(1), rtol=1e-5
    )


def test_base_influence_model_takes_nested_lists_and_defaults_to_every_trainable_weight():
    model, x, y = _mlp()
    nested = il.BaseInfluenceModel(model, [layer.weights for layer in model.layers[-2:]])
    assert nested.weights == model.layers[-1].weights
    everything = il.BaseInfluenceModel(model)
    assert everything.weights == model.trainable_weights
    expected = rm.one_sample_gradients(model, [w.value for w in model.trainable_weights], x, y)
    np.testing.assert_allclose(everything.batch_jacobian_tensor((x, y)).numpy(), expected, rtol=1e-5, atol=1e-6)


def test_weights_to_watch_errors():
    model, _, _ = _mlp()
    other, _, _ = _mlp()
    with pytest.raises(ValueError, match="not in the model"):
        il.InfluenceModel(model, weights_to_watch=[other.layers[0].kernel])
    with pytest.raises(ValueError, match="either weights_to_watch or start_layer"):
        il.InfluenceModel(model, start_layer=0, weights_to_watch=[model.layers[0].kernel])
    with pytest.raises(ValueError, match="empty"):
        il.InfluenceModel(model, weights_to_watch=[])
    with pytest.raises(TypeError, match="variables"):
        il.InfluenceModel(model, weights_to_watch=[np.zeros(3)])
