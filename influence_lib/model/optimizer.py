"""What a trained model's Keras optimizer records about its training run.

TracIn reads the learning rate of each checkpoint from it, and ``damping='auto'`` reads the
learning rate, momentum and step count of an SGD run (:mod:`influence_lib.curvature.spectrum`).
"""
import keras


def constant_learning_rate(optimizer: keras.optimizers.Optimizer) -> float | None:
    """The learning rate of ``optimizer`` as a float, or None when it follows a
    ``keras.optimizers.schedules.LearningRateSchedule`` (the rate then changes from step to step)."""
    if isinstance(getattr(optimizer, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule):
        return None
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
