"""The method registry of the benchmarks: one factory per method, configured by its fields.

A factory turns a trained model and its training set into numbers:

* ``score(trained, train_set)``: one value per training sample, higher = more suspicious (the
  mislabel benchmark). Influence methods score a sample by its self-influence (see the
  conventions page); the baselines a skeptical user asks for score it by its loss, its gradient
  norm, or at random.
* ``attribute(trained, train_set, test_set, measurement)``: the ``(test, train)`` matrix of
  datamodel weights the faithfulness benchmark (LDS, leave-one-out) checks against retraining;
  only factories with ``pairwise = True`` have it.

:data:`METHODS` maps the command-line names to default-configured factories. Factories are frozen
dataclasses: their fields are the method's hyper-parameters, set from the command line with
``--set field=value`` (or ``--set method.field=value``) and swept with ``--sweep`` when the
method has a ``damping`` field.

Adding a method takes a few lines: subclass :class:`CalculatorFactory` as a frozen dataclass
whose fields are the hyper-parameters, implement ``build(trained, train_set, measurement=None)``
returning any calculator with ``compute_influence_values`` (self-influence) and, for
``pairwise = True``, ``estimate_influence_values_in_batches`` (e.g. a
:class:`~influence_lib.influence.base.BaseInfluenceCalculator`); set ``effect_sign`` so that
``effect_sign · value`` is the change of the measurement when the training sample is *included*
(−1 for the library's influence convention, +1 for contributions to the logit); then add one
line to :data:`METHODS`.
"""
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
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
from ..curvature.exact import ExactIHVP
from ..influence.arnoldi import ArnoldiInfluenceCalculator
from ..influence.base import extract_only_values
from ..influence.boundary_sample import SampleBoundaryCalculator
from ..influence.boundary_weights import WeightsBoundaryCalculator
from ..influence.first_order import FirstOrderInfluenceCalculator, hessian_subset
from ..influence.grad_similarity import GradCos, GradDot
from ..influence.representer_l2 import RepresenterPointL2
from ..influence.representer_lje import RepresenterPointLJE
from ..influence.tracin import TracIn
from ..influence.trak import TRAK
from ..model.influence_model import InfluenceModel
from ..model.projection import Projection
from .training import TrainedModel


class MethodFactory(ABC):
    """A method of the benchmarks.

    Attributes
    ----------
    needs_checkpoints
        Whether the model must be trained with TracIn checkpoints.
    pairwise
        Whether :meth:`attribute` (test × train attributions) is available.
    """

    needs_checkpoints: bool = False
    pairwise: bool = False

    @abstractmethod
    def score(self, trained: TrainedModel, train_set: tf.data.Dataset) -> np.ndarray:
        """Scores of the samples of ``train_set`` (batched, fixed order), shape ``(n,)``, higher = more suspicious."""

    def attribute(
        self, trained: TrainedModel, train_set: tf.data.Dataset, test_set: tf.data.Dataset, measurement: str = "margin"
    ) -> np.ndarray:
        """Datamodel weights ``τ(t, i)``: the predicted change of the measurement of test sample ``t``
        when training sample ``i`` is included in the training set, shape ``(m, n)``.

        Raises
        ------
        TypeError
            For a method that only scores training samples (``pairwise = False``).
        """
        raise TypeError(
            f"{type(self).__name__} only scores training samples (self-influence); it cannot attribute test "
            "predictions to training samples. Choose a method with pairwise=True."
        )


def _influence_model(trained: TrainedModel, start_layer=None, last_layer=None) -> InfluenceModel:
    return InfluenceModel(
        trained.model, start_layer=start_layer, last_layer=last_layer, loss_function=trained.loss_function
    )


class CalculatorFactory(MethodFactory):
    """A method backed by an influence calculator: the score is the self-influence, the attribution
    ``effect_sign`` times the pairwise influence values."""

    pairwise = True
    effect_sign: float = -1.0

    @abstractmethod
    def build(self, trained: TrainedModel, train_set: tf.data.Dataset, measurement: str | None = None):
        """The influence calculator for the trained model, its training set and the query-side measurement."""

    def score(self, trained: TrainedModel, train_set: tf.data.Dataset) -> np.ndarray:
        calculator = self.build(trained, train_set)
        return extract_only_values(calculator.compute_influence_values(train_set)).numpy()

    def attribute(self, trained, train_set, test_set, measurement="margin") -> np.ndarray:
        if not self.pairwise:
            return super().attribute(trained, train_set, test_set, measurement)
        calculator = self.build(trained, train_set, measurement)
        rows = []
        for _, values in calculator.estimate_influence_values_in_batches(test_set, train_set):
            rows.append(np.concatenate([block.numpy() for _, block in values], axis=1))
        return self.effect_sign * np.concatenate(rows, axis=0).astype(np.float64)


@dataclass(frozen=True)
class FirstOrderFactory(CalculatorFactory):
    """First-order influence functions (Koh & Liang 2017) or RelatIF (``normalize=True``).

    Parameters
    ----------
    ihvp
        ``'exact'``, ``'cgd'``, ``'lissa'``, ``'kfac'`` or ``'ekfac'``.
    damping
        λ of ``(H + λI)⁻¹``; 0 takes the pseudo-inverse (exact only).
    start_layer, last_layer
        First and last watched layers (None: the last layer with weights; ``start_layer=0,
        last_layer=-1`` watches every layer).
    n_opt_iters
        Iterations of CG / LiSSA.
    lissa_scale
        LiSSA's scale (must exceed the largest Hessian eigenvalue).
    n_samples_for_hessian
        Average the Hessian over this many training samples (all when None).
    normalize
        RelatIF normalization.
    hessian
        How the exact solver builds ``H``: ``'gauss_newton'`` (closed form for a last Dense layer
        under softmax cross-entropy, where it equals the Hessian), ``'exact'`` (jacobian of the
        gradient, any model) or ``'auto'`` (the closed form where it applies, else exact).
    curvature
        The curvature CG and LiSSA invert (see :class:`~influence_lib.curvature.factory.CGDIHVPFactory`):
        ``'auto'``, ``'ggn'`` (Gauss-Newton products) or ``'hessian'``.
    """

    ihvp: str = "exact"
    damping: float = 0.0
    start_layer: int | str | None = None
    last_layer: int | str | None = None
    n_opt_iters: int = 100
    lissa_scale: float = 10.0
    n_samples_for_hessian: int | None = None
    normalize: bool = False
    hessian: str = "auto"
    curvature: str = "auto"

    def _exact_ihvp(self, model: InfluenceModel, hessian_set: tf.data.Dataset) -> ExactIHVP:
        if self.hessian not in ("auto", "exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'auto', 'exact' or 'gauss_newton', got {self.hessian!r}.")
        if self.hessian == "auto":
            try:
                return ExactIHVP(model, hessian_set, damping=self.damping, show_progress=False, hessian="gauss_newton")
            except ValueError as error:
                if "gauss_newton" not in str(error):
                    raise
        hessian = "exact" if self.hessian == "auto" else self.hessian
        return ExactIHVP(model, hessian_set, damping=self.damping, show_progress=False, hessian=hessian)

    def _ihvp_factory(self) -> InverseHessianVectorProductFactory:
        factories = {
            "exact": ExactIHVPFactory(self.damping, show_progress=False),
            "cgd": CGDIHVPFactory(self.n_opt_iters, self.damping, curvature=self.curvature),
            "lissa": LissaIHVPFactory(self.n_opt_iters, self.damping, self.lissa_scale, curvature=self.curvature),
            "kfac": KFACIHVPFactory(self.damping, show_progress=False),
            "ekfac": KFACIHVPFactory(self.damping, corrected_eigenvalues=True, show_progress=False),
        }
        if self.ihvp not in factories:
            raise ValueError(f"ihvp must be one of {sorted(factories)}, got {self.ihvp!r}.")
        return factories[self.ihvp]

    def build(self, trained, train_set, measurement=None) -> FirstOrderInfluenceCalculator:
        model = _influence_model(trained, self.start_layer, self.last_layer)
        hessian_set = hessian_subset(train_set, self.n_samples_for_hessian, 10000, trained.seed)
        if self.ihvp == "exact":
            ihvp = self._exact_ihvp(model, hessian_set)
        else:
            ihvp = self._ihvp_factory().build(model, hessian_set)
        return FirstOrderInfluenceCalculator(
            model, hessian_set, ihvp, normalize=self.normalize, show_progress=False, measurement=measurement,
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
    start_layer, last_layer
        First and last watched layers (None: the last layer with weights).
    """

    subspace_dim: int = 200
    k_largest_eig_vals: int | None = 100
    damping: float = 0.0
    start_layer: int | str | None = None
    last_layer: int | str | None = None

    def build(self, trained, train_set, measurement=None) -> ArnoldiInfluenceCalculator:
        model = _influence_model(trained, self.start_layer, self.last_layer)
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
            measurement=measurement,
        )


@dataclass(frozen=True)
class TracInFactory(CalculatorFactory):
    """TracInCP over the checkpoints saved during training (Pruthi et al. 2020), on the layers from
    ``start_layer`` to ``last_layer`` (None: the last layer with weights)."""

    needs_checkpoints = True
    start_layer: int | str | None = None
    last_layer: int | str | None = None

    def build(self, trained, train_set, measurement=None) -> TracIn:
        if trained.checkpoint_callback is None:
            raise ValueError("TracIn needs the checkpoints of training: train with a checkpoint_directory.")
        return TracIn.from_callback(
            trained.checkpoint_callback, show_progress=False, measurement=measurement, start_layer=self.start_layer,
            last_layer=self.last_layer, loss_function=trained.loss_function,
        )


class _TRAKAttribution(CalculatorFactory):
    """TRAK's sign: its pairwise values predict the change of the margin when the training sample is
    included (``effect_sign = +1``); with the loss as measurement they predict minus the change of the loss."""

    effect_sign = 1.0

    def attribute(self, trained, train_set, test_set, measurement="margin") -> np.ndarray:
        values = super().attribute(trained, train_set, test_set, measurement)
        return values if measurement == "margin" else -values


@dataclass(frozen=True)
class TRAKFactory(_TRAKAttribution):
    """TRAK (Park et al. 2023) on the explained model, or on the checkpoints of its training run.

    Its pairwise values predict the change of the margin when the training sample is included
    (``effect_sign = +1``); with the loss as measurement they predict minus the change of the loss.

    Parameters
    ----------
    dimension
        Projected dimension ``k`` (None: no projection, ``k = P``).
    structured
        Structured (Kronecker) projection of Dense and Conv layers.
    damping
        λ of ``(ΦᵀΦ + λI)⁻¹`` (0: pseudo-inverse).
    checkpoints
        An ensemble over the TracIn checkpoints saved during training instead of the final model.
    start_layer, last_layer
        First and last watched layers (None: the last layer with weights; ``start_layer=0,
        last_layer=-1`` watches every layer).
    """

    dimension: int | None = 2048
    structured: bool = True
    damping: float = 0.0
    checkpoints: bool = False
    start_layer: int | str | None = None
    last_layer: int | str | None = None

    @property
    def needs_checkpoints(self) -> bool:
        return self.checkpoints

    def build(self, trained, train_set, measurement=None) -> TRAK:
        settings = _trak_settings(self, trained, measurement)
        if not self.checkpoints:
            return TRAK.from_models([trained.model], train_set, **settings)
        if trained.checkpoint_callback is None or not trained.checkpoint_callback.checkpoints:
            raise ValueError("TRAK over checkpoints needs the checkpoints of training: train with a checkpoint_directory.")
        paths = [path for path, _ in trained.checkpoint_callback.checkpoints]
        return TRAK.from_checkpoints(trained.model, paths, train_set, **settings)


def _trak_settings(factory, trained: TrainedModel, measurement: str | None) -> dict:
    """Keyword arguments of :meth:`TRAK.from_models` from a TRAK factory's fields."""
    projection = None if factory.dimension is None else Projection(
        factory.dimension, seed=trained.seed, structured=factory.structured
    )
    return dict(projection=projection, damping=factory.damping, measurement=measurement or "margin",
                show_progress=False, start_layer=factory.start_layer, last_layer=factory.last_layer,
                loss_function=trained.loss_function)


@dataclass(frozen=True)
class TRAKEnsembleFactory(_TRAKAttribution):
    """TRAK over an ensemble of ``models`` independently trained models (Park et al. 2023; dattri's TRAK-10/50).

    The models are trained with the explained model's own training procedure, from other seeds,
    each on a random ``alpha``-subset of the training set (the paper's and dattri's choice;
    ``alpha=1`` trains on the whole set), by the
    :class:`~influence_lib.benchmark.retraining.IndependentModels` the benchmark attaches to the
    trained model (stored beside the ground truth and reused across runs; an ensemble of 10 is the
    first 10 models of an ensemble of 50). The explained model itself is not in the ensemble.

    Parameters
    ----------
    models
        Ensemble size ``M``.
    alpha
        Fraction of the training set each model is trained on, in ``(0, 1]``.
    dimension, structured, damping
        As for :class:`TRAKFactory`.
    start_layer, last_layer
        First and last watched layers (default every layer, as in the paper and dattri; None, None:
        the last layer with weights).
    """

    models: int = 10
    alpha: float = 0.5
    dimension: int | None = 2048
    structured: bool = True
    damping: float = 0.0
    start_layer: int | str | None = 0
    last_layer: int | str | None = -1

    def build(self, trained, train_set, measurement=None) -> TRAK:
        if isinstance(self.models, bool) or not isinstance(self.models, int) or self.models < 1:
            raise ValueError(f"models (ensemble size) must be a positive integer, got {self.models!r}.")
        provider = trained.independent_models
        if provider is None:
            raise ValueError(
                "trak_ensemble needs independently trained models: set trained.independent_models to an "
                "influence_lib.benchmark.IndependentModels (the benchmark evaluators do)."
            )
        models = provider.models(trained.model, self.models, self.alpha)
        return TRAK.from_models(models, train_set, **_trak_settings(self, trained, measurement))


@dataclass(frozen=True)
class GradSimilarityFactory(CalculatorFactory):
    """GradDot (or GradCos with ``cosine=True``): gradient similarity at the final weights.

    Parameters
    ----------
    cosine
        Cosine similarity instead of the dot product.
    dimension
        Random projection of the gradients to this dimension (None: exact gradients).
    start_layer, last_layer
        First and last watched layers (None: the last layer with weights; ``start_layer=0,
        last_layer=-1`` watches every layer).
    """

    cosine: bool = False
    dimension: int | None = None
    start_layer: int | str | None = None
    last_layer: int | str | None = None

    def build(self, trained, train_set, measurement=None) -> GradDot:
        projection = None if self.dimension is None else Projection(self.dimension, seed=trained.seed)
        calculator = GradCos if self.cosine else GradDot
        model = _influence_model(trained, self.start_layer, self.last_layer)
        return calculator(model, projection, measurement, show_progress=False)


@dataclass(frozen=True)
class RepresenterL2Factory(CalculatorFactory):
    """Representer points of an L2-regularized last layer (Yeh et al. 2018).

    Its pairwise values are contributions to the logit of the predicted class (``effect_sign = +1``);
    the query side has no measurement to choose.
    """

    effect_sign = 1.0
    lambda_regularization: float = 1e-3
    epochs: int = 100

    def build(self, trained, train_set, measurement=None) -> RepresenterPointL2:
        return RepresenterPointL2(
            trained.model,
            train_set,
            trained.loss_function or keras.losses.CategoricalCrossentropy(reduction=None),
            self.lambda_regularization,
            epochs=self.epochs,
            show_progress=False,
        )


@dataclass(frozen=True)
class RepresenterLJEFactory(CalculatorFactory):
    """Representer points by local Jacobian expansion of the last layer (Sui et al. 2021).

    Its pairwise values are contributions to the logit of the predicted class (``effect_sign = +1``).
    """

    effect_sign = 1.0
    damping: float = 1e-2
    epsilon: float = 1e-5

    def build(self, trained, train_set, measurement=None) -> RepresenterPointLJE:
        return RepresenterPointLJE(
            _influence_model(trained),
            train_set,
            ExactIHVPFactory(self.damping, show_progress=False),
            epsilon=self.epsilon,
            seed=trained.seed,
            show_progress=False,
        )


@dataclass(frozen=True)
class WeightsBoundaryFactory(CalculatorFactory):
    """Minus the distance in last-layer weight space to the boundary that flips each sample."""

    pairwise = False
    step_nbr: int = 100
    norm_type: float = 2

    def build(self, trained, train_set, measurement=None) -> WeightsBoundaryCalculator:
        return WeightsBoundaryCalculator(trained.model, self.step_nbr, self.norm_type, show_progress=False)


@dataclass(frozen=True)
class SampleBoundaryFactory(CalculatorFactory):
    """Minus the input-space distance (DeepFool) from each sample to the decision boundary."""

    pairwise = False
    step_nbr: int = 100

    def build(self, trained, train_set, measurement=None) -> SampleBoundaryCalculator:
        return SampleBoundaryCalculator(trained.model, self.step_nbr, show_progress=False)


@dataclass(frozen=True)
class LossFactory(MethodFactory):
    """Baseline: the training loss of each sample."""

    def score(self, trained, train_set) -> np.ndarray:
        return _influence_model(trained).batch_loss(train_set).numpy()


@dataclass(frozen=True)
class GradientNormFactory(MethodFactory):
    """Baseline: the norm of each sample's loss gradient with respect to the watched weights."""

    start_layer: int | str | None = None

    def score(self, trained, train_set) -> np.ndarray:
        model = _influence_model(trained, self.start_layer)
        batches = iterate_batches(train_set, "train_set")
        squared_norms = [model.batch_gradient_norm_sq_tensor(batch) for batch in batches]
        return np.sqrt(tf.concat(squared_norms, axis=0).numpy())


@dataclass(frozen=True)
class RandomFactory(MethodFactory):
    """Baseline: uniform random scores (drawn from the run's seed); its expected ROC-AUC is 0.5 and
    its expected LDS 0."""

    pairwise = True

    def score(self, trained, train_set) -> np.ndarray:
        return np.random.default_rng(trained.seed).random(_count(train_set, "train_set"))

    def attribute(self, trained, train_set, test_set, measurement="margin") -> np.ndarray:
        shape = (_count(test_set, "test_set"), _count(train_set, "train_set"))
        return np.random.default_rng(trained.seed).standard_normal(shape)


def _count(dataset: tf.data.Dataset, name: str) -> int:
    return sum(int(tf.shape(batch[0])[0]) for batch in iterate_batches(dataset, name))


METHODS: dict[str, MethodFactory] = {
    "first_order_exact": FirstOrderFactory("exact"),
    "first_order_cg": FirstOrderFactory("cgd", damping=1e-2, n_opt_iters=30, n_samples_for_hessian=512),
    "first_order_lissa": FirstOrderFactory("lissa", damping=1e-2, n_opt_iters=100, n_samples_for_hessian=512),
    "first_order_arnoldi": ArnoldiFactory(),
    "first_order_cg_all": FirstOrderFactory(
        "cgd", damping="auto", start_layer=0, last_layer=-1, n_opt_iters=30, n_samples_for_hessian=512, curvature="ggn"
    ),
    "first_order_kfac": FirstOrderFactory("kfac", damping="heuristic", start_layer=0, last_layer=-1),
    "first_order_ekfac": FirstOrderFactory("ekfac", damping="heuristic", start_layer=0, last_layer=-1),
    "relatif": FirstOrderFactory("exact", normalize=True),
    "tracin": TracInFactory(),
    "trak": TRAKFactory(),
    "trak_checkpoints": TRAKFactory(checkpoints=True),
    "trak_ensemble": TRAKEnsembleFactory(),
    "grad_dot": GradSimilarityFactory(),
    "grad_cos": GradSimilarityFactory(cosine=True),
    "rps_l2": RepresenterL2Factory(),
    "rps_lje": RepresenterLJEFactory(),
    "weights_boundary": WeightsBoundaryFactory(),
    "sample_boundary": SampleBoundaryFactory(),
    "loss": LossFactory(),
    "gradient_norm": GradientNormFactory(),
    "random": RandomFactory(),
}


def resolve_methods(names: str | list[str], pairwise_only: bool = False) -> dict[str, MethodFactory]:
    """``'all'``, a comma-separated string or a list of names from :data:`METHODS` to their factories.

    With ``pairwise_only``, ``'all'`` means every method that can attribute test predictions
    (``pairwise = True``), and naming another one is an error.
    """
    if isinstance(names, str):
        if names.strip().lower() == "all":
            names = [name for name, factory in METHODS.items() if factory.pairwise or not pairwise_only]
        else:
            names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise ValueError(f"Unknown or no method(s) {unknown}; choose among {list(METHODS)} or 'all'.")
    if pairwise_only:
        self_only = [name for name in names if not METHODS[name].pairwise]
        if self_only:
            raise ValueError(
                f"Method(s) {self_only} only score training samples (self-influence) and cannot attribute test "
                f"predictions; choose among {[name for name, f in METHODS.items() if f.pairwise]}."
            )
    return {name: METHODS[name] for name in names}


def parse_setting(text: str) -> tuple[str, object]:
    """``'key=value'`` → ``(key, value)`` with the value read as an int, a float, a bool, None or a string."""
    key, separator, raw = str(text).partition("=")
    if not separator or not key.strip():
        raise ValueError(f"A setting must look like field=value or method.field=value, got {text!r}.")
    raw = raw.strip()
    words = {"none": None, "true": True, "false": False}
    if raw.lower() in words:
        return key.strip(), words[raw.lower()]
    for kind in (int, float):
        try:
            return key.strip(), kind(raw)
        except ValueError:
            pass
    return key.strip(), raw


def method_fields(factory: MethodFactory) -> dict[str, object]:
    """The hyper-parameters of a factory (its dataclass fields) and their values."""
    if not dataclasses.is_dataclass(factory):
        return {}
    return {field.name: getattr(factory, field.name) for field in dataclasses.fields(factory)}


def _coerced(name: str, field: str, current, value):
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name}.{field} must be an integer, got {value!r}.")
        return int(value)
    return value


def configure(factories: Mapping[str, MethodFactory], settings: Mapping[str, object]) -> dict[str, MethodFactory]:
    """Copies of ``factories`` with hyper-parameters changed.

    Parameters
    ----------
    factories
        Method name → factory.
    settings
        ``{"field": value}`` sets the field in every method that has it (e.g. ``damping``);
        ``{"method.field": value}`` in that method only (e.g. ``first_order_cg.n_opt_iters``).

    Raises
    ------
    ValueError
        A setting that names an unknown method, or a field that no chosen method has (the message
        lists the fields there are).
    """
    configured = dict(factories)
    for key, value in settings.items():
        method, _, field = key.rpartition(".")
        targets = [method] if method else [name for name in configured if field in method_fields(configured[name])]
        if method and method not in configured:
            raise ValueError(f"Setting {key!r} names method {method!r}, which is not among {list(configured)}.")
        if not targets or (method and field not in method_fields(configured[method])):
            available = sorted(
                {f"{name}.{name_field}" for name in configured for name_field in method_fields(configured[name])}
            )
            raise ValueError(f"No chosen method has a field {field!r} (setting {key!r}); fields: {available}.")
        for name in targets:
            current = method_fields(configured[name])[field]
            configured[name] = dataclasses.replace(configured[name], **{field: _coerced(name, field, current, value)})
    return configured


DEFAULT_DAMPING_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def sweep_damping(
    factories: Mapping[str, MethodFactory], values: Sequence[float] = DEFAULT_DAMPING_GRID
) -> dict[str, MethodFactory]:
    """Every method with a ``damping`` field once per value, named ``'method[damping=v]'``; the others as is."""
    if not values or any(not np.isfinite(value) or value < 0 for value in values):
        raise ValueError(f"The damping grid must be non-empty finite values ≥ 0, got {list(values)!r}.")
    swept: dict[str, MethodFactory] = {}
    for name, factory in factories.items():
        if "damping" not in method_fields(factory):
            swept[name] = factory
            continue
        for value in values:
            swept[f"{name}[damping={value:g}]"] = dataclasses.replace(factory, damping=float(value))
    return swept
