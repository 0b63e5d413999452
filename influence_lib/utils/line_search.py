"""Backtracking (Armijo) line search, used by the Newton fit of RPS-L2's surrogate."""
from collections.abc import Callable
from dataclasses import dataclass

import tensorflow as tf


@dataclass(frozen=True)
class LineSearchStep:
    """An accepted step: the size ``η``, the new point ``x + η d`` and the objective there."""

    size: float
    point: tf.Tensor
    value: float


@dataclass(frozen=True)
class BacktrackingLineSearch:
    """Largest step ``η = η₀ βʲ`` (``j = 0, 1, …``) meeting the Armijo condition

    .. math::  f(x + \\eta d) \\le f(x) + c\\,\\eta\\,\\nabla f(x)^\\top d

    along a descent direction ``d`` (Nocedal & Wright, "Numerical Optimization", 2006, Alg. 3.1).

    Parameters
    ----------
    scaling_factor
        ``β ∈ (0, 1)``: how much each rejected step shrinks.
    armijo_fraction
        ``c ∈ (0, 1)``: the fraction of the linear decrease a step must achieve.
    initial_step
        ``η₀ > 0`` (1 for Newton directions).
    max_backtracks
        How many shrinkings to try before giving up.
    """

    scaling_factor: float = 0.5
    armijo_fraction: float = 1e-4
    initial_step: float = 1.0
    max_backtracks: int = 40

    def __post_init__(self):
        if not 0 < self.scaling_factor < 1:
            raise ValueError(f"scaling_factor must be in (0, 1), got {self.scaling_factor!r}.")
        if not 0 < self.armijo_fraction < 1:
            raise ValueError(f"armijo_fraction must be in (0, 1), got {self.armijo_fraction!r}.")
        if not self.initial_step > 0:
            raise ValueError(f"initial_step must be positive, got {self.initial_step!r}.")
        if isinstance(self.max_backtracks, bool) or not isinstance(self.max_backtracks, int) or self.max_backtracks < 1:
            raise ValueError(f"max_backtracks must be a positive integer, got {self.max_backtracks!r}.")

    def search(
        self,
        objective: Callable[[tf.Tensor], tf.Tensor],
        point: tf.Tensor,
        direction: tf.Tensor,
        value: float,
        slope: float,
    ) -> LineSearchStep | None:
        """The accepted step from ``point`` along ``direction``, or ``None`` if none is found.

        Parameters
        ----------
        objective
            ``x ↦ f(x)`` (a scalar tensor).
        point, direction
            ``x`` and the search direction ``d``.
        value
            ``f(x)``.
        slope
            ``∇f(x)ᵀ d``; must be negative (a descent direction).
        """
        if not slope < 0:
            raise ValueError(f"The direction is not a descent direction (slope {slope} ≥ 0).")
        size = self.initial_step
        for _ in range(self.max_backtracks):
            candidate = point + size * direction
            candidate_value = float(objective(candidate))
            if candidate_value <= value + self.armijo_fraction * size * slope:
                return LineSearchStep(size, candidate, candidate_value)
            size *= self.scaling_factor
        return None
