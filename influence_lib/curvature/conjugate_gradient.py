"""Conjugate-gradient IHVP: solve ``(H + λI) x = v`` for many right-hand sides at once.

Each CG iteration costs one Hessian-vector product with all the right-hand sides of a batch
(one pass over the Hessian dataset), so a batch of B samples is solved in the time Influenciae
takes for one. Matrix-free: memory O(B·P).
Martens, "Deep learning via Hessian-free optimization", ICML 2010; Koh & Liang, ICML 2017.
"""
import warnings
from collections.abc import Callable

import tensorflow as tf

from ..common.errors import NonFiniteError, SingularHessianError
from ..common.progress import progress
from ..model.influence_model import InfluenceModel
from .iterative import IterativeIHVP

# Curvature pᵀAp below this fraction of the operator's scale (times pᵀp) is numerically zero in float32.
_CURVATURE_FLOOR = 1e-6


def batched_conjugate_gradient(
    matmat: Callable[[tf.Tensor], tf.Tensor],
    rhs: tf.Tensor,
    tolerance: float,
    max_iterations: int,
    show_progress: bool = False,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Solve ``A x_j = b_j`` for every row ``b_j`` of ``rhs`` with conjugate gradients.

    Each row has its own step sizes; a row stops moving once ``‖r_j‖ ≤ tolerance·‖b_j‖``.

    Parameters
    ----------
    matmat
        ``V ↦ A V`` for a symmetric positive-definite ``A``, applied to the rows of V (shape ``(k, P)``).
    rhs
        Right-hand sides, shape ``(k, P)``.
    tolerance
        Relative residual at which a row counts as solved.
    max_iterations
        Maximum number of iterations (each one calls ``matmat`` once).
    show_progress
        Show a progress bar over the iterations.

    Returns
    -------
    solution, converged
        Solutions, shape ``(k, P)``, and a boolean mask of the rows that reached the tolerance.

    Raises
    ------
    SingularHessianError
        If a search direction has zero or negative curvature (``A`` singular or indefinite).
    """
    solution = tf.zeros_like(rhs)
    residual = rhs
    direction = rhs
    residual_sq = tf.reduce_sum(residual * residual, axis=1)
    target_sq = (tolerance**2) * residual_sq
    converged = residual_sq <= target_sq
    scale = None
    for _ in progress(range(max_iterations), show_progress, "Conjugate gradient"):
        if bool(tf.reduce_all(converged)):
            break
        product = matmat(direction)
        curvature = tf.reduce_sum(direction * product, axis=1)
        direction_sq = tf.reduce_sum(direction * direction, axis=1)
        if scale is None:
            scale = tf.reduce_max(tf.abs(curvature) / tf.maximum(direction_sq, 1e-30))
        if not bool(tf.reduce_all(tf.math.is_finite(curvature))):
            raise NonFiniteError("Hessian-vector products became NaN or infinite during conjugate gradient.")
        flat = tf.logical_and(~converged, curvature <= _CURVATURE_FLOOR * scale * direction_sq)
        if bool(tf.reduce_any(flat)):
            raise SingularHessianError(
                "Conjugate gradient met a direction of zero or negative curvature: the (damped) Hessian is "
                "singular or not positive definite. Pass damping > 0 (e.g. 1e-3), or use ExactIHVP, whose "
                "pseudo-inverse handles a singular Hessian."
            )
        step = tf.where(converged, tf.zeros_like(curvature), residual_sq / curvature)
        solution = solution + step[:, None] * direction
        residual = residual - step[:, None] * product
        new_residual_sq = tf.reduce_sum(residual * residual, axis=1)
        converged = tf.logical_or(converged, new_residual_sq <= target_sq)
        momentum = tf.where(converged, tf.zeros_like(curvature), new_residual_sq / residual_sq)
        direction = residual + momentum[:, None] * direction
        residual_sq = new_residual_sq
    return solution, converged


class ConjugateGradientDescentIHVP(IterativeIHVP):
    """IHVP by conjugate gradient on the mean-Hessian operator, all right-hand sides of a batch at once.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    train_dataset
        Batched dataset over which the Hessian is averaged (each iteration is one pass over it).
    n_opt_iters
        Maximum number of CG iterations.
    damping
        λ ≥ 0: solves ``(H + λI) x = v``. Use λ > 0 when H may be singular or indefinite.
    tolerance
        Relative residual ``‖(H + λI)x − v‖ / ‖v‖`` at which a right-hand side is solved.
    show_progress
        Show a progress bar over the iterations of each solve.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        n_opt_iters: int = 100,
        damping: float = 0.0,
        tolerance: float = 1e-5,
        show_progress: bool = False,
    ):
        if not 0 < float(tolerance) < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {tolerance}.")
        super().__init__(model, train_dataset, n_opt_iters, damping, show_progress)
        self.tolerance = float(tolerance)

    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        solution, converged = batched_conjugate_gradient(
            self.hvp, vectors, self.tolerance, self.n_opt_iters, self.show_progress
        )
        if not bool(tf.reduce_all(converged)):
            unsolved = int(tf.reduce_sum(tf.cast(~converged, tf.int32)))
            warnings.warn(
                f"Conjugate gradient did not reach tolerance {self.tolerance} for {unsolved} of "
                f"{int(tf.shape(vectors)[0])} vectors in {self.n_opt_iters} iterations; raise n_opt_iters or damping.",
                RuntimeWarning,
                stacklevel=2,
            )
        return solution
