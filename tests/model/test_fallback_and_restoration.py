"""Fallback to the vectorized jacobian, and the user's model left untouched by the recording.

Ground truth: ``tape.gradient`` of each sample's loss computed alone (loop over one-sample batches).
"""
import keras
import numpy as np
import pytest
import tensorflow as tf
from reference_math import one_sample_gradients

from influence_lib.model import InfluenceModel


def data(n=5, d=4, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]


class CallsItsLayers(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.head = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs):
        return self.head(self.hidden(inputs))


class ReadsKernelDirectly(keras.Model):
    """Uses the head's kernel without calling the head layer."""

    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(5, activation="tanh")
        self.head = keras.layers.Dense(3)
        self.head.build((None, 5))

    def call(self, inputs):
        return tf.nn.softmax(tf.matmul(self.hidden(inputs), self.head.kernel) + self.head.bias)


class TiedWeights(keras.Model):
    """Calls the head layer AND reuses its kernel elsewhere (weight tying)."""

    def __init__(self):
        super().__init__()
        self.head = keras.layers.Dense(4, activation="tanh")
        self.out = keras.layers.Dense(3, activation="softmax")

    def call(self, inputs):
        hidden = self.head(inputs)
        return self.out(hidden + 0.1 * tf.matmul(inputs, self.head.kernel))


class Scale(keras.layers.Layer):
    """A custom layer with a weight: no closed-form rule exists for it."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="random_normal")

    def call(self, inputs):
        return inputs * self.scale


def built(model, d=4):
    model(np.zeros((1, d), np.float32))
    return model


def test_subclassed_model_calling_its_layers_uses_the_closed_form():
    x, y = data()
    model = built(CallsItsLayers())
    influence_model = InfluenceModel(model, 0, 1)
    jacobian = influence_model.batch_jacobian_tensor((x, y))
    assert influence_model.fallback_reason is None
    expected = one_sample_gradients(model, influence_model.weights, x, y)
    np.testing.assert_allclose(jacobian, expected, atol=1e-5)


@pytest.mark.parametrize("model_class, reason", [(ReadsKernelDirectly, "not called"), (TiedWeights, "outside")])
def test_untraceable_subclassed_models_fall_back_correctly(model_class, reason):
    x, y = data()
    model = built(model_class())
    influence_model = InfluenceModel(model, 0, 1)
    jacobian = influence_model.batch_jacobian_tensor((x, y))
    assert reason in influence_model.fallback_reason
    expected = one_sample_gradients(model, influence_model.weights, x, y)
    np.testing.assert_allclose(jacobian, expected, atol=1e-5)
    np.testing.assert_allclose(
        influence_model.batch_gradient_dot_tensor((x, y), (x[:2], y[:2])), expected @ expected[:2].T, atol=1e-5
    )
    np.testing.assert_allclose(influence_model.batch_gradient_norm_sq_tensor((x, y)), (expected**2).sum(1), atol=1e-5)
    with pytest.raises(ValueError, match="cannot be recorded"):
        influence_model.batch_layer_io_tensor((x, y))


@pytest.mark.parametrize("unknown", [Scale, keras.layers.BatchNormalization, keras.layers.LayerNormalization])
def test_unknown_layers_fall_back_correctly(unknown):
    x, y = data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh"), unknown(),
                              keras.layers.Dense(3, activation="softmax")])
    influence_model = InfluenceModel(model, 0, 2)
    jacobian = influence_model.batch_jacobian_tensor((x, y))
    if unknown is Scale:
        assert "no closed-form rule" in influence_model.fallback_reason
    else:  # BatchNormalization and LayerNormalization have closed-form rules since issue 17
        assert influence_model.fallback_reason is None
    np.testing.assert_allclose(jacobian, one_sample_gradients(model, influence_model.weights, x, y), atol=1e-5)


def test_model_is_restored_after_use_and_on_error():
    x, y = data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="tanh"),
                              keras.layers.Dense(3, activation="softmax")])
    influence_model = InfluenceModel(model, 0, 1)
    before = model(x).numpy()
    influence_model.batch_jacobian_tensor((x, y))
    influence_model.batch_gradient_dot_tensor((x, y), (x, y))
    assert all("call" not in vars(layer) for layer in model.layers)

    def failing_loss(targets, outputs):
        raise RuntimeError("loss failed")

    failing = InfluenceModel(model, 0, 1, loss_function=failing_loss)
    with pytest.raises(RuntimeError, match="loss failed"):
        failing.batch_jacobian_tensor((x, y))
    assert all("call" not in vars(layer) for layer in model.layers)
    np.testing.assert_array_equal(model(x).numpy(), before)


def test_an_instance_level_call_override_is_preserved():
    x, y = data()
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    layer = model.layers[0]
    override = layer.call
    object.__setattr__(layer, "call", override)
    influence_model = InfluenceModel(model)
    influence_model.batch_jacobian_tensor((x, y))
    assert vars(layer)["call"] is override
    np.testing.assert_allclose(
        influence_model.batch_jacobian_tensor((x, y)), one_sample_gradients(model, influence_model.weights, x, y),
        atol=1e-5,
    )
