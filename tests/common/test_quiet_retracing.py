"""The library's compiled methods do not trigger TensorFlow's excessive-retracing warning when many
instances each trace once (one InfluenceModel per checkpoint, dict inputs, partial last batches)."""
import logging

import keras
import numpy as np
import tensorflow as tf

import influence_lib as il


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_many_instances_with_dict_inputs_and_partial_batches_do_not_warn():
    first, second = keras.Input((3,), name="first"), keras.Input((2,), name="second")
    joined = keras.layers.Concatenate()([first, second])
    model = keras.Model({"first": first, "second": second}, keras.layers.Dense(3, activation="softmax")(joined))
    rng = np.random.default_rng(0)
    x = {"first": rng.normal(size=(11, 3)).astype(np.float32), "second": rng.normal(size=(11, 2)).astype(np.float32)}
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, 11)]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    handler = _Collect()
    logger = tf.get_logger()
    logger.addHandler(handler)
    try:
        for _ in range(6):
            tracin = il.TracIn([il.InfluenceModel(model)], 0.1, show_progress=False)
            values = il.to_numpy(tracin.compute_influence_values(dataset)).values
    finally:
        logger.removeHandler(handler)
    assert values.shape == (11,)
    assert not [message for message in handler.messages if "retracing" in message], handler.messages
