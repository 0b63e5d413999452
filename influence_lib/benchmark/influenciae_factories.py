"""Influenciae's factory names and constructors, for code ported from ``deel.influenciae.benchmark``.

Each is a :class:`~influence_lib.benchmark.factories.CalculatorFactory` (so it works with both
benchmarks) whose constructor takes Influenciae's arguments, in Influenciae's order:

* ``ArnoldiCalculatorFactory(subspace_dim, force_hermitian, k_largest_eig_vals, start_layer=-1,
  dataset_hessian_size=-1, loss_function=None, dtype=tf.float32)``
* ``RPSLJEFactory(ihvp_mode, start_layer=-1, dataset_hessian_size=-1, n_opt_iters=100,
  feature_extractor=-1, loss_function=None)``
* ``RPSL2Factory(loss_function, lambda_regularization, scaling_factor=0.1, layer_index=-1, epochs=100)``
* ``WeightsBoundaryCalculatorFactory(step_nbr=100, norm_type=2)`` and
  ``SampleBoundaryCalculatorFactory(step_nbr=100)`` (the library's boundary factories, same arguments).

Differences: ``loss_function=None`` means "the loss the model was trained with" (the trained
model's, else categorical cross-entropy on softmax outputs) where Influenciae defaults to
cross-entropy on logits; ``dataset_hessian_size=-1`` (all samples) or a positive count of samples
drawn once with the run's seed; RPS-L2's ``layer_index`` is the index of the final Dense layer
(``-1``), where Influenciae's default ``-2`` counted a trailing activation layer; RPS-LJE always
splits the model at its final Dense layer, so ``feature_extractor`` must stay ``-1``. The ``build``
method takes the library's ``(trained, train_set, measurement)``, not Influenciae's
``(training_dataset, model, train_info)``.
"""
from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf

from ..curvature.factory import CGDIHVPFactory, ExactIHVPFactory, LissaIHVPFactory
from ..influence.arnoldi import ArnoldiInfluenceCalculator
from ..influence.first_order import hessian_subset
from ..influence.representer_l2 import RepresenterPointL2
from ..influence.representer_lje import RepresenterPointLJE
from ..model.influence_model import InfluenceModel
from .factories import CalculatorFactory, SampleBoundaryFactory, WeightsBoundaryFactory

WeightsBoundaryCalculatorFactory = WeightsBoundaryFactory
SampleBoundaryCalculatorFactory = SampleBoundaryFactory


def _hessian_samples(dataset_hessian_size: int) -> int | None:
    if isinstance(dataset_hessian_size, bool) or not isinstance(dataset_hessian_size, int):
        raise ValueError(f"dataset_hessian_size must be an integer (-1: all samples), got {dataset_hessian_size!r}.")
    if dataset_hessian_size == 0 or dataset_hessian_size < -1:
        raise ValueError(f"dataset_hessian_size must be -1 (all samples) or positive, got {dataset_hessian_size}.")
    return None if dataset_hessian_size == -1 else dataset_hessian_size


def _influence_model(trained, start_layer, loss_function) -> InfluenceModel:
    return InfluenceModel(trained.model, start_layer=start_layer, loss_function=loss_function or trained.loss_function)


@dataclass(frozen=True)
class ArnoldiCalculatorFactory(CalculatorFactory):
    """Influenciae's ``ArnoldiCalculatorFactory``: influence through the top Hessian eigenspace found by Arnoldi."""

    subspace_dim: int
    force_hermitian: bool = True
    k_largest_eig_vals: int | None = None
    start_layer: int | str | None = -1
    dataset_hessian_size: int = -1
    loss_function: Callable | None = None
    dtype: tf.DType = tf.float32

    def build(self, trained, train_set, measurement=None) -> ArnoldiInfluenceCalculator:
        model = _influence_model(trained, self.start_layer, self.loss_function)
        hessian_set = hessian_subset(train_set, _hessian_samples(self.dataset_hessian_size), 10000, trained.seed)
        return ArnoldiInfluenceCalculator(
            model, hessian_set, self.subspace_dim, self.force_hermitian, self.k_largest_eig_vals, self.dtype,
            damping=0.0, seed=trained.seed, show_progress=False, measurement=measurement,  # Influenciae: undamped
        )


@dataclass(frozen=True)
class RPSLJEFactory(CalculatorFactory):
    """Influenciae's ``RPSLJEFactory``: representer points by local Jacobian expansion (Sui et al. 2021)."""

    effect_sign = 1.0
    ihvp_mode: str = "exact"
    start_layer: int | str | None = -1
    dataset_hessian_size: int = -1
    n_opt_iters: int = 100
    feature_extractor: int = -1
    loss_function: Callable | None = None

    def __post_init__(self):
        if self.ihvp_mode not in ("exact", "cgd", "lissa"):
            raise ValueError(f"ihvp_mode must be 'exact', 'cgd' or 'lissa', got {self.ihvp_mode!r}.")
        if self.feature_extractor != -1:
            raise ValueError(
                "feature_extractor must be -1: influence_lib's RPS-LJE always splits the model at its final Dense "
                "layer (features = that layer's inputs)."
            )

    def build(self, trained, train_set, measurement=None) -> RepresenterPointLJE:
        ihvp = {
            "exact": ExactIHVPFactory(show_progress=False),
            "cgd": CGDIHVPFactory(self.n_opt_iters),
            "lissa": LissaIHVPFactory(self.n_opt_iters),
        }[self.ihvp_mode]
        return RepresenterPointLJE(
            _influence_model(trained, self.start_layer, self.loss_function), train_set, ihvp,
            n_samples_for_hessian=_hessian_samples(self.dataset_hessian_size), seed=trained.seed, show_progress=False,
        )


@dataclass(frozen=True)
class RPSL2Factory(CalculatorFactory):
    """Influenciae's ``RPSL2Factory``: representer points of an L2-regularized last layer (Yeh et al. 2018)."""

    effect_sign = 1.0
    loss_function: Callable = None
    lambda_regularization: float = 1e-3
    scaling_factor: float = 0.1
    layer_index: int | str = -1
    epochs: int = 100

    def build(self, trained, train_set, measurement=None) -> RepresenterPointL2:
        loss_function = self.loss_function or keras.losses.CategoricalCrossentropy(reduction=None)
        return RepresenterPointL2(
            trained.model, train_set, loss_function, self.lambda_regularization, self.scaling_factor, self.epochs,
            self.layer_index, show_progress=False,
        )
