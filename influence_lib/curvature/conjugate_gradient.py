"""Conjugate-gradient IHVP: solve ``(H + λI) x = v`` for many right-hand sides at once.

Each CG iteration costs one curvature-vector product with all the right-hand sides of a batch
(one pass over the Hessian dataset), so a batch of B samples is solved in the time Influenciae
takes for one. Matrix-free: memory O(B·P) plus one batch's activations times B.

Cost per query sample: at most ``n_opt_iters`` products, each about two forward and two backward
passes over the whole Hessian dataset (Gauss-Newton: a forward-mode and a reverse-mode pass;
Hessian: a double backward pass), shared by the B right-hand sides solved together — so solve
many vectors per call. The default curvature (Gauss-Newton, positive semi-definite) and damping
(``max(0.1 · tr(H) / P, λ_train)``, positive) make ``H + λI`` positive definite, which CG requires; its condition
number, hence the number of iterations, is at most ``(λ_max + λ) / λ``. A diagonal (Jacobi)
preconditioner (``preconditioner='diagonal'``) rescales the parameters by the empirical Fisher
diagonal: it costs one extra pass with per-sample gradients.
Martens, "Deep learning via Hessian-free optimization", ICML 2010; Koh & Liang, ICML 2017.
"""
import warnings
from collections.abc import Callable

import tensorflow as tf

from ..common.datasets import batch_size_of, iterate_batches
from ..common.errors import NonFiniteError, SingularHessianError
from ..common.progress import known_cardinality, progress
from ..model.influence_model import InfluenceModel
from .iterative import IterativeIHVP

PRECONDITIONERS = (None, "diagonal")
# Exponent of the diagonal preconditioner (Martens, ICML 2010, section 4.7).
_DIAGONAL_EXPONENT = 0.75

# Curvature pᵀAp below this fraction of the operator's scale (times pᵀp) is numerically zero in float32.
_CURVATURE_FLOOR = 1e-6


def batched_conjugate_gradient(
    matmat: Callable[[tf.Tensor], tf.Tensor],
    rhs: tf.Tensor,
    tolerance: float,
    max_iterations: int,
    show_progress: bool = False,
    preconditioner: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """Solve ``A x_j = b_j`` for every row ``b_j`` of ``rhs`` with (preconditioned) conjugate gradients.

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
    preconditioner
        ``R ↦ M⁻¹ R`` for a symmetric positive-definite ``M ≈ A`` applied to the rows of ``R``
        (preconditioned CG); ``None``: plain CG.

    Returns
    -------
    solution, converged
        Solutions, shape ``(k, P)``, and a boolean mask of the rows that reached the tolerance.

    Raises
    ------
    SingularHessianError
        If a search direction has zero or negative curvature (``A`` singular or indefinite).
    """
    precondition = (lambda r: r) if preconditioner is None else preconditioner
    solution = tf.zeros_like(rhs)
    residual = rhs
    preconditioned = precondition(residual)
    direction = preconditioned
    residual_sq = tf.reduce_sum(residual * residual, axis=1)
    residual_dot = tf.reduce_sum(residual * preconditioned, axis=1)
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
                "singular or not positive definite. Pass damping > 0 (e.g. damping='auto'), use curvature='ggn' "
                "(positive semi-definite), or use ExactIHVP, whose pseudo-inverse handles a singular Hessian."
            )
        step = tf.where(converged, tf.zeros_like(curvature), residual_dot / curvature)
        solution = solution + step[:, None] * direction
        residual = residual - step[:, None] * product
        new_residual_sq = tf.reduce_sum(residual * residual, axis=1)
        converged = tf.logical_or(converged, new_residual_sq <= target_sq)
        preconditioned = precondition(residual)
        new_residual_dot = tf.reduce_sum(residual * preconditioned, axis=1)
        momentum = tf.where(converged, tf.zeros_like(curvature), new_residual_dot / residual_dot)
        direction = preconditioned + momentum[:, None] * direction
        residual_dot = new_residual_dot
    return solution, converged


def empirical_fisher_diagonal(model: InfluenceModel, dataset: tf.data.Dataset, show_progress: bool = False) -> tf.Tensor:
    """``(1/n) Σ_i g_i ⊙ g_i`` over the per-sample gradients of ``dataset``, shape ``(P,)``; one pass."""
    total, count = None, 0
    batches = progress(
        iterate_batches(dataset, "the Hessian dataset"), show_progress, "Fisher diagonal", known_cardinality(dataset)
    )
    for batch in batches:
        squares = tf.reduce_sum(tf.square(model.batch_jacobian_tensor(batch)), axis=0)
        total = squares if total is None else total + squares
        count += batch_size_of(batch)
    return total / tf.cast(count, total.dtype)


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
        λ ≥ 0: solves ``(H + λI) x = v``; ``'auto'`` (default): ``λ = max(0.1 · tr(H) / P, λ_train)``, estimated
        in one extra pass (see :class:`~influence_lib.curvature.iterative.IterativeIHVP`).
        ``0`` (Influenciae's default) fails on a singular or indefinite curvature.
    tolerance
        Relative residual ``‖(H + λI)x − v‖ / ‖v‖`` at which a right-hand side is solved.
    show_progress
        Show a progress bar over the iterations of each solve.
    curvature
        ``'auto'`` (default: Gauss-Newton for built-in Keras losses), ``'ggn'`` or ``'hessian'``.
    preconditioner
        ``None`` (default) or ``'diagonal'``: Jacobi preconditioning with
        ``M = (diag(F) + λ)^0.75``, ``F`` the empirical Fisher ``(1/n) Σ_i g_i g_iᵀ`` of the
        per-sample gradients (Martens, ICML 2010), computed in one pass when the calculator is built.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        n_opt_iters: int = 100,
        damping: "float | str" = "auto",
        tolerance: float = 1e-5,
        show_progress: bool = False,
        curvature: str = "auto",
        preconditioner: str | None = None,
    ):
        if not 0 < float(tolerance) < 1:
            raise ValueError(f"tolerance must be in (0, 1), got {tolerance}.")
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"preconditioner must be one of {PRECONDITIONERS}, got {preconditioner!r}.")
        super().__init__(model, train_dataset, n_opt_iters, damping, show_progress, curvature)
        self.tolerance = float(tolerance)
        self.preconditioner = preconditioner
        self.inverse_diagonal = None
        if preconditioner == "diagonal":
            diagonal = empirical_fisher_diagonal(model, train_dataset, show_progress) + self.damping
            if not bool(tf.reduce_all(diagonal > 0)):
                raise ValueError(
                    "preconditioner='diagonal' needs a positive diagonal: some watched weights have zero gradient on "
                    "every sample of the Hessian dataset. Pass damping > 0 (e.g. damping='auto')."
                )
            self.inverse_diagonal = diagonal**-_DIAGONAL_EXPONENT

    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        precondition = None if self.inverse_diagonal is None else self._precondition
        solution, converged = batched_conjugate_gradient(
            self.hvp, vectors, self.tolerance, self.n_opt_iters, self.show_progress, precondition
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

    def _precondition(self, residuals: tf.Tensor) -> tf.Tensor:
        return residuals * tf.cast(self.inverse_diagonal, residuals.dtype)
