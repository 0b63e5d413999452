"""Cheap facts about the curvature spectrum, used to set defaults: spectral moments, largest eigenvalue.

The default damping of the IHVP calculators (``damping='auto'``) is one tenth of a mean eigenvalue
of the curvature ``H`` (``P × P``, eigenvalues ``λ_i``). Two means are available by name:

.. math::  \\texttt{'mean'}:\\ \\delta = 0.1 \\cdot \\frac{\\operatorname{tr}(H)}{P}
           = 0.1 \\cdot \\frac{1}{P}\\sum_i \\lambda_i, \\qquad
           \\texttt{'weighted'}:\\ \\delta = 0.1 \\cdot \\frac{\\operatorname{tr}(H^2)}{\\operatorname{tr}(H)}
           = 0.1 \\cdot \\frac{\\sum_i \\lambda_i^2}{\\sum_i \\lambda_i}

``'mean'`` is kronfluence's EK-FAC heuristic (Grosse et al., "Studying Large Language Model
Generalization with Influence Functions", 2023); it counts every direction, the near-null ones
included. ``'weighted'`` weights each eigenvalue by itself: it is the mean curvature
``E[vᵀHv] / E[vᵀv]`` along random vectors distributed like the curvature (``v ~ N(0, H)``) — such
as the training gradients, whose covariance (the empirical Fisher) is close to the Gauss-Newton
matrix near a minimum — and it ignores the null space. Both are invariant to ``P`` and to the
scale of the loss.

``'auto'`` takes ``'weighted'`` when the watched weights are every trainable weight of the model
(a linear model, or a network watched through all its layers) and ``'mean'`` otherwise (e.g. the
last layer of a network). This choice is measured, not derived: against retraining
(``benchmarks/README.md``, "Damping rules against retraining"), ``'mean'`` sits at the best
damping of a sweep on a network's last layer and is 10–100× too small on a whole model, where
finite training acts as a ridge on the weakly curved directions (gradient descent stopped after
``T`` steps of size ``η`` is close to ridge regression with ``λ ≈ 1/(ηT)``, Ali, Kolter &
Tibshirani, "A Continuous-Time View of Early Stopping for Least Squares", AISTATS 2019; see
:func:`early_stopping_damping`).

Where the matrix is formed (:class:`ExactIHVP`) the moments are exact; otherwise both come from
Hutchinson's estimator (Hutchinson, "A stochastic estimator of the trace of the influence matrix
for Laplacian smoothing splines", 1989) with ``probes`` random ±1 vectors ``v`` in ONE vectorized
pass over the Hessian dataset: ``tr(H) ≈ mean vᵀHv`` and ``tr(H²) ≈ mean ‖Hv‖²``.
"""
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..model.influence_model import _as_tf_variable

DAMPING_FRACTION = 0.1
TRACE_PROBES = 32
DAMPING_RULES = ("auto", "mean", "weighted")

MatMat = Callable[[tf.Tensor], tf.Tensor]


@dataclass(frozen=True)
class SpectralMoments:
    """The first two spectral moments of a symmetric ``P × P`` matrix ``H``.

    Attributes
    ----------
    trace
        ``tr(H) = Σ λ_i``.
    trace_of_square
        ``tr(H²) = Σ λ_i² = ‖H‖_F²``.
    dim
        ``P``.
    """

    trace: float
    trace_of_square: float
    dim: int

    @property
    def mean_eigenvalue(self) -> float:
        """``tr(H) / P``."""
        return self.trace / self.dim

    @property
    def weighted_mean_eigenvalue(self) -> float:
        """``tr(H²) / tr(H)``: the mean eigenvalue weighted by the eigenvalues."""
        return self.trace_of_square / self.trace


def hutchinson_moments(
    matmat: MatMat, dim: int, dtype: tf.DType, probes: int = TRACE_PROBES, seed: int = 0
) -> SpectralMoments:
    """Estimate ``tr(H)`` and ``tr(H²)`` from ``probes`` random ±1 vectors ``v``: means of ``vᵀHv`` and ``‖Hv‖²``.

    All probes go through ``matmat`` in one call (one pass over the data). Both estimates are
    unbiased; the relative standard deviation of ``tr(H)`` is at most
    ``sqrt(2 / probes)·‖H‖_F / tr(H)``, that of ``tr(H²)`` at most ``sqrt(2 / probes)`` (rank one).
    """
    signs = np.random.default_rng(seed).integers(0, 2, size=(probes, dim)) * 2 - 1
    vectors = tf.constant(signs, dtype=dtype)
    products = tf.cast(matmat(vectors), dtype)
    trace = float(tf.reduce_mean(tf.reduce_sum(vectors * products, axis=1)))
    trace_of_square = float(tf.reduce_mean(tf.reduce_sum(products * products, axis=1)))
    return SpectralMoments(trace, trace_of_square, dim)


def hutchinson_mean_eigenvalue(
    matmat: MatMat, dim: int, dtype: tf.DType, probes: int = TRACE_PROBES, seed: int = 0
) -> float:
    """Estimate ``tr(H) / P`` as the mean of ``vᵀ H v / P`` over ``probes`` random ±1 vectors ``v``
    (see :func:`hutchinson_moments`)."""
    return hutchinson_moments(matmat, dim, dtype, probes, seed).mean_eigenvalue


def exact_moments(matrix: np.ndarray) -> SpectralMoments:
    """``tr(H)`` and ``tr(H²) = ‖H‖_F²`` of a formed symmetric matrix (float64)."""
    matrix = np.asarray(matrix, np.float64)
    return SpectralMoments(float(np.trace(matrix)), float(np.sum(matrix * matrix)), int(matrix.shape[0]))


def damping_from_moments(rule: str, moments: SpectralMoments) -> float:
    """``0.1 · tr(H)/P`` (``rule='mean'``) or ``0.1 · tr(H²)/tr(H)`` (``rule='weighted'``).

    Raises
    ------
    ValueError
        For another rule, or when ``tr(H)`` is not positive (a flat or mostly concave loss).
    """
    if rule not in ("mean", "weighted"):
        raise ValueError(f"The damping rule must be 'mean' or 'weighted', got {rule!r}.")
    if not moments.trace > 0.0:
        raise ValueError(
            f"damping={rule!r} takes 0.1 × a mean eigenvalue of the curvature, but its trace is {moments.trace:.3e} "
            "(not positive: the loss is flat or concave in the watched weights on the Hessian dataset). "
            "Pass a damping value explicitly, or use curvature='ggn'."
        )
    mean = moments.mean_eigenvalue if rule == "mean" else moments.weighted_mean_eigenvalue
    return DAMPING_FRACTION * mean


def watches_whole_model(model) -> bool:
    """Whether an InfluenceModel's watched weights are every trainable weight of its Keras model."""
    watched = {id(weight) for weight in model.tf_variables}
    trainable = {id(_as_tf_variable(weight)) for weight in model.model.trainable_weights}
    return bool(trainable) and trainable <= watched


def default_damping_rule(model) -> str:
    """The rule ``damping='auto'`` uses for an InfluenceModel: ``'weighted'`` when it watches the whole
    model, else ``'mean'`` (see the module docstring for the evidence)."""
    return "weighted" if watches_whole_model(model) else "mean"


def resolve_damping(damping: "float | str", moments: Callable[[], SpectralMoments], model=None) -> float:
    """``damping`` itself, or the number a rule (``'auto'``, ``'mean'``, ``'weighted'``) gives.

    Parameters
    ----------
    damping
        A number ≥ 0, or a rule name.
    moments
        Called (once) only for a rule: the spectral moments of the curvature.
    model
        The InfluenceModel, which ``'auto'`` needs to choose its rule (:func:`default_damping_rule`).
    """
    if isinstance(damping, str):
        if damping not in DAMPING_RULES:
            raise ValueError(f"damping must be a number ≥ 0 or one of {DAMPING_RULES}, got {damping!r}.")
        rule = default_damping_rule(model) if damping == "auto" else damping
        return damping_from_moments(rule, moments())
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
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer (epochs × batches per epoch), got {steps!r}.")
    if not (np.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate!r}.")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}.")
    return (1.0 - momentum) / (learning_rate * int(steps))
