"""One factory per mislabel detector: each turns a trained model and its (noisy) training set into
one score per training sample, higher = more suspicious.

Influence methods score a sample by its self-influence (see the conventions page); the
baselines a skeptical user asks for score it by its loss, its gradient norm, or at random.
:data:`METHODS` maps the command-line names to default-configured factories.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ..common.datasets import iterate_batches
from ..curvature.factory import (
    CGDIHVPFactory,
    ExactIHVPFactory,
    InverseHessianVectorProductFactory,
    KFACIHVPFactory,
    LissaIHVPFactory,
)
from ..influence.arnoldi import ArnoldiInfluenceCalculator
from ..influence.base import SelfInfluenceCalculator, extract_only_values
from ..influence.boundary_sample import SampleBoundaryCalculator
from ..influence.boundary_weights import WeightsBoundaryCalculator
from ..influence.first_order import FirstOrderInfluenceCalculator, hessian_subset
from ..influence.representer_l2 import RepresenterPointL2
from ..influence.representer_lje import RepresenterPointLJE
from ..influence.tracin import TracIn
from ..model.influence_model import InfluenceModel
from .training import TrainedModel


class MethodFactory(ABC):
    """A mislabel detector: ``score`` gives one value per training sample, higher = more suspicious."""

    needs_checkpoints: bool = False

    @abstractmethod
    def score(self, trained: TrainedModel, train_set: tf.data.Dataset) -> np.ndarray:
        """Scores of the samples of ``train_set`` (batched, fixed order), shape ``(n,)``."""


class CalculatorFactory(MethodFactory):
    """A detector backed by an influence calculator: the score is the self-influence."""

    @abstractmethod
    def build(self, trained: TrainedModel, train_set: tf.data.Dataset) -> SelfInfluenceCalculator:
        """The influence calculator for the trained model and its training set."""

    def score(self, trained: TrainedModel, train_set: tf.data.Dataset) -> np.ndarray:
        calculator = self.build(trained, train_set)
        return extract_only_values(calculator.compute_influence_values(train_set)).numpy()


@dataclass(frozen=True)
class FirstOrderFactory(CalculatorFactory):
    """First-order influence functions (Koh & Liang 2017) or RelatIF (``normalize=True``).

    Parameters
    ----------
    ihvp
        ``'exact'``, ``'cgd'``, ``'lissa'``, ``'kfac'`` or ``'ekfac'``.
    damping
        λ of ``(H + λI)⁻¹``; 0 takes the pseudo-inverse (exact only).
    start_layer
        First watched layer (None: the last layer with weights).
    n_opt_iters
        Iterations of CG / LiSSA.
    lissa_scale
        LiSSA's scale (must exceed the largest Hessian eigenvalue).
    n_samples_for_hessian
        Average the Hessian over this many training samples (all when None).
    normalize
        RelatIF normalization.
    last_layer
        Last watched layer (None: ``start_layer`` alone); e.g. ``start_layer=0, last_layer=-1`` for every layer.
    """

    ihvp: str = "exact"
    damping: float = 0.0
    start_layer: int | str | None = None
    n_opt_iters: int = 100
    lissa_scale: float = 10.0
    n_samples_for_hessian: int | None = None
    normalize: bool = False
    last_layer: int | str | None = None

    def _ihvp_factory(self) -> InverseHessianVectorProductFactory:
        factories = {
            "exact": ExactIHVPFactory(self.damping, show_progress=False),
            "cgd": CGDIHVPFactory(self.n_opt_iters, self.damping),
            "lissa": LissaIHVPFactory(self.n_opt_iters, self.damping, self.lissa_scale),
            "kfac": KFACIHVPFactory(self.damping, show_progress=False),
            "ekfac": KFACIHVPFactory(self.damping, corrected_eigenvalues=True, show_progress=False),
        }
        if self.ihvp not in factories:
            raise ValueError(f"ihvp must be one of {sorted(factories)}, got {self.ihvp!r}.")
        return factories[self.ihvp]

    def build(self, trained, train_set) -> FirstOrderInfluenceCalculator:
        model = InfluenceModel(trained.model, start_layer=self.start_layer, last_layer=self.last_layer)
        hessian_set = hessian_subset(train_set, self.n_samples_for_hessian, 10000, trained.seed)
        return FirstOrderInfluenceCalculator(
            model, hessian_set, self._ihvp_factory().build(model, hessian_set), normalize=self.normalize,
            show_progress=False,
        )


@dataclass(frozen=True)
class ArnoldiFactory(CalculatorFactory):
    """Influence through the top eigenspace of the Hessian found by Arnoldi (Schioppa et al. 2022).

    Parameters
    ----------
    subspace_dim
        Krylov subspace dimension (Hessian-vector-product passes), capped at the number of
        watched parameters.
    k_largest_eig_vals
        Eigenvalues kept (None: all), capped at the subspace dimension.
    damping
        δ added to the kept eigenvalues.
    start_layer
        First watched layer (None: the last layer with weights).
    """

    subspace_dim: int = 200
    k_largest_eig_vals: int | None = 100
    damping: float = 0.0
    start_layer: int | str | None = None

    def build(self, trained, train_set) -> ArnoldiInfluenceCalculator:
        model = InfluenceModel(trained.model, start_layer=self.start_layer)
        subspace_dim = min(self.subspace_dim, model.nb_params)
        kept = None if self.k_largest_eig_vals is None else min(self.k_largest_eig_vals, subspace_dim)
        return ArnoldiInfluenceCalculator(
            model,
            train_set,
            subspace_dim,
            k_largest_eig_vals=kept,
            damping=self.damping,
            seed=trained.seed,
            show_progress=False,
        )


@dataclass(frozen=True)
class TracInFactory(CalculatorFactory):
    """TracInCP over the checkpoints saved during training (Pruthi et al. 2020)."""

    needs_checkpoints = True
    start_layer: int | str | None = None

    def build(self, trained, train_set) -> TracIn:
        if trained.checkpoint_callback is None:
            raise ValueError("TracIn needs the checkpoints of training: train with a checkpoint_directory.")
        return TracIn.from_callback(trained.checkpoint_callback, show_progress=False, start_layer=self.start_layer)


@dataclass(frozen=True)
class RepresenterL2Factory(CalculatorFactory):
    """Representer points of an L2-regularized last layer (Yeh et al. 2018)."""

    lambda_regularization: float = 1e-3
    epochs: int = 100

    def build(self, trained, train_set) -> RepresenterPointL2:
        return RepresenterPointL2(
            trained.model,
            train_set,
            keras.losses.CategoricalCrossentropy(reduction=None),
            self.lambda_regularization,
            epochs=self.epochs,
            show_progress=False,
        )


@dataclass(frozen=True)
class RepresenterLJEFactory(CalculatorFactory):
    """Representer points by local Jacobian expansion of the last layer (Sui et al. 2021)."""

    damping: float = 1e-2
    epsilon: float = 1e-5

    def build(self, trained, train_set) -> RepresenterPointLJE:
        return RepresenterPointLJE(
            InfluenceModel(trained.model),
            train_set,
            ExactIHVPFactory(self.damping, show_progress=False),
            epsilon=self.epsilon,
            seed=trained.seed,
            show_progress=False,
        )


@dataclass(frozen=True)
class WeightsBoundaryFactory(CalculatorFactory):
    """Minus the distance in last-layer weight space to the boundary that flips each sample."""

    step_nbr: int = 100
    norm_type: float = 2

    def build(self, trained, train_set) -> WeightsBoundaryCalculator:
        return WeightsBoundaryCalculator(trained.model, self.step_nbr, self.norm_type, show_progress=False)


@dataclass(frozen=True)
class SampleBoundaryFactory(CalculatorFactory):
    """Minus the input-space distance (DeepFool) from each sample to the decision boundary."""

    step_nbr: int = 100

    def build(self, trained, train_set) -> SampleBoundaryCalculator:
        return SampleBoundaryCalculator(trained.model, self.step_nbr, show_progress=False)


@dataclass(frozen=True)
class LossFactory(MethodFactory):
    """Baseline: the training loss of each sample."""

    def score(self, trained, train_set) -> np.ndarray:
        return InfluenceModel(trained.model).batch_loss(train_set).numpy()


@dataclass(frozen=True)
class GradientNormFactory(MethodFactory):
    """Baseline: the norm of each sample's loss gradient with respect to the watched weights."""

    start_layer: int | str | None = None

    def score(self, trained, train_set) -> np.ndarray:
        model = InfluenceModel(trained.model, start_layer=self.start_layer)
        batches = iterate_batches(train_set, "train_set")
        squared_norms = [model.batch_gradient_norm_sq_tensor(batch) for batch in batches]
        return np.sqrt(tf.concat(squared_norms, axis=0).numpy())


@dataclass(frozen=True)
class RandomFactory(MethodFactory):
    """Baseline: uniform random scores (drawn from the run's seed); its expected ROC-AUC is 0.5."""

    def score(self, trained, train_set) -> np.ndarray:
        nb_samples = sum(int(tf.shape(batch[0])[0]) for batch in iterate_batches(train_set, "train_set"))
        return np.random.default_rng(trained.seed).random(nb_samples)


METHODS: dict[str, MethodFactory] = {
    "first_order_exact": FirstOrderFactory("exact"),
    "first_order_cg": FirstOrderFactory("cgd", damping=1e-2, n_opt_iters=30, n_samples_for_hessian=512),
    "first_order_lissa": FirstOrderFactory("lissa", damping=1e-2, n_opt_iters=100, n_samples_for_hessian=512),
    "first_order_arnoldi": ArnoldiFactory(),
    "relatif": FirstOrderFactory("exact", normalize=True),
    "tracin": TracInFactory(),
    "rps_l2": RepresenterL2Factory(),
    "rps_lje": RepresenterLJEFactory(),
    "weights_boundary": WeightsBoundaryFactory(),
    "sample_boundary": SampleBoundaryFactory(),
    "loss": LossFactory(),
    "gradient_norm": GradientNormFactory(),
    "random": RandomFactory(),
}


def resolve_methods(names: str | list[str]) -> dict[str, MethodFactory]:
    """``'all'``, a comma-separated string or a list of names from :data:`METHODS` to their factories."""
    if isinstance(names, str):
        names = list(METHODS) if names.strip().lower() == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"Unknown or no method(s) {unknown}; choose among {list(METHODS)} or 'all'.")
    return {name: METHODS[name] for name in names}
