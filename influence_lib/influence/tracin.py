"""TracIn (Pruthi, Liu, Kale & Sundararajan, "Estimating Training Data Influence by Tracing
Gradient Descent", NeurIPS 2020), checkpoint version TracInCP.

.. math::  \\operatorname{TracIn}(z, t) = \\sum_{c} \\eta_c\\,
           \\langle \\nabla_\\theta \\ell(t; \\theta_c), \\nabla_\\theta \\ell(z; \\theta_c) \\rangle,
           \\qquad \\operatorname{TracIn}(z, z) = \\sum_c \\eta_c \\|\\nabla_\\theta \\ell(z; \\theta_c)\\|^2

over checkpoints ``θ_c`` saved during training with the learning rate ``η_c`` in use there, the
gradients taken w.r.t. the weights each :class:`InfluenceModel` watches. Positive: the training
sample ``z`` pushed the loss on ``t`` down during training (a proponent); negative: an opponent.

Same numbers as Influenciae's ``TracIn`` (which scales both sides by ``√η_c``) and Captum's
``TracInCP``. Here the influence vector is ``ψ(z) = concat_c(η_c g_c(z))`` and the preprocessed
sample ``φ(t) = concat_c g_c(t)``, so ``⟨φ(t), ψ(z)⟩`` is exact for any sign of ``η_c``, and the
self-influence uses :meth:`InfluenceModel.batch_gradient_norm_sq_tensor` per checkpoint (no
per-sample gradient matrix where the model has a closed form).

With ``projection=`` (a :class:`~influence_lib.model.projection.Projection`) every gradient is
replaced by its random projection ``R_cᵀ g_c`` (checkpoint ``c`` uses seed ``seed + c``), as in
Captum's ``TracInCPFastRandProj``: ``Σ_c η_c ⟨R_cᵀ g_c(t), R_cᵀ g_c(z)⟩`` is an unbiased estimate
of TracIn whose error shrinks as ``1/√k``, and the influence vectors have ``k`` coordinates per
checkpoint instead of ``P`` (self-influence: ``Σ_c η_c ‖R_cᵀ g_c(z)‖²``).
"""
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_method
from ..common.datasets import Batch
from ..common.distribute import check_strategy, data_parallel
from ..common.progress import progress
from ..model.influence_model import InfluenceModel
from ..model.measurement import Measurement
from ..model.optimizer import constant_learning_rate
from ..model.projection import GradientProjector, Projection
from .base import BaseInfluenceCalculator
from .tracin_checkpoint import TracInCheckpoint, check_compatible_checkpoints, load_checkpoint


def _learning_rates_for(learning_rates: float | Sequence[float], nb_models: int) -> list[float]:
    if isinstance(learning_rates, (int, float, np.floating, np.integer)) and not isinstance(learning_rates, bool):
        rates = [float(learning_rates)] * nb_models
    elif isinstance(learning_rates, Sequence) and not isinstance(learning_rates, str):
        rates = [float(rate) for rate in learning_rates]
        if len(rates) != nb_models:
            raise ValueError(
                f"Got {len(rates)} learning rates for {nb_models} checkpoints: pass one learning rate per "
                "checkpoint, in the same order, or a single float for all of them."
            )
    else:
        raise TypeError(f"learning_rates must be a float or a list of floats, got {type(learning_rates).__name__}.")
    if not all(np.isfinite(rate) and rate > 0 for rate in rates):
        raise ValueError(f"learning rates must be positive finite numbers, got {rates}.")
    return rates


def optimizer_learning_rate(model: keras.Model) -> float:
    """The constant learning rate of ``model``'s optimizer (what TracIn uses when none is given).

    Raises
    ------
    ValueError
        If the model has no optimizer or its learning rate follows a schedule (then the rate
        differs between checkpoints: give them, or record them with :class:`TracInCheckpoint`).
    """
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(
            f"No learning rate was given and the model {model.name!r} has no optimizer to read it from: pass "
            "learning_rates=..., or compile the model with its optimizer."
        )
    learning_rate = constant_learning_rate(optimizer)
    if learning_rate is None:
        raise ValueError(
            f"No learning rate was given and the optimizer of {model.name!r} follows a schedule, so the rate differs "
            "between checkpoints: pass learning_rates=[...] (one per checkpoint), or record them with "
            "TracInCheckpoint and use TracIn.from_callback."
        )
    return learning_rate


ModelFactory = Callable[[], keras.Model]


def _architecture_copy(model: "keras.Model | ModelFactory", reference: keras.Model | None) -> keras.Model | None:
    """A fresh model with ``model``'s architecture: ``model()`` for a factory, else ``clone_model``;
    ``None`` for a model ``clone_model`` cannot copy (a subclassed model without ``get_config``).

    A factory's model is built like ``reference`` (the model the weights come from) if needed.
    """
    if isinstance(model, keras.Model):
        try:
            return keras.models.clone_model(model)
        except Exception:  # Keras raises NotImplementedError, TypeError or ValueError depending on the class
            return None
    copy = model()
    if not isinstance(copy, keras.Model):
        raise TypeError(f"model() must return a keras.Model, got {type(copy).__name__}.")
    if not copy.built:
        shape = (reference.get_build_config() or {}).get("input_shape") if reference is not None else None
        if shape is None:
            raise ValueError(
                "model() returned a model that is not built and the input shape is unknown: build it in the "
                "function (call it once on a batch) before returning it."
            )
        copy(_zeros_like_shape(shape), training=False)
    return copy


def _zeros_like_shape(shape):
    """A batch of one zero sample for a build shape (a tuple, a list of tuples or a dict of them)."""
    if isinstance(shape, dict):
        return {key: _zeros_like_shape(value) for key, value in shape.items()}
    if all(dim is None or isinstance(dim, int) for dim in shape):
        return np.zeros([1 if dim is None else dim for dim in shape], np.float32)
    return [_zeros_like_shape(part) for part in shape]


def _gradient_dots(query_model: InfluenceModel, model: InfluenceModel, queries: Batch, train: Batch) -> tf.Tensor:
    """``⟨∇m(t_i), ∇ℓ(z_j)⟩``: the closed-form Gram when both sides differentiate the loss."""
    if query_model is model:
        return model.batch_gradient_dot_tensor(queries, train)
    return tf.matmul(query_model.batch_jacobian_tensor(queries), model.batch_jacobian_tensor(train), transpose_b=True)


class TracIn(BaseInfluenceCalculator):
    """TracInCP: the learning-rate-weighted sum over checkpoints of gradient dot products.

    Parameters
    ----------
    models
        One :class:`InfluenceModel` per checkpoint (same watched layers and loss in each).
    learning_rates
        The learning rate at each checkpoint (a list as long as ``models``), or one for all.
        ``None`` (default): each checkpoint's model's optimizer's constant learning rate
        (:func:`optimizer_learning_rate`; a schedule is refused).
    show_progress
        Show progress bars.
    measurement
        What is explained on the query side: ``'loss'`` (default), ``'margin'`` or a callable
        ``(model_outputs, targets) -> (batch,)`` (see :mod:`influence_lib.model.measurement`).
        The training side always uses the loss.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).
    projection
        Optional random projection of the gradients (``None``: exact gradients); see the module notes.

    Attributes
    ----------
    models, learning_rates
        The checkpoints and their learning rates.
    """

    def __init__(
        self,
        models: Sequence[InfluenceModel],
        learning_rates: float | Sequence[float] | None = None,
        show_progress: bool = True,
        measurement: "str | Measurement | None" = None,
        strategy: "tf.distribute.Strategy | None" = None,
        projection: Projection | None = None,
    ):
        if isinstance(models, InfluenceModel) or not isinstance(models, Sequence) or not models:
            raise TypeError("models must be a non-empty list of InfluenceModel, one per checkpoint.")
        for model in models:
            if not isinstance(model, InfluenceModel):
                raise TypeError(f"models must contain InfluenceModel objects, got {type(model).__name__}.")
        check_compatible_checkpoints(models)
        self.models = list(models)
        if learning_rates is None:
            learning_rates = [optimizer_learning_rate(model.model) for model in self.models]
        self.learning_rates = _learning_rates_for(learning_rates, len(self.models))
        self.show_progress = show_progress
        self.query_models = [model.with_measurement(measurement) for model in self.models]
        self.strategy = check_strategy(strategy)
        if projection is not None and not isinstance(projection, Projection):
            raise TypeError(f"projection must be a Projection or None, got {type(projection).__name__}.")
        self.projection = projection
        self._projectors = self._query_projectors = None
        if projection is not None:
            settings = [projection.with_seed(projection.seed + index) for index in range(len(self.models))]
            self._projectors = [GradientProjector(m, p) for m, p in zip(self.models, settings)]
            self._query_projectors = [GradientProjector(m, p) for m, p in zip(self.query_models, settings)]

    @classmethod
    def from_checkpoints(
        cls,
        model: "keras.Model | ModelFactory",
        paths: Sequence[str],
        learning_rates: float | Sequence[float] | None = None,
        show_progress: bool = True,
        measurement: "str | Measurement | None" = None,
        projection: Projection | None = None,
        **influence_model_kwargs,
    ) -> "TracIn":
        """TracIn over Keras weight files (``.weights.h5``) saved from ``model``'s architecture.

        Each checkpoint is loaded into its own copy of ``model`` (``keras.models.clone_model``,
        or ``model()`` for a factory). A model ``clone_model`` cannot copy (a subclassed model
        without ``get_config``) is not copied: each checkpoint's weights are evaluated in ``model``
        itself and put back after every call (see :mod:`influence_lib.influence.tracin_shared`).
        Either way ``model`` is left unchanged.

        Parameters
        ----------
        model
            A model with the architecture the weights were saved from, or a function returning a
            new instance of it (e.g. ``model=lambda: MyModel(64)``: one copy per checkpoint, faster
            than borrowing the weights of a model Keras cannot copy).
        paths
            The weight files, in training order.
        learning_rates
            The learning rate at each checkpoint, or one for all; ``None``: ``model``'s
            optimizer's constant learning rate.
        show_progress
            Show progress bars.
        measurement
            What is explained on the query side (see :class:`TracIn`).
        projection
            Optional random projection of the gradients (see :class:`TracIn`).
        **influence_model_kwargs
            Passed to every :class:`InfluenceModel` (``start_layer``, ``loss_function``, ...).
        """
        return cls._from_weight_files(
            model, None, paths, learning_rates, show_progress, measurement, influence_model_kwargs, projection
        )

    @classmethod
    def _from_weight_files(
        cls, model, reference, paths, learning_rates, show_progress, measurement, influence_model_kwargs,
        projection=None,
    ) -> "TracIn":
        if not isinstance(model, keras.Model) and not callable(model):
            raise TypeError(
                f"model must be a keras.Model or a function returning one, got {type(model).__name__}."
            )
        if isinstance(paths, str) or not isinstance(paths, Sequence) or not paths:
            raise ValueError("paths must be a non-empty list of weight files (.weights.h5), one per checkpoint.")
        if learning_rates is None:
            learning_rates = optimizer_learning_rate(model if isinstance(model, keras.Model) else reference)
        rates = _learning_rates_for(learning_rates, len(paths))
        reference = model if reference is None and isinstance(model, keras.Model) else reference
        models = []
        for path in progress(paths, show_progress, "Loading checkpoints"):
            copy = _architecture_copy(model, reference)
            if copy is None:
                return _shared_architecture_tracin(
                    model, paths, rates, show_progress, measurement, influence_model_kwargs, projection
                )
            load_checkpoint(copy, path)
            models.append(InfluenceModel(copy, **influence_model_kwargs))
        return cls(models, rates, show_progress=show_progress, measurement=measurement, projection=projection)

    @classmethod
    def from_callback(
        cls,
        callback: TracInCheckpoint,
        model: "keras.Model | ModelFactory | None" = None,
        show_progress: bool = True,
        measurement: "str | Measurement | None" = None,
        projection: Projection | None = None,
        **influence_model_kwargs,
    ) -> "TracIn":
        """TracIn over the checkpoints and learning rates a :class:`TracInCheckpoint` recorded.

        Parameters
        ----------
        callback
            The callback passed to ``model.fit``.
        model
            The architecture to load the checkpoints into: a model or a function returning a new
            instance (built like the trained model, e.g. ``model=lambda: MyModel(64)``), as in
            :meth:`from_checkpoints` (a subclassed model Keras cannot copy works as it is; it is
            left unchanged). Default: the model the callback was attached to.
        show_progress
            Show progress bars.
        measurement
            What is explained on the query side (see :class:`TracIn`).
        projection
            Optional random projection of the gradients (see :class:`TracIn`).
        **influence_model_kwargs
            Passed to every :class:`InfluenceModel`.
        """
        if not isinstance(callback, TracInCheckpoint):
            raise TypeError(f"callback must be a TracInCheckpoint, got {type(callback).__name__}.")
        if not callback.checkpoints:
            raise ValueError(
                "The callback recorded no checkpoint: pass it to model.fit(..., callbacks=[callback]) and train "
                "for at least every_n_epochs epochs (or every_n_steps steps)."
            )
        paths = [path for path, _ in callback.checkpoints]
        rates = [rate for _, rate in callback.checkpoints]
        return cls._from_weight_files(
            callback.model if model is None else model, callback.model, paths, rates, show_progress, measurement,
            influence_model_kwargs, projection,
        )

    @property
    def _primary_model(self) -> InfluenceModel:
        return self.models[0]

    def _cache_fingerprint(self) -> dict:
        return {
            **super()._cache_fingerprint(),
            "nb_params": [model.nb_params for model in self.models],
            "learning_rates": self.learning_rates,
            "projection": None if self.projection is None else self.projection.settings(),
        }

    def _gradients(self, index: int, batch: Batch, query: bool) -> tf.Tensor:
        """Per-sample gradients (or their projections) at checkpoint ``index``."""
        projectors = self._query_projectors if query else self._projectors
        if projectors is not None:
            return projectors[index].project_tensor(batch)
        return (self.query_models if query else self.models)[index].batch_jacobian_tensor(batch)

    @compiled_method
    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        return tf.concat([self._gradients(index, samples, query=True) for index in range(len(self.models))], axis=1)

    @compiled_method
    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        return tf.concat(
            [
                rate * self._gradients(index, train_samples, query=False)
                for index, rate in enumerate(self.learning_rates)
            ],
            axis=1,
        )

    @compiled_method
    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        if self._projectors is not None:
            return tf.add_n([
                rate * tf.reduce_sum(tf.square(self._gradients(index, train_samples, query=False)), axis=1)
                for index, rate in enumerate(self.learning_rates)
            ])
        return tf.add_n(
            [
                rate * model.batch_gradient_norm_sq_tensor(train_samples)
                for model, rate in zip(self.models, self.learning_rates)
            ]
        )

    def influence_between_batches(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        """TracIn of every training sample of one batch on every sample of another, shape ``(test, train)``.

        Uses :meth:`InfluenceModel.batch_gradient_dot_tensor` per checkpoint (closed forms where the
        model has them), without building influence vectors. Like every per-batch computation of
        TracIn, one ``tf.function`` covers all checkpoints (one call per batch, not one per checkpoint).
        With a projection, the dot products of the projected gradients. Under a strategy the training
        batch is split across the replicas, each scoring its rows against every sample to evaluate.
        """
        return data_parallel(self.strategy).map_columns(self._between_batches, samples_to_evaluate, train_samples)

    @compiled_method
    def _between_batches(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        if self._projectors is not None:
            return tf.add_n([
                rate * tf.matmul(
                    self._gradients(index, tuple(samples_to_evaluate), query=True),
                    self._gradients(index, tuple(train_samples), query=False),
                    transpose_b=True,
                )
                for index, rate in enumerate(self.learning_rates)
            ])
        return tf.add_n(
            [
                rate * _gradient_dots(query_model, model, tuple(samples_to_evaluate), tuple(train_samples))
                for query_model, model, rate in zip(self.query_models, self.models, self.learning_rates)
            ]
        )


def _shared_architecture_tracin(
    model: keras.Model, paths, rates, show_progress, measurement, influence_model_kwargs, projection
) -> TracIn:
    """TracIn over the weights of ``paths`` evaluated in ``model`` itself (a model Keras cannot copy)."""
    from .tracin_shared import SharedArchitectureTracIn, read_checkpoint_weights  # it subclasses TracIn

    if not model.built:
        raise ValueError(
            f"The model {model.name!r} is not built, and Keras cannot copy {type(model).__name__} to build a copy: pass "
            "the trained model (or call this one once on a batch), or model=a function returning a new instance."
        )
    weights = [read_checkpoint_weights(model, path) for path in progress(paths, show_progress, "Loading checkpoints")]
    return SharedArchitectureTracIn(
        InfluenceModel(model, **influence_model_kwargs), weights, rates, show_progress, measurement, projection
    )
