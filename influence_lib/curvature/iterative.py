"""Base of the iterative IHVP calculators (conjugate gradient, LiSSA): the damped curvature is only
ever applied to vectors, through :class:`HessianOperator`, never formed."""
import tensorflow as tf

from ..common.arguments import positive_int
from ..model.influence_model import InfluenceModel
from .base import InverseHessianVectorProduct
from .hessian import HessianOperator
from .spectrum import hutchinson_mean_eigenvalue, resolve_damping


class IterativeIHVP(InverseHessianVectorProduct):
    """An IHVP calculator that iterates on the matrix-free operator ``v ↦ (H + λI) v``.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the curvature.
    train_dataset
        Batched dataset over which the curvature is averaged.
    n_opt_iters
        Maximum number of iterations of a solve.
    damping
        λ ≥ 0, or ``'auto'``: ``λ = max(0.1 · tr(H) / P, λ_train)`` with the trace estimated from 32 random
        probes in one pass over ``train_dataset`` (:mod:`~influence_lib.curvature.spectrum`).
    show_progress
        Show a progress bar over the iterations of each solve.
    curvature
        ``'auto'``, ``'ggn'`` or ``'hessian'`` (see
        :func:`~influence_lib.curvature.hessian.resolve_curvature`).

    Attributes
    ----------
    damping
        The damping λ used (the resolved number when ``'auto'`` was given).
    curvature
        ``'hessian'`` or ``'ggn'``: the matrix used.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        n_opt_iters: int,
        damping: "float | str",
        show_progress: bool,
        curvature: str = "auto",
    ):
        super().__init__(model, train_dataset, damping)
        self.n_opt_iters = positive_int(n_opt_iters, "n_opt_iters")
        self.show_progress = show_progress
        self.hessian_operator = HessianOperator(model, train_dataset, curvature=curvature)
        self.curvature = self.hessian_operator.curvature
        self.damping = resolve_damping(
            self.damping,
            lambda: hutchinson_mean_eigenvalue(self.hessian_operator.matmat, model.nb_params, model.dtype),
            model,
        )

    def hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        return self.hessian_operator.matmat(vectors) + self.damping * vectors
