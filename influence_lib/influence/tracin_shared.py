"""TracIn over the checkpoints of a model that Keras cannot copy, evaluated in the model itself.

TracIn needs the model at every checkpoint. It normally loads each checkpoint into its own copy
(``keras.models.clone_model``), but Keras cannot copy a subclassed model whose class has no
``get_config`` (its constructor arguments are not recorded). :class:`SharedArchitectureTracIn`
then keeps each checkpoint's *weights* and evaluates checkpoint ``c`` by assigning them to the
user's own model for the duration of one compiled call, summing (or concatenating) over
checkpoints exactly as :class:`~influence_lib.TracIn` does:

.. math::  \\operatorname{TracIn}(z, t) = \\sum_c \\eta_c \\langle g_c(t), g_c(z) \\rangle,
           \\qquad \\psi(z) = \\operatorname{concat}_c(\\eta_c g_c(z)),
           \\quad \\phi(t) = \\operatorname{concat}_c g_c(t)

(Pruthi et al., NeurIPS 2020). Every variable of the model and of its optimizer is put back as it
was after each call, also when the call fails, so the user's model is unchanged afterwards. The
cost over copies: one assignment of the weights per checkpoint and batch. The model must not be
used concurrently (e.g. trained in another thread) while a TracIn result is computed.
"""
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import keras
import numpy as np
import tensorflow as tf

from ..common.datasets import Batch
from ..model.influence_model import InfluenceModel
from ..model.measurement import Measurement
from ..model.projection import Projection
from .tracin import TracIn
from .tracin_checkpoint import load_checkpoint


def _all_variables(model: keras.Model) -> list:
    """Every variable a weights file can change: the model's and its optimizer's."""
    optimizer = getattr(model, "optimizer", None)
    return [*model.variables, *(optimizer.variables if optimizer is not None else [])]


@contextmanager
def restored(model: keras.Model) -> Iterator[None]:
    """Put every variable of ``model`` and of its optimizer back as it was on entry, also on error."""
    variables = _all_variables(model)
    saved = [tf.identity(variable.value) for variable in variables]
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)


def read_checkpoint_weights(model: keras.Model, path: str) -> list[np.ndarray]:
    """The values of ``model.weights`` stored in the weights file at ``path``; ``model`` is left unchanged."""
    with restored(model):
        load_checkpoint(model, path)
        return [np.array(weight) for weight in model.weights]


class SharedArchitectureTracIn(TracIn):
    """TracIn over checkpoint weights evaluated in one model (see the module docstring).

    Parameters
    ----------
    model
        The :class:`InfluenceModel` over the user's model (its weights are only borrowed).
    checkpoint_weights
        For each checkpoint, the values of ``model.model.weights`` in order
        (:func:`read_checkpoint_weights`).
    learning_rates
        The learning rate at each checkpoint.
    show_progress, measurement, projection
        As in :class:`~influence_lib.TracIn` (checkpoint ``c`` projects with seed ``seed + c``).

    Attributes
    ----------
    checkpoint_weights
        The checkpoints' weights (part of the disk-cache fingerprint).
    """

    def __init__(
        self,
        model: InfluenceModel,
        checkpoint_weights: Sequence[Sequence[np.ndarray]],
        learning_rates: Sequence[float],
        show_progress: bool = True,
        measurement: "str | Measurement | None" = None,
        projection: Projection | None = None,
    ):
        super().__init__([model] * len(checkpoint_weights), learning_rates, show_progress, measurement)
        self.projection = projection
        self.checkpoint_weights = [[tf.constant(value) for value in weights] for weights in checkpoint_weights]
        self._checkpoints = [
            TracIn(
                [model], [rate], show_progress=False, measurement=measurement,
                projection=None if projection is None else projection.with_seed(projection.seed + index),
            )
            for index, rate in enumerate(self.learning_rates)
        ]

    def _over_checkpoints(self, method: str, combine: Callable[[list[tf.Tensor]], tf.Tensor], *batches) -> tf.Tensor:
        """``combine`` of one single-checkpoint TracIn's ``method`` per checkpoint, each run on its weights."""
        weights = self.models[0].model.weights
        parts = []
        with restored(self.models[0].model):
            for single, values in zip(self._checkpoints, self.checkpoint_weights):
                for weight, value in zip(weights, values):
                    weight.assign(value)
                parts.append(getattr(single, method)(*batches))
        return combine(parts)

    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        return self._over_checkpoints("_preprocess_samples", lambda parts: tf.concat(parts, axis=1), samples)

    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        return self._over_checkpoints("_compute_influence_vector", lambda parts: tf.concat(parts, axis=1), train_samples)

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        return self._over_checkpoints("_compute_influence_value_from_batch", tf.add_n, train_samples)

    def _between_batches(self, samples_to_evaluate: Batch, train_samples: Batch) -> tf.Tensor:
        return self._over_checkpoints("_between_batches", tf.add_n, samples_to_evaluate, train_samples)
