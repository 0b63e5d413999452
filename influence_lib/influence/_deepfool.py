"""Batched multi-class DeepFool, shared by the boundary-based calculators.

DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate method to fool
deep neural networks", CVPR 2016) walks a point ``v`` towards the nearest decision boundary of
a classifier ``f`` by linearizing it at every step. With ``c`` the class predicted at the
start, ``Δ_k = f_k(v) − f_c(v)`` and ``w_k = ∇_v Δ_k``, one step is

.. math::  l = \\arg\\min_{k \\ne c} \\frac{|Δ_k|}{\\|w_k\\|_q},\\qquad
           r = \\frac{|Δ_l|}{\\|w_l\\|_q^q}\\; |w_l|^{q-1} \\odot \\operatorname{sign}(w_l)

where ``q = p / (p − 1)`` is the dual exponent of the ℓ_p norm in which the distance is measured
(``q = 2`` for ℓ2, ``q = 1`` for ℓ∞). For a classifier that is linear in ``v`` one step lands
exactly on the boundary, at ℓ_p distance ``min_k |Δ_k| / ‖w_k‖_q``. No overshoot is applied (as
in Influenciae): a point stops when its prediction changes or when its two largest outputs are
within ``eps`` of each other.

Here every row of ``v`` is an independent problem: all rows step together, finished rows are
frozen by a mask (at most ``step_nbr`` updates each), and the per-row Jacobians come from one
vectorized ``batch_jacobian``. The loop's shapes leave the batch axis free, so a traced call works
for any batch size, one included.
"""
from collections.abc import Callable

import numpy as np
import tensorflow as tf


def dual_exponent(norm_type: float) -> float:
    """The dual exponent ``q = p / (p − 1)`` of an ℓ_p norm, ``p ∈ (1, ∞]``.

    Raises
    ------
    ValueError
        If ``norm_type`` is not a number larger than 1 (or ``np.inf``).
    """
    if isinstance(norm_type, bool) or not isinstance(norm_type, (int, float)) or not norm_type > 1:
        raise ValueError(
            f"norm_type must be a number larger than 1 or np.inf (2 for the Euclidean norm), got {norm_type!r}."
        )
    return 1.0 if np.isinf(norm_type) else norm_type / (norm_type - 1.0)


def check_deepfool_arguments(step_nbr: int, eps: float) -> None:
    """Raise a clear error for a non-positive number of steps or a negative tolerance."""
    if isinstance(step_nbr, bool) or not isinstance(step_nbr, int) or step_nbr < 1:
        raise ValueError(f"step_nbr must be a positive integer, got {step_nbr!r}.")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative number, got {eps!r}.")


def _lp_norm(values: tf.Tensor, p: float) -> tf.Tensor:
    """ℓ_p norm along the last axis (``p = inf`` allowed)."""
    if np.isinf(p):
        return tf.reduce_max(tf.abs(values), axis=-1)
    if p == 2.0:
        return tf.norm(values, axis=-1)
    return tf.reduce_sum(tf.abs(values) ** p, axis=-1) ** (1.0 / p)


def check_classifier_outputs(outputs: tf.Tensor, what: str) -> None:
    """DeepFool needs one output per class, at least two classes."""
    shape = tuple(outputs.shape)
    if len(shape) != 2 or (shape[1] is not None and shape[1] < 2):
        raise ValueError(
            f"{what} must output one score per class, shape (batch, classes) with at least 2 classes; got shape "
            f"{shape}. For a binary classifier with a single sigmoid output, use a 2-unit softmax head."
        )


def deepfool(
    outputs_of: Callable[[tf.Tensor], tf.Tensor],
    start: tf.Tensor,
    step_nbr: int,
    eps: float,
    dual_q: float,
) -> tf.Tensor:
    """Run DeepFool on every row of ``start`` at once (call it inside a ``tf.function``).

    Parameters
    ----------
    outputs_of
        ``v (B, P) ↦ outputs (B, C)``; row ``b`` of the outputs must depend on row ``b`` of ``v`` only.
    start
        Starting points, shape ``(B, P)``.
    step_nbr
        Maximum number of DeepFool steps.
    eps
        A row is on the boundary when its two largest outputs differ by at most ``eps``.
    dual_q
        Dual exponent ``q`` of the norm the distance is measured in (see :func:`dual_exponent`).

    Returns
    -------
    tf.Tensor
        The points reached, shape ``(B, P)``.
    """
    start_outputs = outputs_of(start)
    classes = tf.shape(start_outputs)[1]
    original_class = tf.argmax(start_outputs, axis=1, output_type=tf.int32)
    is_original = tf.one_hot(original_class, classes, on_value=True, off_value=False)

    def active(outputs: tf.Tensor) -> tf.Tensor:
        top_two = tf.math.top_k(outputs, k=2).values
        same_class = tf.equal(tf.argmax(outputs, axis=1, output_type=tf.int32), original_class)
        return tf.logical_and(same_class, top_two[:, 0] - top_two[:, 1] > eps)

    def step(index: tf.Tensor, points: tf.Tensor, moving: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(points)
            outputs = outputs_of(points)
        moving = tf.logical_and(active(outputs), index < step_nbr)
        jacobian = tape.batch_jacobian(outputs, points, experimental_use_pfor=True)  # (B, C, P)
        own_output = tf.gather(outputs, original_class, axis=1, batch_dims=1)
        own_gradient = tf.gather(jacobian, original_class, axis=1, batch_dims=1)
        gaps = outputs - own_output[:, None]  # (B, C)
        directions = jacobian - own_gradient[:, None, :]  # (B, C, P)
        direction_norms = _lp_norm(directions, dual_q)
        unreachable = tf.logical_or(is_original, direction_norms <= 0)
        distances = tf.where(unreachable, tf.constant(np.inf, gaps.dtype), tf.abs(gaps) / direction_norms)
        nearest = tf.argmin(distances, axis=1, output_type=tf.int32)
        gap = tf.gather(gaps, nearest, axis=1, batch_dims=1)
        direction = tf.gather(directions, nearest, axis=1, batch_dims=1)
        norm = tf.gather(direction_norms, nearest, axis=1, batch_dims=1)
        if dual_q == 2.0:
            shape = direction
        else:
            shape = tf.abs(direction) ** (dual_q - 1.0) * tf.sign(direction)
        scale = tf.math.divide_no_nan(tf.abs(gap), norm**dual_q)
        update = tf.where(moving[:, None], scale[:, None] * shape, tf.zeros_like(points))
        return index + 1, points + update, moving

    def not_done(index: tf.Tensor, points: tf.Tensor, moving: tf.Tensor) -> tf.Tensor:
        return tf.logical_and(index <= step_nbr, tf.reduce_any(moving))

    moving = tf.ones_like(original_class, dtype=tf.bool)
    invariants = (tf.TensorShape([]), tf.TensorShape([None, start.shape[1]]), tf.TensorShape([None]))
    _, reached, _ = tf.while_loop(
        not_done, step, (tf.constant(0), start, moving), shape_invariants=invariants
    )
    return tf.reshape(reached, tf.shape(start))
