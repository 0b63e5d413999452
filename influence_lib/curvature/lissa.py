"""LiSSA IHVP: a stochastic Neumann series for ``(H + λI)⁻¹ v``, all right-hand sides at once.

.. math::  h_0 = v,\\quad h_{j+1} = v + h_j - \\frac{(H_j + \\lambda I)\\, h_j}{s},\\qquad
           \\mathrm{ihvp}(v) \\approx h_J / s

where ``H_j`` is the mean Hessian on the j-th batch of the Hessian dataset (cycled) and ``s``
(``scale``) must exceed the largest eigenvalue of ``H + λI`` for the series to converge; its fixed
point is exactly ``s (H + λI)⁻¹ v``. Unlike Influenciae (whose fixed point has damping
``damping·scale``), ``damping`` here is the same λ as in the other calculators; the defaults
(λ = 1e-3, s = 10) reproduce Influenciae's defaults (1e-4 · 10).
Agarwal, Bullins & Hazan, "Second-Order Stochastic Optimization for Machine Learning in Linear
Time", JMLR 2017; Koh & Liang, ICML 2017.
"""
import itertools

import tensorflow as tf

from ..common.datasets import batch_size_of, iterate_batches
from ..common.errors import NonFiniteError
from ..common.progress import progress
from ..model.influence_model import InfluenceModel
from .iterative import IterativeIHVP


class LissaIHVP(IterativeIHVP):
    """IHVP by the LiSSA recursion, for all vectors of a batch at once.

    Parameters
    ----------
    model
        The InfluenceModel whose watched weights define the Hessian.
    train_dataset
        Batched dataset; each iteration uses its next batch (cycling) for a stochastic HVP.
    n_opt_iters
        Number of iterations J.
    damping
        λ ≥ 0: the recursion converges to ``(H + λI)⁻¹ v``.
    scale
        s > 0, larger than the largest eigenvalue of ``H + λI``.
    show_progress
        Show a progress bar over the iterations of each solve.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        n_opt_iters: int = 100,
        damping: float = 1e-3,
        scale: float = 10.0,
        show_progress: bool = False,
    ):
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale}.")
        super().__init__(model, train_dataset, n_opt_iters, damping, show_progress)
        self.scale = float(scale)

    def ihvp(self, vectors: tf.Tensor) -> tf.Tensor:
        vectors = self.check_vectors(vectors)
        estimate = vectors
        # For a positive semi-definite H the iterates are bounded by s·‖v‖/λ; far beyond it they diverge.
        bound = 2.0 * self.scale * tf.norm(vectors, axis=1) / self.damping if self.damping > 0 else None
        iterations = itertools.islice(self._cycled_batches(), self.n_opt_iters)
        for batch in progress(iterations, self.show_progress, "LiSSA", self.n_opt_iters):
            count = tf.cast(batch_size_of(batch), vectors.dtype)
            hvp = self.hessian_operator.parallel.sum_rows(self.model.batch_hvp_tensor, batch, estimate)
            damped_hvp = hvp / count + self.damping * estimate
            estimate = vectors + estimate - damped_hvp / self.scale
            finite = bool(tf.reduce_all(tf.math.is_finite(estimate)))
            if not finite or (bound is not None and bool(tf.reduce_any(tf.norm(estimate, axis=1) > bound))):
                raise NonFiniteError(
                    "LiSSA diverged: raise `scale` above the largest eigenvalue of the Hessian (plus damping), "
                    "or raise `damping` if the Hessian has negative eigenvalues."
                )
        return estimate / self.scale

    def _cycled_batches(self):
        while True:
            yield from iterate_batches(self.train_set, "the Hessian dataset")
