"""Gradient-similarity baselines: ``GradDot`` and ``GradCos``.

.. math::  \\operatorname{GradDot}(z, t) = \\langle \\nabla_\\theta m(t), \\nabla_\\theta \\ell(z) \\rangle,
           \\qquad
           \\operatorname{GradCos}(z, t) = \\frac{\\langle \\nabla_\\theta m(t), \\nabla_\\theta \\ell(z) \\rangle}
           {\\lVert \\nabla_\\theta m(t) \\rVert\\, \\lVert \\nabla_\\theta \\ell(z) \\rVert}

at the final weights (TracIn with one checkpoint and unit learning rate, without any curvature;
Charpiat et al., "Input Similarity from the Neural Network Perspective", NeurIPS 2019, for the
cosine; both are baselines in dattri, Deng et al., NeurIPS 2024 D&B). ``m`` is the query-side
measurement (the loss by default). With a :class:`~influence_lib.model.projection.Projection`
the gradients are replaced by their random projections ``Rᵀg`` (inner products preserved in
expectation). Self-influence: ``‖g_z‖²`` for GradDot and 1 for GradCos (0 for a zero gradient).
"""
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch
from ..common.distribute import check_strategy, data_parallel
from ..model.influence_model import InfluenceModel
from ..model.measurement import Measurement
from ..model.projection import GradientProjector, Projection
from .base import BaseInfluenceCalculator


def _unit_rows(vectors: tf.Tensor) -> tf.Tensor:
    return tf.math.divide_no_nan(vectors, tf.norm(vectors, axis=1, keepdims=True))


class GradDot(BaseInfluenceCalculator):
    """Dot product of the query's measurement gradient and the training sample's loss gradient.

    Parameters
    ----------
    model
        The InfluenceModel (watched weights, loss).
    projection
        Optional random projection of the gradients (``None``: exact gradients).
    measurement
        What is explained on the query side: ``'loss'`` (default), ``'margin'`` or a callable
        ``(model_outputs, targets) -> (batch,)``. The training side always uses the loss.
    show_progress
        Show progress bars.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).
    """

    normalized = False

    def __init__(
        self,
        model: InfluenceModel,
        projection: Projection | None = None,
        measurement: "str | Measurement | None" = None,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
        if projection is not None and not isinstance(projection, Projection):
            raise TypeError(f"projection must be a Projection or None, got {type(projection).__name__}.")
        self.strategy = check_strategy(strategy)
        self.model = model
        self.projection = projection
        self.show_progress = show_progress
        self.query_model = model.with_measurement(measurement)
        if projection is None:
            self._projector = self._query_projector = None
        else:
            self._projector = GradientProjector(model, projection)
            self._query_projector = GradientProjector(self.query_model, projection)

    def _cache_fingerprint(self) -> dict:
        return {
            **super()._cache_fingerprint(),
            "nb_params": self.model.nb_params,
            "projection": None if self.projection is None else self.projection.settings(),
        }

    def _gradients(self, batch: Batch, query: bool) -> tf.Tensor:
        projector = self._query_projector if query else self._projector
        model = self.query_model if query else self.model
        gradients = model.batch_jacobian_tensor(batch) if projector is None else projector.project_tensor(batch)
        return _unit_rows(gradients) if self.normalized else gradients

    @compiled_method
    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        return self._gradients(samples, query=True)

    @compiled_method
    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        return self._gradients(train_samples, query=False)

    @compiled_method
    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        if self._projector is None:
            squared = self.model.batch_gradient_norm_sq_tensor(train_samples)
        else:
            squared = tf.reduce_sum(tf.square(self._projector.project_tensor(train_samples)), axis=1)
        return tf.math.divide_no_nan(squared, squared) if self.normalized else squared

    def influence_between_batches(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        """Scores of every training sample of one batch on every sample of another, shape ``(test, train)``.

        Without projection and with the loss on both sides, Dense layers use the factored Gram
        ``⟨g_i, g_j⟩`` of :meth:`InfluenceModel.batch_gradient_dot_tensor` (no gradient formed). Under a
        strategy the training batch is split across the replicas, each scoring its rows.
        """
        return data_parallel(self.strategy).map_columns(self._between_batches, samples_to_evaluate, train_samples)

    @compiled_method
    def _between_batches(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        samples_to_evaluate, train_samples = tuple(samples_to_evaluate), tuple(train_samples)
        if self._projector is not None or self.query_model is not self.model:
            return tf.matmul(
                self._gradients(samples_to_evaluate, query=True), self._gradients(train_samples, query=False),
                transpose_b=True,
            )
        dots = self.model.batch_gradient_dot_tensor(samples_to_evaluate, train_samples)
        if not self.normalized:
            return dots
        norms_test = tf.sqrt(self.model.batch_gradient_norm_sq_tensor(samples_to_evaluate))
        norms_train = tf.sqrt(self.model.batch_gradient_norm_sq_tensor(train_samples))
        return tf.math.divide_no_nan(dots, norms_test[:, None] * norms_train[None, :])


class GradCos(GradDot):
    """Cosine similarity of the query's measurement gradient and the training sample's loss gradient.

    Same parameters as :class:`GradDot`.
    """

    normalized = True
