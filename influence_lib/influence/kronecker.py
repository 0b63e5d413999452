"""Influence with K-FAC / EK-FAC curvature, preconditioning the queries (kronfluence's layout), with query batching.

.. math::  I(z, t) = \\big[(\\hat F + \\lambda)^{-1} g_t\\big]^\\top g_z

the value of :class:`~influence_lib.influence.first_order.FirstOrderInfluenceCalculator` (``F̂``
is symmetric) with the inverse applied to the samples to evaluate, usually far fewer than the
training samples, whose raw gradients are then enough (Grosse et al., "Studying Large Language
Model Generalization with Influence Functions", 2023).

**Query batching** (``query_rank=r``): each layer's preconditioned query gradient, a matrix
``Q = (F̂_l + λ)⁻¹ G_t`` of shape ``(d_a, d_s)``, is replaced by its best rank-``r``
approximation ``Σ_{k≤r} σ_k u_k v_kᵀ`` (SVD, Eckart–Young), and a training sample's score is
computed from its layer inputs and output gradients without forming its gradient
``G_z = Σ_t ā_t δ_tᵀ``:

.. math::  \\langle Q, G_z \\rangle \\approx
           \\sum_t \\sum_{k \\le r} \\sigma_k (u_k^\\top \\bar a_t)(v_k^\\top \\delta_t)

``O(r·T·(d_a + d_s))`` per layer and pair instead of ``O(d_a·d_s)``; the influence vectors
cached per training sample are then ``(ā_t, δ_t)``, ``T·(d_a + d_s)`` numbers per layer.
``query_rank`` at least ``min(d_a, d_s)`` is exact. Memory of one block of scores:
``O(queries × training batch × T × r)``.
"""
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch
from ..curvature.base import InverseHessianVectorProduct
from ..curvature.factory import IHVPCalculator, InverseHessianVectorProductFactory
from ..curvature.kfac import KFACIHVP
from ..model.influence_model import InfluenceModel
from ..model.measurement import Measurement
from .first_order import FirstOrderInfluenceCalculator


def check_query_rank(query_rank: int | None) -> int | None:
    """``None`` (exact) or a positive integer."""
    if query_rank is not None and (isinstance(query_rank, bool) or not isinstance(query_rank, int) or query_rank < 1):
        raise ValueError(f"query_rank must be None (exact) or a positive integer, got {query_rank!r}.")
    return query_rank


class KroneckerInfluenceCalculator(FirstOrderInfluenceCalculator):
    """First-order influence with K-FAC / EK-FAC, queries preconditioned, optionally low-rank.

    Parameters
    ----------
    model
        The InfluenceModel (watched weights, loss); every watched layer must be one K-FAC covers
        (:mod:`influence_lib.curvature.kronecker_blocks`).
    dataset
        Batched training dataset over which the factors are fit.
    ihvp_calculator
        ``'ekfac'`` (default), ``'kfac'``, a :class:`~influence_lib.curvature.KFACIHVPFactory` or
        a fitted :class:`~influence_lib.curvature.KFACIHVP` / ``EKFACIHVP`` on ``model`` (e.g.
        reloaded from saved factors).
    query_rank
        ``None`` (default): exact preconditioned queries; ``r``: rank-``r`` SVD per layer (inputs
        must then have one fixed shape: each layer's number of positions is read once).
    n_samples_for_hessian
        Fit the factors on this many samples drawn from ``dataset`` (all when None).
    shuffle_buffer_size
        Shuffle buffer used when drawing that subset.
    show_progress
        Show progress bars.
    seed
        Seed of the subset draw.
    measurement
        What is explained on the query side: ``'loss'`` (default), ``'margin'`` or a callable
        ``(model_outputs, targets) -> (batch,)`` (see :mod:`influence_lib.model.measurement`).
    strategy
        ``tf.distribute`` strategy to run on: the factor passes sum per-replica contributions and
        the scoring passes split each batch across the replicas; ``None`` uses the strategy in
        scope (see the "Scaling out" page of the documentation).

    Notes
    -----
    Self-influence (:meth:`compute_influence_values`) is always exact, ``g_zᵀ (F̂ + λ)⁻¹ g_z``,
    computed in the eigenbasis from each layer's rotated inputs and output gradients without
    forming ``g_z`` (see :meth:`~influence_lib.curvature.KFACIHVP.quadratic_forms`).
    """

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        ihvp_calculator: "str | IHVPCalculator | InverseHessianVectorProduct | InverseHessianVectorProductFactory" = "ekfac",
        query_rank: int | None = None,
        n_samples_for_hessian: int | None = None,
        shuffle_buffer_size: int = 10000,
        show_progress: bool = True,
        seed: int = 0,
        measurement: "str | Measurement | None" = None,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        self.query_rank = check_query_rank(query_rank)
        super().__init__(
            model, dataset, ihvp_calculator, n_samples_for_hessian, shuffle_buffer_size,
            normalize=False, show_progress=show_progress, seed=seed, measurement=measurement, strategy=strategy,
        )
        if not isinstance(self.ihvp_calculator, KFACIHVP):
            raise TypeError(
                "KroneckerInfluenceCalculator needs K-FAC curvature: ihvp_calculator must be 'kfac', 'ekfac', a "
                f"KFACIHVPFactory or a KFACIHVP / EKFACIHVP; got {type(self.ihvp_calculator).__name__}. "
                "Use FirstOrderInfluenceCalculator for other IHVPs."
            )
        self.blocks = self.ihvp_calculator.blocks
        self._positions: list[int] | None = None

    def _cache_fingerprint(self) -> dict:
        return {**super()._cache_fingerprint(), "preconditioned": "queries", "query_rank": self.query_rank}

    def _layer_ranks(self) -> list[int]:
        return [min(self.query_rank, block.input_dim, block.output_dim) for block in self.blocks]

    def _layer_sizes(self) -> list[int] | None:
        return [block.size for block in self.blocks] if self.query_rank is None else None

    @compiled_method
    def _features(self, batch: Batch) -> list[tuple[tf.Tensor, tf.Tensor]]:
        """Per layer ``(ā, δ)`` of the training loss, ``ā`` in δ's dtype (Embedding: the token ids)."""
        record = self.model._record(batch)
        if record is None:
            raise ValueError(f"The watched layers cannot be recorded: {self.model.fallback_reason}.")
        pairs = [block.features(calls) for block, calls in zip(self.blocks, record.calls)]
        return [(tf.cast(inputs, delta.dtype), delta) for inputs, delta in pairs]

    def _precondition(self, gradients: tf.Tensor) -> tf.Tensor:
        """``(F̂ + λ)⁻¹ g`` per layer: flat, or rank-r factors ``[σ u (d_a·r), v (d_s·r)]`` per layer."""
        matrices = self.ihvp_calculator.ihvp_matrices(self.ihvp_calculator.check_vectors(gradients))
        if self.query_rank is None:
            return self.ihvp_calculator.join_blocks(matrices)
        return self._low_rank(matrices)

    @compiled_method
    def _low_rank(self, matrices: list[tf.Tensor]) -> tf.Tensor:
        parts = []
        for matrix, rank in zip(matrices, self._layer_ranks()):
            singular_values, left, right = tf.linalg.svd(matrix, full_matrices=False)
            count = tf.shape(matrix)[0]
            parts.append(tf.reshape(left[..., :rank] * singular_values[:, None, :rank], [count, -1]))
            parts.append(tf.reshape(right[..., :rank], [count, -1]))
        return tf.concat(parts, axis=1)

    def _remember_positions(self, samples: Batch) -> None:
        if self.query_rank is not None and self._positions is None:
            self._positions = [int(delta.shape[1]) for _, delta in self._features(samples)]

    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        self._remember_positions(samples)
        return self._precondition(self.query_model.batch_jacobian_tensor(samples))

    def _preprocess_training_samples(self, samples: Batch) -> tf.Tensor:
        self._remember_positions(samples)
        return self._precondition(self.model.batch_jacobian_tensor(samples))

    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        if self.query_rank is None:
            return self.model.batch_jacobian_tensor(train_samples)
        self._remember_positions(train_samples)
        features = self._features(train_samples)
        count = tf.shape(features[0][1])[0]
        return tf.concat([tf.reshape(part, [count, -1]) for pair in features for part in pair], axis=1)

    def _values_per_layer(self, preproc_test_sample: tf.Tensor, influence_vector: tf.Tensor) -> list[tf.Tensor]:
        if self.query_rank is None:
            return super()._values_per_layer(preproc_test_sample, influence_vector)
        return self._low_rank_values(preproc_test_sample, influence_vector)

    @compiled_method
    def _low_rank_values(self, factors: tf.Tensor, features: tf.Tensor) -> list[tf.Tensor]:
        """``Σ_t Σ_k σ_k (u_kᵀ ā_t)(v_kᵀ δ_t)`` per layer, each ``(queries, training samples)``."""
        ranks, positions = self._layer_ranks(), self._positions
        factor_sizes = [
            size for block, r in zip(self.blocks, ranks) for size in (block.input_dim * r, block.output_dim * r)
        ]
        feature_sizes = [
            size
            for block, steps in zip(self.blocks, positions)
            for size in (steps * (1 if block.diagonal_input else block.input_dim), steps * block.output_dim)
        ]
        factor_parts, feature_parts = tf.split(factors, factor_sizes, axis=1), tf.split(features, feature_sizes, axis=1)
        queries, samples = tf.shape(factors)[0], tf.shape(features)[0]
        values = []
        for index, (block, rank, steps) in enumerate(zip(self.blocks, ranks, positions)):
            left = tf.reshape(factor_parts[2 * index], [queries, block.input_dim, rank])
            right = tf.reshape(factor_parts[2 * index + 1], [queries, block.output_dim, rank])
            delta = tf.reshape(feature_parts[2 * index + 1], [samples, steps, block.output_dim])
            if block.diagonal_input:
                ids = tf.cast(tf.reshape(feature_parts[2 * index], [samples, steps]), tf.int64)
                projected_inputs = tf.gather(left, ids, axis=1)
            else:
                inputs = tf.reshape(feature_parts[2 * index], [samples, steps, block.input_dim])
                projected_inputs = tf.einsum("qar,bta->qbtr", left, inputs)
            projected_delta = tf.einsum("qsr,bts->qbtr", right, delta)
            values.append(tf.reduce_sum(projected_inputs * projected_delta, axis=[2, 3]))
        return values

    @compiled_method
    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        """Exact self-influence ``g_zᵀ (F̂ + λ)⁻¹ g_z`` from the layers' rotated ``(ā, δ)`` (no gradient formed)."""
        return self.ihvp_calculator.quadratic_forms(self._features(train_samples))

    def _estimate_influence_value_from_influence_vector(
        self, preproc_test_sample: tf.Tensor, influence_vector: tf.Tensor
    ) -> tf.Tensor:
        if self.query_rank is None:
            return tf.matmul(preproc_test_sample, influence_vector, transpose_b=True)
        return tf.add_n(self._low_rank_values(preproc_test_sample, influence_vector))
