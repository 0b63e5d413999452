"""TRAK (Park, Georgiev, Ilyas, Leclerc & Madry, "TRAK: Attributing Model Behavior at Scale", ICML 2023).

For each model ``m`` of an ensemble of ``M`` (independently trained models, or checkpoints),
with ``f_m`` the measurement (the classifier margin ``z_y − logsumexp_{k≠y} z_k`` by default),
``R_m`` a random projection to ``k`` coordinates and ``Φ_m`` the ``n × k`` matrix of the
training features ``φ_m(z_i) = R_mᵀ ∇_θ f_m(z_i)``:

.. math::  \\tau(t, z_i) = \\Big[\\frac{1}{M} \\sum_m \\varphi_m(t)^\\top
           (\\Phi_m^\\top \\Phi_m + \\lambda I)^{-1} \\varphi_m(z_i)\\Big]\\;
           \\frac{1}{M} \\sum_m (1 - p_m(z_i))

where ``p_m(z_i) = σ(f_m(z_i))`` is the probability the model gives the label of ``z_i`` (the
weighting ``Q`` of the paper, averaged over the ensemble separately as in its Algorithm 1 and
in ``traker``). ``τ`` is the predicted change of the margin of ``t`` when ``z_i`` is included
in the training set (one Newton step of the logistic loss ``−log σ(f)``, whose gradient is
``−(1 − p)∇f``): positive means ``z_i`` helps ``t``, the library's sign. With
``measurement='loss'`` (weight 1) the same formula is ``∇ℓ(t)ᵀ(ΦᵀΦ + λI)⁻¹∇ℓ(z_i)``, positive
again when ``z_i`` lowers the loss of ``t``. With ``projection=None`` the features are the
gradients themselves.

The kernel ``(Φ_mᵀΦ_m + λI)⁻¹`` needs every training feature once: the training set is passed
at construction and featurized batch by batch (memory ``O(batch · k + k²)`` per model),
optionally into a resumable :class:`~influence_lib.common.storage.ShardStore` on disk that is
reused for scoring the same training set. Under a ``tf.distribute`` strategy each batch is split
across the replicas: each replica forms the Gram terms ``Σ_i φ_m(z_i)φ_m(z_i)ᵀ`` of its shard and
they are all-reduced (with a feature store, the features are all-gathered in row order and
written by every worker under its own ``worker_INDEX`` subdirectory). Here the influence vector of ``z`` is
``ψ(z) = concat_m (Φ_mᵀΦ_m + λI)⁻¹ φ_m(z) · q̄(z)/M`` and the preprocessed sample to evaluate
``concat_m φ_m(t)``.
"""
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch, batch_size_of, iterate_batches
from ..common.distribute import check_strategy, data_parallel
from ..common.progress import known_cardinality, progress
from ..common.storage import ShardStore, fingerprint_dataset, fingerprint_variables
from ..model.influence_model import InfluenceModel
from ..model.measurement import Measurement
from ..model.projection import GradientProjector, Projection
from .base import BaseInfluenceCalculator, _checked_finite

DEFAULT_PROJECTION = Projection(2048)


def _check_models(models) -> list[InfluenceModel]:
    if isinstance(models, InfluenceModel):
        return [models]
    if not isinstance(models, Sequence) or isinstance(models, str) or not models:
        raise TypeError("models must be an InfluenceModel or a non-empty list of InfluenceModel (one per model).")
    for model in models:
        if not isinstance(model, InfluenceModel):
            raise TypeError(f"models must contain InfluenceModel objects, got {type(model).__name__}.")
    sizes = [model.nb_params for model in models]
    if len(set(sizes)) > 1:
        raise ValueError(
            f"The models of an ensemble must watch the same weights, but they watch {sizes} parameters: use models "
            "of one architecture and the same start_layer / last_layer for each."
        )
    return list(models)


def _psd_pseudo_inverse(matrices: tf.Tensor) -> tf.Tensor:
    """Pseudo-inverses of symmetric positive semi-definite matrices ``(..., k, k)`` by eigendecomposition
    (eigenvalues below ``k · eps · λ_max`` are dropped, as ``numpy.linalg.pinv`` does with singular values)."""
    values, vectors = tf.linalg.eigh(matrices)
    cutoff = tf.reduce_max(values, axis=-1, keepdims=True) * matrices.shape[-1] * np.finfo(np.float64).eps
    inverse = tf.where(values > cutoff, 1.0 / tf.where(values > cutoff, values, 1.0), 0.0)
    return tf.matmul(vectors * inverse[..., None, :], vectors, transpose_b=True)


def _shard_name(index: int) -> str:
    return f"batch_{index:06d}"


class TRAK(BaseInfluenceCalculator):
    """TRAK over one model or an ensemble: projected measurement gradients and a kernel per model.

    Parameters
    ----------
    models
        One :class:`InfluenceModel` or a list of them (independently trained models or
        checkpoints of the same architecture), each watching the weights to attribute through.
    train_set
        The batched training set (fixed order); the kernels ``(Φ_mᵀΦ_m + λI)⁻¹`` are fitted on it.
    projection
        The random projection (default ``Projection(2048)``, structured, Rademacher); model ``m``
        uses seed ``projection.seed + m``. ``None``: no projection (``k = P``, exact but
        ``P × P`` kernels — small models only); a projection to ``k ≥ P`` coordinates is replaced
        by no projection (exact and cheaper).
    damping
        ``λ``. 0 (default, as ``traker``) takes the pseudo-inverse of ``Φ_mᵀΦ_m``; use
        ``λ > 0`` when the training set has fewer samples than ``k``.
    measurement
        The function ``f`` on both sides: ``'margin'`` (default, classifiers), ``'loss'`` or a
        callable ``(model_outputs, targets) -> (batch,)``. The ``1 − p`` weighting applies to the
        margin only (any other measurement is weighted by 1).
    feature_store
        A directory where the training features go in shards (:class:`ShardStore`): a crashed
        featurization resumes where it stopped, and scoring this training set reads the
        features back instead of recomputing them. ``None``: nothing is written.
    show_progress
        Show progress bars.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).

    Attributes
    ----------
    models, query_models
        The models and their views differentiating the measurement.
    kernels
        One ``(k, k)`` float64 tensor ``(Φ_mᵀΦ_m + λI)⁻¹`` per model.
    """

    def __init__(
        self,
        models: "InfluenceModel | Sequence[InfluenceModel]",
        train_set: tf.data.Dataset,
        projection: Projection | None = DEFAULT_PROJECTION,
        damping: float = 0.0,
        measurement: "str | Measurement" = "margin",
        feature_store: str | None = None,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        self.models = _check_models(models)
        self.strategy = check_strategy(strategy)
        if projection is not None and not isinstance(projection, Projection):
            raise TypeError(f"projection must be a Projection or None, got {type(projection).__name__}.")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not np.isfinite(damping) \
                or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}.")
        if projection is not None and projection.dimension >= self.models[0].nb_params:
            projection = None
        self.projection = projection
        self.damping = float(damping)
        self.measurement = measurement
        self.show_progress = show_progress
        self.query_models = [model.with_measurement(measurement) for model in self.models]
        self._weighted = isinstance(measurement, str) and measurement == "margin"
        self._projectors = None if projection is None else [
            GradientProjector(model, projection.with_seed(projection.seed + index))
            for index, model in enumerate(self.query_models)
        ]
        self.models[0].check_dataset(train_set, "train_set")
        fingerprint = None if feature_store is None else self._fingerprint(train_set)
        self._store = None if fingerprint is None else ShardStore(
            data_parallel(self.strategy).worker_path(feature_store), fingerprint, "TRAK features"
        )
        self._train_fingerprint = None if fingerprint is None else fingerprint["data"]
        self.kernels = self._fit_kernels(train_set)
        self._stacked_kernels = tf.stack(self.kernels)

    @classmethod
    def from_models(
        cls,
        models: Sequence[keras.Model],
        train_set: tf.data.Dataset,
        projection: Projection | None = DEFAULT_PROJECTION,
        damping: float = 0.0,
        measurement: "str | Measurement" = "margin",
        feature_store: str | None = None,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
        **influence_model_kwargs,
    ) -> "TRAK":
        """TRAK over Keras models (an ensemble), each wrapped in an :class:`InfluenceModel`.

        Parameters
        ----------
        models
            Keras models of the same architecture (independently trained, or checkpoints).
        train_set, projection, damping, measurement, feature_store, show_progress, strategy
            As for :class:`TRAK`.
        **influence_model_kwargs
            Passed to every :class:`InfluenceModel` (``start_layer``, ``loss_function``, ...).
        """
        if isinstance(models, keras.Model) or not isinstance(models, Sequence) or not models:
            raise TypeError("models must be a non-empty list of keras.Model.")
        for model in models:
            if not isinstance(model, keras.Model):
                raise TypeError(f"models must contain keras.Model objects, got {type(model).__name__}.")
        wrapped = [InfluenceModel(model, **influence_model_kwargs) for model in models]
        return cls(wrapped, train_set, projection, damping, measurement, feature_store, show_progress, strategy)

    @classmethod
    def from_checkpoints(
        cls,
        model: keras.Model,
        paths: Sequence[str],
        train_set: tf.data.Dataset,
        projection: Projection | None = DEFAULT_PROJECTION,
        damping: float = 0.0,
        measurement: "str | Measurement" = "margin",
        feature_store: str | None = None,
        show_progress: bool = True,
        strategy: "tf.distribute.Strategy | None" = None,
        **influence_model_kwargs,
    ) -> "TRAK":
        """TRAK over checkpoints of one training run (``.weights.h5`` files saved from ``model``'s architecture).

        Each checkpoint is loaded into its own clone of ``model`` (``model`` is left untouched);
        e.g. the paths a :class:`~influence_lib.influence.tracin_checkpoint.TracInCheckpoint` recorded.

        Parameters
        ----------
        model
            A model with the architecture the weights were saved from.
        paths
            The weight files.
        train_set, projection, damping, measurement, feature_store, show_progress, strategy
            As for :class:`TRAK`.
        **influence_model_kwargs
            Passed to every :class:`InfluenceModel`.
        """
        if not isinstance(model, keras.Model):
            raise TypeError(f"model must be a keras.Model, got {type(model).__name__}.")
        if isinstance(paths, str) or not isinstance(paths, Sequence) or not paths:
            raise ValueError("paths must be a non-empty list of weight files (.weights.h5), one per checkpoint.")
        clones = []
        for path in progress(paths, show_progress, "Loading checkpoints"):
            clone = keras.models.clone_model(model)
            clone.load_weights(path)
            clones.append(clone)
        return cls.from_models(clones, train_set, projection, damping, measurement, feature_store, show_progress,
                               strategy, **influence_model_kwargs)

    @property
    def dimension(self) -> int:
        """``k``, the number of features per model (``P`` without projection)."""
        return self.models[0].nb_params if self.projection is None else int(self.projection.dimension)

    def _fingerprint(self, train_set: tf.data.Dataset) -> dict:
        return {
            "calculator": "TRAK",
            "weights": [fingerprint_variables(model.model.weights) for model in self.models],
            "data": fingerprint_dataset(train_set),
            "projection": None if self.projection is None else self.projection.settings(),
            "measurement": self.measurement if isinstance(self.measurement, str) else getattr(
                self.measurement, "__qualname__", type(self.measurement).__name__),
        }

    @property
    def _primary_model(self) -> InfluenceModel:
        return self.models[0]

    def _cache_fingerprint(self) -> dict:
        return {
            **super()._cache_fingerprint(),
            "nb_params": [model.nb_params for model in self.models],
            "projection": None if self.projection is None else self.projection.settings(),
            "damping": self.damping,
            "weights": [fingerprint_variables(model.model.weights) for model in self.models],
        }

    @compiled_method
    def features_tensor(self, batch: Batch) -> tuple[tf.Tensor, tf.Tensor]:
        """Features of one batch for every model and the averaged weighting.

        Returns
        -------
        tuple
            ``(features (batch, M, k), weights (batch,))``: ``φ_m(z)`` per model (float64 for
            float64 models, else float32) and
            ``q̄(z) = mean_m (1 − σ(f_m(z)))`` (1 for a measurement other than the margin).
        """
        features = []
        for index, model in enumerate(self.query_models):
            if self._projectors is None:
                features.append(model.batch_jacobian_tensor(batch))
            else:
                features.append(self._projectors[index].project_tensor(batch))
        if self._weighted:
            weights = tf.add_n([tf.sigmoid(-model.batch_loss_tensor(batch)) for model in self.query_models])
            weights = weights / len(self.query_models)
        else:
            weights = tf.ones([tf.shape(features[0])[0]], tf.float32)
        return tf.stack(features, axis=1), tf.cast(weights, features[0].dtype)

    @compiled_method
    def _batch_gram(self, batch: Batch) -> tf.Tensor:
        """``Σ_i φ_m(z_i) φ_m(z_i)ᵀ`` over the samples of one batch, per model, float64 ``(M, k, k)``."""
        features = tf.cast(self.features_tensor(batch)[0], tf.float64)
        return tf.einsum("bmi,bmj->mij", features, features)

    def _training_batches(self, train_set: tf.data.Dataset, desc: str):
        return progress(iterate_batches(train_set, "train_set"), self.show_progress, desc, known_cardinality(train_set))

    def _feature_batches(self, train_set: tf.data.Dataset, desc: str):
        """``(batch, features, weights)`` of the training set, read from the store where present."""
        parallel = data_parallel(self.strategy)
        for index, batch in enumerate(self._training_batches(train_set, desc)):
            name = _shard_name(index)
            if self._store is not None and self._store.has(name):
                shard = self._store.read(name)
                features, weights = tf.constant(shard["features"]), tf.constant(shard["weights"])
            else:
                features, weights = parallel.map_rows(self.features_tensor, batch)
                if self._store is not None:
                    self._store.write(name, features=features.numpy(), weights=weights.numpy())
            if features.shape[0] != batch_size_of(batch):
                raise ValueError(
                    f"The feature store holds {features.shape[0]} samples for batch {index} of a training set with "
                    f"{batch_size_of(batch)}: it was written for another batching. Use another feature_store directory."
                )
            yield batch, features, weights

    def _fit_kernels(self, train_set: tf.data.Dataset) -> list[tf.Tensor]:
        """``(Φ_mᵀΦ_m + λI)⁻¹`` per model, accumulated in float64 over the training set (per-replica Gram
        terms all-reduced; with a feature store, from the stored features)."""
        gram = tf.zeros([len(self.models), self.dimension, self.dimension], tf.float64)
        if self._store is None:
            parallel = data_parallel(self.strategy)
            for batch in self._training_batches(train_set, "TRAK features"):
                gram += parallel.sum_rows(self._batch_gram, batch)
        else:
            count = 0
            for _, features, _ in self._feature_batches(train_set, "TRAK features"):
                features = tf.cast(features, tf.float64)
                gram += tf.einsum("bmi,bmj->mij", features, features)
                count += int(features.shape[0])
            self._store.mark_complete(samples=count)
        if self.damping > 0:
            return list(tf.unstack(tf.linalg.inv(gram + self.damping * tf.eye(self.dimension, dtype=tf.float64))))
        return list(tf.unstack(_psd_pseudo_inverse(gram)))

    def _vectors(self, features: tf.Tensor, weights: tf.Tensor) -> tf.Tensor:
        """``ψ(z) = concat_m K_m φ_m(z) · q̄(z) / M``, shape ``(batch, M·k)``."""
        solved = tf.einsum("bmi,mij->bmj", tf.cast(features, tf.float64), self._stacked_kernels)
        scaled = solved * tf.cast(weights, tf.float64)[:, None, None] / len(self.models)
        return tf.cast(tf.reshape(scaled, [tf.shape(scaled)[0], -1]), self.value_dtype)

    def _influence_vector_batches(self, train_set: tf.data.Dataset, sharded: bool = False):
        if self._store is None or fingerprint_dataset(train_set) != self._train_fingerprint:
            return super()._influence_vector_batches(train_set, sharded)
        return _checked_finite(self._stored_influence_vector_batches(train_set), "Influence vectors")

    def _stored_influence_vector_batches(self, train_set: tf.data.Dataset):
        offset = 0
        for batch, features, weights in self._feature_batches(train_set, "Influence vectors"):
            yield batch, self._vectors(features, weights), offset
            offset += batch_size_of(batch)

    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        return self._vectors(*self.features_tensor(train_samples))

    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        features, _ = self.features_tensor(samples)
        return tf.reshape(features, [tf.shape(features)[0], -1])

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        features, weights = self.features_tensor(train_samples)
        vectors = self._vectors(features, weights)
        return tf.reduce_sum(tf.reshape(features, tf.shape(vectors)) * vectors, axis=1)

    def influence_between_batches(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        """TRAK scores of every training sample of one batch on every sample of another, ``(test, train)``.

        Under a strategy the training batch is split across the replicas, each scoring its rows."""
        return data_parallel(self.strategy).map_columns(self._between_batches, samples_to_evaluate, train_samples)

    def _between_batches(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        return tf.matmul(
            self._preprocess_samples(tuple(samples_to_evaluate)),
            self._compute_influence_vector(tuple(train_samples)),
            transpose_b=True,
        )
