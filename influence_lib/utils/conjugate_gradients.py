"""Conjugate gradients for a user's own symmetric positive-definite operator (Influenciae's
``utils.conjugate_gradients_solve``), on the batched solver of
:func:`influence_lib.curvature.batched_conjugate_gradient`."""
from collections.abc import Callable

import tensorflow as tf

from ..curvature.conjugate_gradient import batched_conjugate_gradient


def conjugate_gradients_solve(
    operator: Callable[[tf.Tensor], tf.Tensor],
    b: tf.Tensor,
    x0: tf.Tensor | None = None,
    *,
    maxiter: int,
    tol: float = 1e-3,
    atol: float = 1e-5,
) -> tf.Tensor:
    """Solve ``A x = b`` by conjugate gradients (Hestenes & Stiefel, 1952).

    Parameters
    ----------
    operator
        ``X ↦ A X`` for a symmetric positive-definite ``A`` (shape ``(P, P)``), applied to a tensor
        shaped like ``b``: a vector ``(P,)`` or right-hand sides as columns ``(P, k)``.
    b
        Right-hand side(s), ``(P,)`` or ``(P, k)``; the columns are solved independently, each with
        its own step sizes.
    x0
        Initial guess shaped like ``b`` (zeros by default).
    maxiter
        Maximum number of iterations (one ``operator`` call each).
    tol, atol
        A column stops once ``‖A x − b‖ ≤ max(tol·‖b − A x0‖, atol)``.

    Returns
    -------
    tf.Tensor
        ``x`` shaped like ``b``.

    Raises
    ------
    SingularHessianError
        If ``A`` has a direction of zero or negative curvature.
    """
    b = tf.convert_to_tensor(b)
    if b.shape.rank not in (1, 2):
        raise ValueError(f"b must be a vector (P,) or columns (P, k), got shape {tuple(b.shape)}.")
    if isinstance(maxiter, bool) or not isinstance(maxiter, int) or maxiter < 1:
        raise ValueError(f"maxiter must be a positive integer, got {maxiter!r}.")
    if not (0 < tol < 1 and atol >= 0):
        raise ValueError(f"tol must be in (0, 1) and atol ≥ 0, got tol={tol!r}, atol={atol!r}.")
    columns = b[:, None] if b.shape.rank == 1 else b
    start = tf.zeros_like(columns) if x0 is None else tf.reshape(tf.cast(x0, b.dtype), tf.shape(columns))

    def matmat(rows: tf.Tensor) -> tf.Tensor:
        return tf.transpose(tf.reshape(operator(tf.reshape(tf.transpose(rows), tf.shape(b))), tf.shape(columns)))

    residual = tf.transpose(columns) - matmat(tf.transpose(start))
    norms = tf.norm(residual, axis=1)
    tolerance = tf.maximum(tf.cast(tol, b.dtype), tf.math.divide_no_nan(tf.cast(atol, b.dtype), norms))
    correction, _ = batched_conjugate_gradient(matmat, residual, tf.minimum(tolerance, 1.0), maxiter)
    return tf.reshape(start + tf.transpose(correction), tf.shape(b))
