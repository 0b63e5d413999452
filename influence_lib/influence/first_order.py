"""First-order influence functions (Koh & Liang 2017) and RelatIF (Barshan et al. 2020).

.. math::  I(z, t) = \\nabla_\\theta \\ell(t)^\\top\\, H^{-1}\\, \\nabla_\\theta \\ell(z),\\qquad
           H = \\frac{1}{n} \\sum_i \\nabla^2_\\theta \\ell(z_i)

over the watched weights θ, ``H`` averaged over the Hessian dataset (damped / pseudo-inverted by
the IHVP calculator). Conventions, identical to Influenciae: no minus sign and no 1/n —
a positive value means training sample ``z`` helps ``t``: removing ``z`` raises the loss on ``t``
by about ``I(z, t) / n``. Self-influence is ``I(z, z) = g_zᵀ H⁻¹ g_z``.

With ``normalize=True`` (RelatIF) the influence vector is normalized:
``I(z, t) = g_tᵀ H⁻¹ g_z / ‖H⁻¹ g_z‖``, which discounts training samples that are influential on
everything (Barshan, Brunet & Dziugaite, "RelatIF: Identifying Explanatory Training Examples via
Relative Influence", AISTATS 2020).

Koh & Liang, "Understanding Black-box Predictions via Influence Functions", ICML 2017.
"""
import math

import tensorflow as tf

from ..common.arguments import positive_int
from ..common.datasets import Batch, batch_size_of, iterate_batches
from ..common.distribute import check_strategy, using_strategy
from ..curvature.base import InverseHessianVectorProduct
from ..curvature.factory import IHVPCalculator, InverseHessianVectorProductFactory, make_ihvp
from ..model.influence_model import InfluenceModel
from ..model.measurement import Measurement
from .base import BaseInfluenceCalculator
from .group import FirstOrderGroupInfluence


def hessian_subset(
    dataset: tf.data.Dataset, n_samples: int | None, shuffle_buffer_size: int, seed: int
) -> tf.data.Dataset:
    """``n_samples`` samples drawn once (fixed across passes) from ``dataset``, batched like it."""
    if n_samples is None:
        return dataset
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples_for_hessian must be a positive integer or None, got {n_samples!r}.")
    positive_int(shuffle_buffer_size, "shuffle_buffer_size")
    batch_size = batch_size_of(next(iterate_batches(dataset)))
    return (
        dataset.unbatch()
        .shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=False)
        .take(n_samples)
        .batch(batch_size)
    )


def fit_curvature(
    model: InfluenceModel,
    dataset: tf.data.Dataset,
    ihvp_calculator: "str | IHVPCalculator | InverseHessianVectorProduct | InverseHessianVectorProductFactory",
    n_samples_for_hessian: int | None,
    shuffle_buffer_size: int,
    seed: int,
    show_progress: bool,
) -> tuple[tf.data.Dataset, InverseHessianVectorProduct]:
    """Check ``model`` and ``dataset``, draw the Hessian subset, and build the IHVP calculator on it."""
    if not isinstance(model, InfluenceModel):
        raise TypeError(f"model must be an InfluenceModel, got {type(model).__name__}.")
    model.check_dataset(dataset, "dataset")
    hessian_set = hessian_subset(dataset, n_samples_for_hessian, shuffle_buffer_size, seed)
    return hessian_set, make_ihvp(ihvp_calculator, model, hessian_set, show_progress)


class FirstOrderInfluenceCalculator(BaseInfluenceCalculator, FirstOrderGroupInfluence):
    """Influence functions: ``I(z, t) = g_tᵀ H⁻¹ g_z`` (RelatIF with ``normalize=True``).

    Parameters
    ----------
    model
        The InfluenceModel (watched weights, loss).
    dataset
        Batched training dataset; the Hessian is averaged over it (or over a subset).
    ihvp_calculator
        ``'exact'``, ``'cgd'``, ``'lissa'``, an :class:`IHVPCalculator`, a factory, or a ready
        :class:`InverseHessianVectorProduct` built on ``model`` (to set damping etc.).
    n_samples_for_hessian
        Average the Hessian over this many samples drawn from ``dataset`` (all when None).
    shuffle_buffer_size
        Shuffle buffer used when drawing that subset.
    normalize
        RelatIF: divide each influence vector ``H⁻¹ g_z`` by its norm.
    show_progress
        Show progress bars.
    seed
        Seed of the Hessian subset draw (the subset stays the same across passes).
    measurement
        What is explained on the query side: ``'loss'`` (default), ``'margin'`` or a callable
        ``(model_outputs, targets) -> (batch,)`` (see :mod:`influence_lib.model.measurement`).
        The training side always uses the loss.
    strategy
        ``tf.distribute`` strategy to run on (data-parallel over its replicas); ``None`` uses the
        strategy in scope (see the "Scaling out" page of the documentation).
    """

    def __init__(
        self,
        model: InfluenceModel,
        dataset: tf.data.Dataset,
        ihvp_calculator: "str | IHVPCalculator | InverseHessianVectorProduct | InverseHessianVectorProductFactory" = "exact",
        n_samples_for_hessian: int | None = None,
        shuffle_buffer_size: int = 10000,
        normalize: bool = False,
        show_progress: bool = True,
        seed: int = 0,
        measurement: "str | Measurement | None" = None,
        strategy: "tf.distribute.Strategy | None" = None,
    ):
        self.strategy = check_strategy(strategy)
        with using_strategy(strategy):
            self.train_set, self.ihvp_calculator = fit_curvature(
                model, dataset, ihvp_calculator, n_samples_for_hessian, shuffle_buffer_size, seed, show_progress
            )
        self.model = model
        self.normalize = bool(normalize)
        self.show_progress = show_progress
        self.query_model = model.with_measurement(measurement)

    def _cache_fingerprint(self) -> dict:
        return {
            **super()._cache_fingerprint(),
            "nb_params": self.model.nb_params,
            "normalize": self.normalize,
            "ihvp": type(self.ihvp_calculator).__name__,
            "damping": self.ihvp_calculator.damping,
        }

    def _normalize_if_needed(self, vectors: tf.Tensor) -> tf.Tensor:
        if not self.normalize:
            return vectors
        return tf.math.divide_no_nan(vectors, tf.norm(vectors, axis=1, keepdims=True))

    def _preprocess_samples(self, samples: Batch) -> tf.Tensor:
        return self.query_model.batch_jacobian_tensor(samples)

    def _preprocess_training_samples(self, samples: Batch) -> tf.Tensor:
        return self.model.batch_jacobian_tensor(samples)

    def _layer_sizes(self) -> list[int]:
        return [sum(math.prod(w.shape) for w in weights) for weights in self.model._closed_form_weights]

    def _compute_influence_vector(self, train_samples: Batch) -> tf.Tensor:
        return self._normalize_if_needed(self.ihvp_calculator.ihvp(self.model.batch_jacobian_tensor(train_samples)))

    def _compute_influence_value_from_batch(self, train_samples: Batch) -> tf.Tensor:
        gradients = self.model.batch_jacobian_tensor(train_samples)
        influence_vectors = self._normalize_if_needed(self.ihvp_calculator.ihvp(gradients))
        return tf.reduce_sum(gradients * influence_vectors, axis=1)
