"""TracIn on subclassed models (from_callback with a model factory) and learning rates read from the optimizer."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib import InfluenceModel, TracIn, TracInCheckpoint, extract_only_values


class Net(keras.Model):
    """A subclassed model whose positional constructor argument keras.models.clone_model cannot copy."""

    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(hidden, activation="tanh")
        self.head = keras.layers.Dense(2, activation="softmax")

    def call(self, inputs):
        return self.head(self.hidden(inputs))


def _data(n=12):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return x, np.eye(2, dtype=np.float32)[(x[:, 0] > 0).astype(int)]


def _self_influence_by_hand(paths, rates, x, y):
    """Σ_c η_c ‖∇_head ℓ(z; θ_c)‖² from one GradientTape per sample and checkpoint."""
    total = np.zeros(len(x))
    for path, rate in zip(paths, rates):
        model = Net(4)
        model(x[:1])
        model.load_weights(path)
        for index in range(len(x)):
            with tf.GradientTape() as tape:
                probabilities = model(x[index : index + 1])
                loss = -tf.reduce_sum(y[index] * tf.math.log(probabilities))
            gradients = tape.gradient(loss, model.head.trainable_weights)
            total[index] += rate * sum(float(tf.reduce_sum(g**2)) for g in gradients)
    return total


def test_from_callback_on_a_subclassed_model(tmp_path):
    x, y = _data()
    model = Net(4)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    callback = TracInCheckpoint(str(tmp_path), every_n_epochs=1)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[callback])
    before = [w.numpy().copy() for w in model.weights]
    tracin = TracIn.from_callback(callback, model=lambda: Net(4), show_progress=False)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    values = extract_only_values(tracin.compute_influence_values(dataset)).numpy()
    expected = _self_influence_by_hand(callback.paths, callback.learning_rates, x, y)
    np.testing.assert_allclose(values, expected, rtol=1e-4)
    for weight, value in zip(model.weights, before):
        np.testing.assert_array_equal(weight.numpy(), value)


def test_learning_rate_from_the_optimizer(tmp_path):
    x, y = _data()
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.25), loss="categorical_crossentropy")
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    implicit = TracIn([InfluenceModel(model)], show_progress=False)
    assert implicit.learning_rates == [0.25]
    explicit = TracIn([InfluenceModel(model)], 0.25, show_progress=False)
    np.testing.assert_allclose(
        extract_only_values(implicit.compute_influence_values(dataset)).numpy(),
        extract_only_values(explicit.compute_influence_values(dataset)).numpy(),
    )
    path = str(tmp_path / "c.weights.h5")
    model.save_weights(path)
    assert TracIn.from_checkpoints(model, [path, path], show_progress=False).learning_rates == [0.25, 0.25]
    uncompiled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    with pytest.raises(ValueError, match="has no optimizer"):
        TracIn([InfluenceModel(uncompiled)])
    scheduled = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="softmax")])
    scheduled.compile(optimizer=keras.optimizers.SGD(keras.optimizers.schedules.ExponentialDecay(0.1, 2, 0.5)))
    with pytest.raises(ValueError, match="follows a schedule"):
        TracIn([InfluenceModel(scheduled)])
