"""TracInCheckpoint: recorded learning rates under a schedule, and TracIn from the callback."""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.influence.base import extract_only_values
from influence_lib.influence.tracin import TracIn
from influence_lib.influence.tracin_checkpoint import TracInCheckpoint

N, BATCH = 24, 8  # 3 steps per epoch
INITIAL_RATE, DECAY_STEPS, DECAY_RATE = 0.5, 2, 0.7


def _schedule_rate(step: int) -> float:
    return INITIAL_RATE * DECAY_RATE ** (step / DECAY_STEPS)


def _compiled_model() -> keras.Model:
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2, activation="softmax")]
    )
    schedule = keras.optimizers.schedules.ExponentialDecay(INITIAL_RATE, DECAY_STEPS, DECAY_RATE)
    model.compile(optimizer=keras.optimizers.SGD(schedule), loss="categorical_crossentropy")
    return model


def _data():
    x = np.random.normal(size=(N, 3)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[(x[:, 0] > 0).astype(int)]
    return x, y


def test_callback_records_the_scheduled_rates_and_tracin_matches_hand_saved_checkpoints(tmp_path):
    model = _compiled_model()
    x, y = _data()
    callback = TracInCheckpoint(str(tmp_path / "auto"), every_n_epochs=2)
    hand_paths, hand_rates = [], []

    def save_by_hand(epoch, logs):
        if (epoch + 1) % 2 == 0:
            hand_paths.append(str(tmp_path / f"hand_{epoch}.weights.h5"))
            model.save_weights(hand_paths[-1])
            hand_rates.append(_schedule_rate((epoch + 1) * N // BATCH))

    model.fit(
        x, y, batch_size=BATCH, epochs=4, shuffle=False, verbose=0,
        callbacks=[callback, keras.callbacks.LambdaCallback(on_epoch_end=save_by_hand)],
    )
    assert len(callback.checkpoints) == 2
    assert all(os.path.exists(path) for path in callback.paths)
    np.testing.assert_allclose(callback.learning_rates, [_schedule_rate(6), _schedule_rate(12)], rtol=1e-6)
    np.testing.assert_allclose(callback.learning_rates, hand_rates, rtol=1e-6)

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)
    from_callback = TracIn.from_callback(callback, show_progress=False)
    by_hand = TracIn.from_checkpoints(_compiled_model(), hand_paths, hand_rates, show_progress=False)
    values_callback = extract_only_values(from_callback.compute_influence_values(dataset)).numpy()
    values_hand = extract_only_values(by_hand.compute_influence_values(dataset)).numpy()
    np.testing.assert_allclose(values_callback, values_hand, rtol=1e-6)
    assert np.all(values_callback > 0)


def test_step_mode_saves_every_n_steps_with_the_rate_at_that_step(tmp_path):
    model = _compiled_model()
    x, y = _data()
    callback = TracInCheckpoint(str(tmp_path), every_n_steps=2)
    model.fit(x, y, batch_size=BATCH, epochs=2, shuffle=False, verbose=0, callbacks=[callback])
    assert len(callback.checkpoints) == 3  # steps 2, 4, 6
    np.testing.assert_allclose(callback.learning_rates, [_schedule_rate(s) for s in (2, 4, 6)], rtol=1e-6)


def test_bad_arguments_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs"):
        TracInCheckpoint(str(tmp_path), every_n_epochs=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        TracInCheckpoint(str(tmp_path), every_n_steps=-1)
    with pytest.raises(ValueError, match="neither"):
        TracInCheckpoint(str(tmp_path), every_n_epochs=None)
    with pytest.raises(ValueError, match="no checkpoint"):
        TracIn.from_callback(TracInCheckpoint(str(tmp_path)))
    with pytest.raises(TypeError, match="TracInCheckpoint"):
        TracIn.from_callback("not a callback")
