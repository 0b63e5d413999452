"""TracIn from the checkpoints of a subclassed model Keras cannot copy, given as an instance (no factory).

Reference: the factory path (one fresh copy per checkpoint) and, for self-influence, float64-free
GradientTape sums by hand (test_tracin_real_models); the user's model and optimizer must be unchanged.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib import TracIn, TracInCheckpoint, extract_only_values
from influence_lib.influence.tracin_shared import SharedArchitectureTracIn


class Scale:
    """A constructor argument Keras cannot serialize (so neither clone_model nor get_config works)."""

    def __init__(self, factor):
        self.factor = factor


class ResidualNet(keras.Model):
    """Subclassed model with a custom call: a scaled residual tanh block, then a softmax head."""

    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
        self.scale = scale
        self.hidden = keras.layers.Dense(3, activation="tanh")
        self.head = keras.layers.Dense(2, activation="softmax")

    def call(self, inputs):
        return self.head(inputs + self.scale.factor * self.hidden(inputs))


def _data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    return x, np.eye(2, dtype=np.float32)[(x[:, 0] + 0.3 * x[:, 1] > 0).astype(int)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    keras.utils.set_random_seed(3)
    x, y = _data()
    model = ResidualNet(Scale(0.5))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="categorical_crossentropy")
    callback = TracInCheckpoint(str(tmp_path_factory.mktemp("ckpt")), every_n_epochs=1)
    model.fit(x, y, batch_size=4, epochs=3, verbose=0, callbacks=[callback])
    return model, callback, x, y


def _factory(model):
    def build():
        copy = ResidualNet(Scale(0.5))
        copy(np.zeros((1, 3), np.float32))
        return copy

    return build


def _state(model):
    return [v.numpy().copy() for v in [*model.variables, *model.optimizer.variables]]


def _assert_unchanged(model, state):
    for variable, value in zip([*model.variables, *model.optimizer.variables], state):
        np.testing.assert_array_equal(variable.numpy(), value)


def test_an_instance_gives_the_scores_of_the_factory_path_and_is_left_unchanged(trained):
    model, callback, x, y = trained
    state = _state(model)
    shared = TracIn.from_callback(callback, show_progress=False)
    assert isinstance(shared, SharedArchitectureTracIn)
    _assert_unchanged(model, state)
    copied = TracIn.from_callback(callback, model=_factory(model), show_progress=False)
    assert shared.learning_rates == copied.learning_rates == callback.learning_rates
    train = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    test = tf.data.Dataset.from_tensor_slices(_data(4, seed=1)).batch(4)
    for name in ("compute_influence_values", "compute_influence_vector"):
        np.testing.assert_allclose(
            np.concatenate([v.numpy() for _, v in getattr(shared, name)(train)]),
            np.concatenate([v.numpy() for _, v in getattr(copied, name)(train)]),
            rtol=1e-5, atol=1e-7,
        )
    test_batch, train_batch = next(iter(test)), next(iter(train))
    np.testing.assert_allclose(
        shared.influence_between_batches(test_batch, train_batch).numpy(),
        copied.influence_between_batches(test_batch, train_batch).numpy(),
        rtol=1e-5, atol=1e-7,
    )
    shared_top = list(shared.top_k(test, train, k=3))[0]
    copied_top = list(copied.top_k(test, train, k=3))[0]
    np.testing.assert_array_equal(shared_top[3].numpy(), copied_top[3].numpy())
    np.testing.assert_allclose(shared_top[1].numpy(), copied_top[1].numpy(), rtol=1e-5)
    _assert_unchanged(model, state)


def test_self_influence_equals_a_gradient_tape_sum_over_the_checkpoints(trained):
    model, callback, x, y = trained
    values = extract_only_values(
        TracIn.from_checkpoints(model, callback.paths, callback.learning_rates, show_progress=False,
                                start_layer=-1).compute_influence_values(
            tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
        )
    ).numpy()
    expected = np.zeros(len(x))
    copy = _factory(model)()
    for path, rate in zip(callback.paths, callback.learning_rates):
        copy.load_weights(path)
        for index in range(len(x)):
            with tf.GradientTape() as tape:
                loss = -tf.reduce_sum(y[index] * tf.math.log(copy(x[index:index + 1])))
            expected[index] += rate * sum(float(tf.reduce_sum(g**2)) for g in tape.gradient(loss, copy.head.weights))
    np.testing.assert_allclose(values, expected, rtol=1e-4)


def test_the_model_is_restored_when_a_computation_fails(trained):
    model, callback, _, _ = trained
    shared = TracIn.from_callback(callback, show_progress=False)
    state = _state(model)
    wrong = tf.data.Dataset.from_tensor_slices(
        (np.ones((4, 3), np.float32), np.ones((4, 5), np.float32))
    ).batch(4)
    with pytest.raises(ValueError, match="must have the same shape"):
        shared._compute_influence_vector(next(iter(wrong)))
    _assert_unchanged(model, state)


def test_an_unbuilt_instance_is_refused_with_the_fix(trained):
    _, callback, _, _ = trained
    with pytest.raises(ValueError, match="is not built.*call this one once on a batch"):
        TracIn.from_callback(callback, model=ResidualNet(Scale(0.5)), show_progress=False)
