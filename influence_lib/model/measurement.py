"""Measurement functions: the quantity explained on the query side of an attribution.

Influence methods score a training sample ``z`` by how it moves a *measurement* ``m(t)`` of a
sample to evaluate ``t``:

.. math::  I(z, t) = \\nabla_\\theta m(t)^\\top\\, H^{-1}\\, \\nabla_\\theta \\ell(z)

The training side always uses the training loss ``ℓ``; the query side defaults to the loss too
(``m = ℓ``, Koh & Liang 2017) but may be any per-sample differentiable function of the model's
outputs. The classifier **margin**

.. math::  m(t) = z_y - \\log \\sum_{k \\neq y} e^{z_k}

(``z`` the logits, ``y`` the label) is what TRAK explains (Park et al., "TRAK: Attributing Model
Behavior at Scale", ICML 2023) and what kronfluence calls a measurement (Grosse et al.,
"Studying Large Language Model Generalization with Influence Functions", 2023). Its sign is the
opposite of the loss's: a training sample that raises the margin on ``t`` lowers its loss.

For a model whose outputs are probabilities the logits are ``log p`` up to a constant, which the
margin does not see: ``m = log p_y − log(1 − p_y)``; with logits it is computed from them
directly (more precise for very confident samples).
"""
from collections.abc import Callable

import keras
import tensorflow as tf

Measurement = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]
MEASUREMENTS = ("loss", "margin")


def _class_indices(targets: tf.Tensor, outputs: tf.Tensor) -> tf.Tensor:
    """Integer labels from sparse labels ``(batch,)`` / ``(batch, 1)`` or one-hot targets ``(batch, C)``."""
    classes = outputs.shape[-1]
    if targets.shape.rank == outputs.shape.rank and targets.shape[-1] == classes and classes != 1:
        return tf.argmax(targets, axis=-1, output_type=tf.int32)
    return tf.cast(tf.reshape(targets, tf.shape(outputs)[:-1]), tf.int32)


def margin(outputs: tf.Tensor, targets: tf.Tensor, from_logits: bool = True) -> tf.Tensor:
    """Classifier margin ``z_y − logsumexp_{k≠y} z_k`` per sample, shape ``(batch,)``.

    Parameters
    ----------
    outputs
        Logits (``from_logits=True``) or class probabilities, shape ``(batch, C)``.
    targets
        Integer labels ``(batch,)`` or one-hot / soft labels ``(batch, C)`` (their argmax is taken).
    from_logits
        Whether ``outputs`` are logits; probabilities are turned into log-probabilities first.
    """
    outputs = tf.convert_to_tensor(outputs)
    if outputs.dtype in (tf.float16, tf.bfloat16):
        outputs = tf.cast(outputs, tf.float32)
    if outputs.shape.rank is None or outputs.shape.rank < 2 or outputs.shape[-1] is None or outputs.shape[-1] < 2:
        raise ValueError(
            f"measurement='margin' needs class scores of shape (batch, classes) with at least 2 classes, got "
            f"model outputs of shape {outputs.shape}. For a regression or single-output model use "
            "measurement='loss' or pass a callable (model_outputs, targets) -> (batch,)."
        )
    logits = outputs if from_logits else tf.math.log(tf.maximum(outputs, tf.keras.backend.epsilon()))
    labels = _class_indices(tf.convert_to_tensor(targets), logits)
    is_label = tf.one_hot(labels, logits.shape[-1], on_value=True, off_value=False)
    correct = tf.reduce_sum(tf.where(is_label, logits, tf.zeros_like(logits)), axis=-1)
    others = tf.reduce_logsumexp(tf.where(is_label, tf.fill(tf.shape(logits), logits.dtype.min), logits), axis=-1)
    return correct - others


def loss_from_logits(loss_function: Callable) -> bool | None:
    """``from_logits`` of a Keras cross-entropy loss; ``None`` when the loss does not say."""
    options = getattr(loss_function, "_fn_kwargs", None)
    if isinstance(options, dict) and "from_logits" in options:
        return bool(options["from_logits"])
    return None


def resolve_measurement(measurement: "str | Measurement | None", loss_function: Callable) -> Measurement | None:
    """Turn ``measurement`` into a callable ``(model_outputs, targets) -> (batch,)``.

    ``None`` or ``'loss'`` return ``None``: the query side uses the training loss itself.
    ``'margin'`` reads whether the model outputs logits from the loss's ``from_logits`` (Keras
    cross-entropies); a loss that does not say is taken to work on logits only if it is not a
    Keras probability-space loss.
    """
    if measurement is None or (isinstance(measurement, str) and measurement == "loss"):
        return None
    if isinstance(measurement, str):
        if measurement != "margin":
            raise ValueError(
                f"Unknown measurement {measurement!r}: use one of {MEASUREMENTS} or a callable "
                "(model_outputs, targets) -> (batch,)."
            )
        from_logits = loss_from_logits(loss_function)
        if from_logits is None:
            from_logits = not isinstance(loss_function, keras.losses.Loss)
        return lambda outputs, targets: margin(outputs, targets, from_logits=from_logits)
    if not callable(measurement):
        raise TypeError(
            f"measurement must be 'loss', 'margin' or a callable (model_outputs, targets) -> (batch,), "
            f"got {type(measurement).__name__}."
        )
    return measurement


class MeasurementAsLoss:
    """Adapts a measurement ``(model_outputs, targets)`` to the loss convention ``(y_true, y_pred)``."""

    reduction = None

    def __init__(self, measurement: Measurement):
        self.measurement = measurement

    def __call__(self, y_true: tf.Tensor, y_pred: tf.Tensor) -> tf.Tensor:
        return self.measurement(y_pred, y_true)
