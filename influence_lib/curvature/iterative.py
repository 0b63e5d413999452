"""Base of the iterative IHVP calculators (conjugate gradient, LiSSA): the damped Hessian is only
ever applied to vectors, through :class:`HessianOperator`, never formed."""
import tensorflow as tf

from ..common.arguments import positive_int
from ..model.influence_model import InfluenceModel
from .base import InverseHessianVectorProduct
from .hessian import HessianOperator


class IterativeIHVP(InverseHessianVectorProduct):
    """An IHVP calculator that iterates on the matrix-free operator ``v ↦ (H + λI) v``.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    train_dataset
        Batched dataset over which the Hessian is averaged.
    n_opt_iters
        Maximum number of iterations of a solve.
    damping
        λ ≥ 0.
    show_progress
        Show a progress bar over the iterations of each solve.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        n_opt_iters: int,
        damping: float,
        show_progress: bool,
    ):
        super().__init__(model, train_dataset, damping)
        self.n_opt_iters = positive_int(n_opt_iters, "n_opt_iters")
        self.show_progress = show_progress
        self.hessian_operator = HessianOperator(model, train_dataset)

    def hvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        return self.hessian_operator.matmat(vectors) + self.damping * vectors
