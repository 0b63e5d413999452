"""Cheap facts about the curvature spectrum and the training run, used to set defaults.

The default damping of the IHVP calculators (``damping='auto'``) is

.. math::  \\delta = \\max\\big(0.1 \\cdot \\operatorname{tr}(H) / P,\\; \\lambda_{train}\\big)

The first term is a fraction of the mean eigenvalue of the curvature, as in kronfluence's EK-FAC
(Grosse et al., "Studying Large Language Model Generalization with Influence Functions", 2023). It
is invariant to the number of parameters and to the scale of the loss, and leaves the
well-determined (large-eigenvalue) directions almost untouched while bounding the amplification of
the near-null ones by ``1/δ``. The trace is exact where the matrix is formed (:class:`ExactIHVP`)
and otherwise estimated with Hutchinson's estimator (Hutchinson, "A stochastic estimator of the
trace of the influence matrix for Laplacian smoothing splines", 1989) from ``probes`` random ±1
vectors in ONE vectorized pass over the Hessian dataset.

The second term, ``λ_train = (1 − β)/(η T)`` (:func:`early_stopping_damping`), is the ridge that the
finite SGD run which trained the model acts as (Ali, Kolter & Tibshirani, AISTATS 2019). It is read
from the model's Keras optimizer by :func:`recorded_training_damping`, and only when the whole
model is watched; otherwise the first term alone is used. Measured against retraining, the first
term sits at the best damping of a sweep on a network's last layer but is 15–300× too small when
the whole model is watched (a logistic regression, or a network through all its layers), where the
second lands within 2% of the best (``docs/curvature.md``, ``benchmarks/README.md`` "Damping rules
against retraining").
"""
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from ..model.optimizer import constant_learning_rate

if TYPE_CHECKING:
    from ..model.influence_model import InfluenceModel

DAMPING_FRACTION = 0.1
TRACE_PROBES = 32

MatMat = Callable[[tf.Tensor], tf.Tensor]


def hutchinson_mean_eigenvalue(
    matmat: MatMat, dim: int, dtype: tf.DType, probes: int = TRACE_PROBES, seed: int = 0
) -> float:
    """Estimate ``tr(H) / P`` as the mean of ``vᵀ H v / P`` over ``probes`` random ±1 vectors ``v``.

    All probes go through ``matmat`` in one call (one pass over the data). The estimate is
    unbiased; its relative standard deviation is at most ``sqrt(2 / probes)·‖H‖_F / tr(H)``.
    """
    signs = np.random.default_rng(seed).integers(0, 2, size=(probes, dim)) * 2 - 1
    vectors = tf.constant(signs, dtype=dtype)
    quadratic_forms = tf.reduce_sum(vectors * tf.cast(matmat(vectors), dtype), axis=1)
    return float(tf.reduce_mean(quadratic_forms)) / dim


def damping_from_mean_eigenvalue(mean_eigenvalue: float) -> float:
    """``0.1 · tr(H) / P``; raises when the trace is not positive (a flat or mostly concave loss)."""
    if not mean_eigenvalue > 0.0:
        raise ValueError(
            f"damping='auto' takes 0.1 × the mean eigenvalue of the curvature, but it is {mean_eigenvalue:.3e} "
            "(not positive: the loss is flat or concave in the watched weights on the Hessian dataset). "
            "Pass a damping value explicitly, or use curvature='ggn'."
        )
    return DAMPING_FRACTION * mean_eigenvalue


def resolve_damping(
    damping: "float | str", mean_eigenvalue: Callable[[], float], model: "InfluenceModel | None" = None
) -> float:
    """``damping`` itself, or for ``'auto'`` the larger of ``0.1 · mean_eigenvalue()`` and the
    :func:`recorded_training_damping` of ``model`` (when its optimizer records one)."""
    if isinstance(damping, str):
        if damping != "auto":
            raise ValueError(f"damping must be a number ≥ 0 or 'auto', got {damping!r}.")
        spectral = damping_from_mean_eigenvalue(mean_eigenvalue())
        training = recorded_training_damping(model) if model is not None else None
        return spectral if training is None else max(spectral, training)
    return damping


def early_stopping_damping(learning_rate: float, steps: int, momentum: float = 0.0) -> float:
    """The ridge ``λ = (1 − β) / (η · T)`` that ``T`` steps of (heavy-ball) gradient descent act as.

    Gradient descent on a quadratic loss from ``θ₀``, stopped after ``T`` steps of size ``η``,
    shrinks the eigendirection of curvature ``λ_i`` by ``1 − (1 − ηλ_i)^T``, close to the ridge
    filter ``λ_i / (λ_i + 1/(ηT))`` (Ali, Kolter & Tibshirani, AISTATS 2019); momentum ``β``
    multiplies the effective step by ``1/(1 − β)``. Pass it as ``damping`` to predict a model
    trained for a fixed budget rather than to convergence (see ``docs/curvature.md`` for where it
    matched the best damping of a sweep, and where it did not).

    Parameters
    ----------
    learning_rate
        ``η > 0`` of the training run (of the mean loss over a batch).
    steps
        ``T ≥ 1``: the number of optimizer steps (epochs × batches per epoch).
    momentum
        ``β ∈ [0, 1)`` of SGD with momentum.

    Returns
    -------
    float
        ``(1 − β) / (η · T)``.

    Raises
    ------
    TypeError
        A learning rate or momentum that is not a real number.
    ValueError
        ``steps`` not a positive integer, ``η ≤ 0`` or not finite, ``β`` outside ``[0, 1)``.
    """
    for name, value in (("learning_rate", learning_rate), ("momentum", momentum)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}.")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer (epochs × batches per epoch), got {steps!r}.")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    return (1.0 - momentum) / (learning_rate * int(steps))


def recorded_training_damping(model: "InfluenceModel") -> float | None:
    """:func:`early_stopping_damping` of the training run the Keras optimizer of ``model`` recorded,
    or None when it does not apply.

    It applies when every trainable weight of the Keras model is watched (a linear model, or a
    network through all its layers: the early-stopping ridge acts on the whole model, not on a
    layer watched alone) and the model was trained by a plain ``keras.optimizers.SGD`` with a
    constant learning rate and no weight decay whose ``iterations`` counter is positive (what
    ``model.fit`` leaves). Adaptive optimizers, schedules and untrained optimizers give None.
    """
    keras_model = model.model
    optimizer = getattr(keras_model, "optimizer", None)
    if not isinstance(optimizer, keras.optimizers.SGD) or optimizer.weight_decay:
        return None
    learning_rate = constant_learning_rate(optimizer)
    steps = int(keras.ops.convert_to_numpy(optimizer.iterations))
    watched = {id(weight) for weight in model.weights}
    if steps < 1 or any(id(weight) not in watched for weight in keras_model.trainable_weights):
        return None
    if learning_rate is None or not (np.isfinite(learning_rate) and learning_rate > 0):
        return None
    return early_stopping_damping(learning_rate, steps, float(optimizer.momentum))
