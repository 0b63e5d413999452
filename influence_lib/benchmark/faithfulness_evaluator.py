"""The faithfulness benchmark: LDS and leave-one-out correlation of every method against retraining.

Protocol (Park et al., ICML 2023 for the LDS; dattri, Deng et al., NeurIPS 2024 D&B, for the
MNIST-10 settings):

1. Train the model to explain on the whole training set (seed ``setup.training_seed``, with TracIn
   checkpoints when a method needs them).
2. Ground truth: train ``M`` models on random α-subsets and record the measurement (margin or
   loss) of every test sample; optionally a second run with other training seeds on the same
   subsets (the noise ceiling) and leave-one-out retrainings of ``K`` training samples. All of it
   is stored and resumable (:mod:`~influence_lib.benchmark.retraining`), as are the independently
   trained models of the ensemble methods (:class:`~influence_lib.benchmark.retraining.IndependentModels`).
3. Every method attributes every test sample to every training sample
   (:meth:`~influence_lib.benchmark.factories.MethodFactory.attribute`, timed) and is scored by
   :func:`~influence_lib.benchmark.faithfulness.linear_datamodeling_score` and
   :func:`~influence_lib.benchmark.faithfulness.loo_correlation`.

A method that fails on the model (e.g. RPS-LJE on a last layer with a bias) is reported with its
error instead of a score; the other methods still run. With a store, each method's attribution
matrix is also cached (float32, keyed by the factory's settings, a hash of the explained
model's weights and a hash of the library's source, so that a changed default is never read from an
older run's cache), so a killed run resumes after the last finished method and a re-run with more
ground truth (e.g. leave-one-out added) re-scores without recomputing.
"""
import dataclasses
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ..common.progress import progress
from ..common.storage import ShardStore, digest, fingerprint_variables, library_fingerprint
from .factories import MethodFactory
from .faithfulness import (
    CorrelationSummary,
    LeaveOneOutGroundTruth,
    NoiseCeiling,
    SubsetGroundTruth,
    linear_datamodeling_score,
    loo_correlation,
    noise_ceiling,
)
from .retraining import (
    IndependentModels,
    RetrainingData,
    SubsetRetraining,
    procedure_settings,
    retrain_leave_one_out,
    retrain_on_subsets,
)
from .training import TrainedModel, TrainingProcedure

CEILING_SEED_OFFSET = 1_000_000


@dataclass
class FaithfulnessResult:
    """One method's faithfulness.

    Attributes
    ----------
    name
        Method name.
    lds
        Linear datamodeling score (mean ± standard error over test samples); None if the method failed.
    loo
        ``{"pearson": …, "spearman": …}`` leave-one-out correlations, when LOO ground truth was asked.
    seconds
        Wall time of the method's attributions (building its calculator included).
    error
        Why the method could not run on this model, else None.
    """

    name: str
    lds: CorrelationSummary | None
    loo: dict[str, CorrelationSummary] | None
    seconds: float
    error: str | None = None

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {
            "lds": None if self.lds is None else self.lds.to_dict(),
            "loo": None if self.loo is None else {key: value.to_dict() for key, value in self.loo.items()},
            "seconds": self.seconds,
            "error": self.error,
        }


def _check_count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer ≥ {minimum}, got {value!r}.")
    return int(value)


class FaithfulnessEvaluator:
    """LDS and leave-one-out benchmark of attribution methods against retraining.

    Parameters
    ----------
    data
        Training and test arrays (one-hot labels).
    training_procedure
        How every model is trained (e.g. :class:`~influence_lib.benchmark.training.SGDTrainingProcedure`).
    setup
        α, number of subsets ``M``, seeds and measurement of the LDS ground truth.
    noise_ceiling
        Also retrain every subset with other training seeds and report the noise ceiling
        (doubles the retraining cost).
    nb_loo
        Number ``K`` of training samples for leave-one-out retraining (0: no LOO); drawn with
        ``setup.subset_seed``.
    store_path
        Directory of the resumable ground-truth stores (None: recomputed in memory every time).
    influence_batch_size
        Batch size of the datasets given to the methods.
    show_progress
        Progress bars (models retrained, methods evaluated).
    """

    def __init__(
        self,
        data: RetrainingData,
        training_procedure: TrainingProcedure,
        setup: SubsetRetraining = SubsetRetraining(),
        noise_ceiling: bool = True,
        nb_loo: int = 0,
        store_path: str | None = None,
        influence_batch_size: int = 256,
        show_progress: bool = True,
    ):
        if not isinstance(data, RetrainingData):
            raise TypeError(f"data must be a RetrainingData, got {type(data).__name__}.")
        if not isinstance(training_procedure, TrainingProcedure):
            raise TypeError(f"training_procedure must be a TrainingProcedure, got {type(training_procedure).__name__}.")
        if not isinstance(setup, SubsetRetraining):
            raise TypeError(f"setup must be a SubsetRetraining, got {type(setup).__name__}.")
        self.nb_loo = _check_count(nb_loo, "nb_loo", 0)
        if 0 < self.nb_loo < 3 or self.nb_loo > len(data.x_train):
            raise ValueError(
                f"nb_loo must be 0 or between 3 and the number of training samples ({len(data.x_train)}), got {nb_loo}."
            )
        self.influence_batch_size = _check_count(influence_batch_size, "influence_batch_size", 1)
        self.data = data
        self.training_procedure = training_procedure
        self.setup = setup
        self.with_noise_ceiling = bool(noise_ceiling)
        self.store_path = store_path
        self.show_progress = show_progress
        self._ground_truth: SubsetGroundTruth | None = None
        self._ceiling: NoiseCeiling | None = None
        self._loo: LeaveOneOutGroundTruth | None = None
        self.model_accuracy: tuple[float, float] | None = None

    def _store(self, name: str) -> str | None:
        return None if self.store_path is None else os.path.join(self.store_path, name)

    def ground_truth(self) -> SubsetGroundTruth:
        """The subset-retraining ground truth (computed, or read from the store, once)."""
        if self._ground_truth is None:
            self._ground_truth = retrain_on_subsets(
                self.training_procedure, self.data, self.setup, self._store("subsets"), self.show_progress
            )
        return self._ground_truth

    def noise_ceiling(self) -> NoiseCeiling | None:
        """The noise ceiling from a second run with training seeds offset by 1,000,000 (None when not asked)."""
        if self.with_noise_ceiling and self._ceiling is None:
            second_setup = dataclasses.replace(self.setup, training_seed=self.setup.training_seed + CEILING_SEED_OFFSET)
            second = retrain_on_subsets(
                self.training_procedure, self.data, second_setup, self._store("subsets_other_seeds"), self.show_progress
            )
            self._ceiling = noise_ceiling(self.ground_truth(), second)
        return self._ceiling

    def removed_samples(self) -> np.ndarray:
        """The training samples left out one at a time (sorted), ``(K,)``."""
        rng = np.random.default_rng(self.setup.subset_seed)
        return np.sort(rng.choice(len(self.data.x_train), size=self.nb_loo, replace=False)).astype(np.int64)

    def loo_ground_truth(self) -> LeaveOneOutGroundTruth | None:
        """The leave-one-out ground truth (None when ``nb_loo = 0``)."""
        if self.nb_loo and self._loo is None:
            self._loo = retrain_leave_one_out(
                self.training_procedure, self.data, self.removed_samples(), self.setup.training_seed,
                self.setup.measurement, self._store("leave_one_out"), self.show_progress,
            )
        return self._loo

    def independent_models(self) -> IndependentModels:
        """The models an ensemble method (``trak_ensemble``) trains besides the explained one, stored
        under ``STORE/independent_models`` (trained on demand, reused by later runs)."""
        return IndependentModels(
            self.training_procedure, self.data, self._store("independent_models"), self.setup.training_seed,
            self.show_progress,
        )

    def _datasets(self) -> tuple[tf.data.Dataset, tf.data.Dataset]:
        train_set = tf.data.Dataset.from_tensor_slices((self.data.x_train, self.data.y_train))
        test_set = tf.data.Dataset.from_tensor_slices((self.data.x_test, self.data.y_test))
        return train_set.batch(self.influence_batch_size), test_set.batch(self.influence_batch_size)

    def train_model(self, checkpoint_directory: str | None = None) -> TrainedModel:
        """The model to explain: trained on the whole training set with seed ``setup.training_seed``."""
        keras.backend.clear_session()
        return self.training_procedure.train(
            self.data.x_train, self.data.y_train, self.data.x_test, self.data.y_test, self.setup.training_seed,
            checkpoint_directory,
        )

    def evaluate(self, factories: Mapping[str, MethodFactory]) -> dict[str, FaithfulnessResult]:
        """Score every method: LDS (and LOO correlations when ``nb_loo > 0``) with wall times.

        The ground truth is computed (or read back from the store) first, then the model to
        explain is trained once and shared by all methods.

        Returns
        -------
        dict
            Method name → :class:`FaithfulnessResult`, in the order of ``factories``.
        """
        if not isinstance(factories, Mapping) or not factories:
            raise ValueError("factories must be a non-empty mapping of method name → MethodFactory.")
        for name, factory in factories.items():
            if not isinstance(factory, MethodFactory):
                raise TypeError(f"factories[{name!r}] must be a MethodFactory, got {type(factory).__name__}.")
            if not factory.pairwise:
                raise ValueError(
                    f"Method {name!r} ({type(factory).__name__}) only scores training samples; the faithfulness "
                    "benchmark needs test × train attributions. Drop it from the methods."
                )
        ground_truth = self.ground_truth()
        self.noise_ceiling()
        loo = self.loo_ground_truth()
        needs_checkpoints = any(factory.needs_checkpoints for factory in factories.values())
        train_set, test_set = self._datasets()
        results = {}
        with tempfile.TemporaryDirectory(prefix="influence_faithfulness_") as scratch:
            trained = self.train_model(scratch if needs_checkpoints else None)
            trained.independent_models = self.independent_models()
            self.model_accuracy = (trained.train_accuracy, trained.test_accuracy)
            cache = self._attribution_cache()
            model_hash = fingerprint_variables(trained.model.weights)
            library = library_fingerprint()
            for name, factory in progress(factories.items(), self.show_progress, "Methods", len(factories)):
                key = "method_" + digest({"factory": repr(factory), "model": model_hash, "library": library})[:32]
                results[name] = self._evaluate_method(
                    name, factory, trained, train_set, test_set, ground_truth, loo, cache, key
                )
        return results

    def _attribution_cache(self) -> ShardStore | None:
        """Attributions already computed, keyed by the factory's settings and the explained model's weights."""
        if self.store_path is None:
            return None
        fingerprint = {
            "kind": "attributions",
            "data": self.data.fingerprint(),
            "procedure": procedure_settings(self.training_procedure),
            "training_seed": self.setup.training_seed,
            "measurement": self.setup.measurement,
            "influence_batch_size": self.influence_batch_size,
        }
        return ShardStore(os.path.join(self.store_path, "attributions"), fingerprint, what="attribution cache")

    def _attributions(self, factory, trained, train_set, test_set, cache, key) -> tuple[np.ndarray, float]:
        if cache is not None and cache.has(key):
            stored = cache.read(key)
            return stored["scores"].astype(np.float64), float(stored["seconds"])
        start = time.perf_counter()
        scores = np.asarray(factory.attribute(trained, train_set, test_set, self.setup.measurement), np.float64)
        seconds = time.perf_counter() - start
        expected = (len(self.data.x_test), len(self.data.x_train))
        if scores.shape != expected:
            raise RuntimeError(
                f"{type(factory).__name__} returned attributions of shape {scores.shape}, expected {expected}."
            )
        if cache is not None and np.isfinite(scores).all():
            cache.write(key, scores=scores.astype(np.float32), seconds=np.float64(seconds))
        return scores, seconds

    def _evaluate_method(
        self, name, factory, trained, train_set, test_set, ground_truth, loo, cache=None, key=None
    ) -> FaithfulnessResult:
        start = time.perf_counter()
        try:
            scores, seconds = self._attributions(factory, trained, train_set, test_set, cache, key)
        except (ValueError, TypeError, NotImplementedError) as error:
            return FaithfulnessResult(name, None, None, time.perf_counter() - start, f"{type(error).__name__}: {error}")
        if not np.isfinite(scores).all():
            return FaithfulnessResult(name, None, None, seconds, "FloatingPointError: non-finite attributions")
        lds = linear_datamodeling_score(scores, ground_truth)
        loo_summary = None if loo is None else loo_correlation(scores, loo)
        return FaithfulnessResult(name, lds, loo_summary, seconds)

    def config(self) -> dict:
        """The benchmark settings, as stored with the results (with the explained model's train and
        test accuracy once :meth:`evaluate` has trained it)."""
        return {
            "nb_train": int(len(self.data.x_train)),
            "nb_test": int(len(self.data.x_test)),
            "setup": dataclasses.asdict(self.setup),
            "noise_ceiling": self.with_noise_ceiling,
            "nb_loo": self.nb_loo,
            "influence_batch_size": self.influence_batch_size,
            "training_procedure": repr(self.training_procedure),
            "model_train_test_accuracy": self.model_accuracy,
        }
