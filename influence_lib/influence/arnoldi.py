"""Arnoldi influence: influence functions in the top eigenspace of the Hessian.

Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling Up Influence Functions", AAAI 2022.

The Arnoldi iteration (:class:`~influence_lib.curvature.arnoldi.ArnoldiIHVP`) finds the ``k``
eigenpairs ``(λ_j, G_j)`` of largest ``|λ|`` of the mean Hessian. Gradients are projected onto
them once, so every influence is a product of ``k``-dimensional vectors:

.. math::  I(z, t) = (G\\, g_t)^\\top\\, \\mathrm{diag}\\big(1/(\\lambda + \\delta)\\big)\\, (G\\, g_z),
           \\qquad \\text{self-influence}(z) = (G g_z)^\\top \\mathrm{diag}\\big(1/(\\lambda + \\delta)\\big) (G g_z)

with the influence vector ``ψ(z) = diag(1/(λ+δ)) G g_z`` and the preprocessed sample
``φ(t) = G g_t``, both of dimension ``k`` (cheap to cache). Same conventions as
:class:`~influence_lib.FirstOrderInfluenceCalculator` (no minus sign, no 1/n): it is the
first-order influence with ``H⁻¹`` replaced by its restriction to the top-``k`` eigenspace.

Influenciae 0.3 keeps the k eigenvalues of SMALLEST magnitude instead (``top_k`` of ``-|λ|``),
i.e. the worst-converged Ritz values, whose inverses dominate and are mostly noise.
"""
import tensorflow as tf

from ..common.datasets import Batch
from ..common.distribute import check_strategy, using_strategy
from ..curvature.arnoldi import ArnoldiIHVP
from ..model.influence_model import InfluenceModel
from ..model.measurement import Measurement
from .base import BaseInfluenceCalculator


class ArnoldiInfluenceCalculator(BaseInfluenceCalculator):
    """Influence of training samples through the top-``k`` Hessian eigenspace found by Arnoldi.

    Parameters
    ----------
    model
        The InfluenceModel (watched weights, loss).
    train_dataset
        Batched dataset over which the Hessian is averaged (one pass per Arnoldi step).
    subspace_dim
        Dimension ``m ≤ P`` of the Krylov subspace (number of Hessian-vector-product passes).
    force_hermitian
        Symmetrize the projected matrix before diagonalizing it (recommended).
    k_largest_eig_vals
        Number ``k ≤ m`` of eigenvalues of largest magnitude kept; ``None`` keeps all ``m``.
    dtype
        Dtype of the Krylov basis and projections (``tf.float32`` or ``tf.float64``).
    damping
        δ ≥ 0 added to the kept eigenvalues; ``'auto'`` (default): ``max(0.1 · tr(H) / P, λ_train)`` (see
        :class:`~influence_lib.curvature.arnoldi.ArnoldiIHVP`).
    seed
        Seed of the Arnoldi start vector.
    show_progress
        Show progress bars.
    measurement
        What is explained on the query side: ``'loss'`` (default), ``'margin'`` or a callable
        ``(model_outputs, targets) -> (batch,)`` (see :mod:`influence_lib.model.measurement`).
        The training side always uses the loss.
    curvature
        ``'auto'`` (default: Gauss-Newton for built-in Keras losses), ``'ggn'`` or ``'hessian'``.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).

    Attributes
    ----------
    ihvp_calculator
        The fitted :class:`ArnoldiIHVP` (eigenvalues and eigenvectors).
    eig_vals, G
        Influenciae's names for the kept eigenvalues ``(k,)`` and eigenvectors ``(k, P)``.
    """

    def __init__(
        self,
        model: InfluenceModel,
        train_dataset: tf.data.Dataset,
        subspace_dim: int,
        force_hermitian: bool = True,
        k_largest_eig_vals: int | None = None,
        dtype: tf.DType = tf.float32,
        damping: "float | str" = "auto",
        seed: int = 0,
        show_progress: bool = True,
        measurement: "str | Measurement | None" = None,
        curvature: str = "auto",
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        model.check_dataset(train_dataset, "train_dataset")
        self.model = model
        self.show_progress = show_progress
        self.query_model = model.with_measurement(measurement)
        self.strategy = check_strategy(strategy)
        with using_strategy(strategy):
            self.ihvp_calculator = ArnoldiIHVP(
                model,
                train_dataset,
                subspace_dim=subspace_dim,
                force_hermitian=force_hermitian,
                k_largest_eig_vals=k_largest_eig_vals,
                damping=damping,
                seed=seed,
                dtype=dtype,
                show_progress=show_progress,
                curvature=curvature,
            )
        self.eig_vals = self.ihvp_calculator.eigenvalues
        self.G = self.ihvp_calculator.eigenvectors

    def _cache_fingerprint(self) -> dict:
        arnoldi = self.ihvp_calculator
        return {
            **super()._cache_fingerprint(),
            "nb_params": self.model.nb_params,
            "subspace_dim": arnoldi.subspace_dim,
            "k_largest_eig_vals": arnoldi.k_largest_eig_vals,
            "force_hermitian": arnoldi.force_hermitian,
            "damping": arnoldi.damping,
            "seed": arnoldi.seed,
        }

    def _gradients(self, samples: Batch, model: InfluenceModel | None = None) -> tf.Tensor:
        return tf.cast((model or self.model).batch_jacobian_tensor(samples), self.ihvp_calculator.dtype)

    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        projected = tf.matmul(
            self._gradients(samples, self.query_model), self.ihvp_calculator.eigenvectors, transpose_b=True
        )
        return tf.cast(projected, self.value_dtype)

    def _influence_vectors_of(self, gradients: tf.Tensor) -> tf.Tensor:
        arnoldi = self.ihvp_calculator
        return tf.matmul(gradients, arnoldi.dual_eigenvectors, transpose_b=True) * arnoldi.inverse_eigenvalues

    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        return self._influence_vectors_of(self._gradients(train_samples))

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        gradients = self._gradients(train_samples)
        projected = tf.matmul(gradients, self.ihvp_calculator.eigenvectors, transpose_b=True)
        return tf.reduce_sum(projected * self._influence_vectors_of(gradients), axis=1)
