"""One factory per mislabel detector: each turns a trained model and its (noisy) training set into
one score per training sample, higher = more suspicious.

Influence methods score a sample by its self-influence (see the conventions page); the
baselines a skeptical user asks for score it by its loss, its gradient norm, or at random.
:data:`METHODS` maps the command-line names to default-configured factories.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from ..common.datasets import iterate_batches
from ..curvature.base import InverseHessianVectorProduct
from ..curvature.conjugate_gradient import ConjugateGradientDescentIHVP
from ..curvature.exact import ExactIHVP
from ..curvature.lissa import LissaIHVP
from ..influence.base import SelfInfluenceCalculator, extract_only_values
from ..influence.first_order import FirstOrderInfluenceCalculator, hessian_subset
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
        ``'exact'``, ``'cgd'`` or ``'lissa'``.
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
    """

    ihvp: str = "exact"
    damping: float = 0.0
    start_layer: int | str | None = None
    n_opt_iters: int = 100
    lissa_scale: float = 10.0
    n_samples_for_hessian: int | None = None
    normalize: bool = False

    def _ihvp(self, model: InfluenceModel, hessian_set: tf.data.Dataset) -> InverseHessianVectorProduct:
        if self.ihvp == "exact":
            return ExactIHVP(model, hessian_set, damping=self.damping, show_progress=False)
        if self.ihvp == "cgd":
            return ConjugateGradientDescentIHVP(model, hessian_set, self.n_opt_iters, self.damping)
        if self.ihvp == "lissa":
            return LissaIHVP(model, hessian_set, self.n_opt_iters, self.damping, self.lissa_scale)
        raise ValueError(f"ihvp must be 'exact', 'cgd' or 'lissa', got {self.ihvp!r}.")

    def build(self, trained, train_set) -> FirstOrderInfluenceCalculator:
        model = InfluenceModel(trained.model, start_layer=self.start_layer)
        hessian_set = hessian_subset(train_set, self.n_samples_for_hessian, 10000, trained.seed)
        return FirstOrderInfluenceCalculator(
            model, hessian_set, self._ihvp(model, hessian_set), normalize=self.normalize, show_progress=False
        )


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
        squared_norms = [model.batch_gradient_norm_sq_tensor(batch) for batch in iterate_batches(train_set, "train_set")]
        return np.sqrt(tf.concat(squared_norms, axis=0).numpy())


@dataclass(frozen=True)
class RandomFactory(MethodFactory):
    """Baseline: uniform random scores (drawn from the run's seed); its expected ROC-AUC is 0.5."""

    def score(self, trained, train_set) -> np.ndarray:
        nb_samples = sum(int(tf.shape(batch[0])[0]) for batch in iterate_batches(train_set, "train_set"))
        return np.random.default_rng(trained.seed).random(nb_samples)


METHODS: dict[str, MethodFactory] = {
    "first_order_exact": FirstOrderFactory("exact"),
    "first_order_cg": FirstOrderFactory("cgd", damping=1e-2, n_opt_iters=100),
    "first_order_lissa": FirstOrderFactory("lissa", damping=1e-2, n_opt_iters=200),
    "relatif": FirstOrderFactory("exact", normalize=True),
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
