"""The mislabel-detection benchmark: plant label noise, train, rank training samples, score the ranking.

For every seed: flip an exact fraction of the training labels (each to another class), train a
model on the noisy labels (saving TracIn checkpoints when a method needs them), then let every
method score every training sample. A method is good when the flipped samples get the highest
scores: the benchmark reports the ROC-AUC of the scores for "is flipped", the detection curve
(fraction of flipped labels found vs fraction of data inspected) and its area, and the wall time
of each method. The model is trained once per seed and shared by all methods, so they are
compared on the same noisy dataset and the same weights.

This is the protocol of Influenciae's ``MislabelingDetectorEvaluator`` (itself following Koh &
Liang 2017, §5.4), with the exact ROC-AUC instead of the mean of the detection curve.
"""
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from ..common.progress import progress
from .factories import MethodFactory
from .label_noise import flip_labels
from .metrics import detection_curve, detection_curve_area, roc_auc
from .retraining import IndependentModels, RetrainingData
from .training import InfluenciaeTrainingProcedure, TrainingProcedure


@dataclass
class RunResult:
    """One method on one seed.

    Attributes
    ----------
    seed
        Seed of the label flips and the training.
    roc_auc
        Exact ROC-AUC of the scores for "is flipped".
    curve_area
        Area under the detection curve.
    fraction_found
        Detection curve: fraction of the flipped samples among the top ``k`` scores, ``k = 0 … n``.
    seconds
        Wall time of the method (building its calculator and scoring every training sample).
    train_accuracy, test_accuracy
        Accuracy of the model of this seed on the noisy training labels and on the test set.
    scores
        The method's score of every training sample, shape ``(n,)``.
    flipped_indices
        Indices of the flipped training samples.
    """

    seed: int
    roc_auc: float
    curve_area: float
    fraction_found: np.ndarray = field(repr=False)
    seconds: float
    train_accuracy: float
    test_accuracy: float
    scores: np.ndarray = field(repr=False)
    flipped_indices: np.ndarray = field(repr=False)


@dataclass
class MethodResult:
    """One method over all seeds; ``mean``/``std`` summarize the runs."""

    name: str
    runs: list[RunResult]

    def _values(self, attribute: str) -> np.ndarray:
        return np.array([getattr(run, attribute) for run in self.runs], dtype=np.float64)

    @property
    def roc_auc_mean(self) -> float:
        return float(self._values("roc_auc").mean())

    @property
    def roc_auc_std(self) -> float:
        return float(self._values("roc_auc").std())

    @property
    def curve_area_mean(self) -> float:
        return float(self._values("curve_area").mean())

    @property
    def curve_area_std(self) -> float:
        return float(self._values("curve_area").std())

    @property
    def seconds_mean(self) -> float:
        return float(self._values("seconds").mean())

    @property
    def seconds_std(self) -> float:
        return float(self._values("seconds").std())

    @property
    def mean_fraction_found(self) -> np.ndarray:
        """Detection curve averaged over the seeds."""
        return np.mean([run.fraction_found for run in self.runs], axis=0)

    def found_at(self, fraction_inspected: float) -> float:
        """Mean over seeds of the fraction of flipped labels found among the top ``fraction_inspected``
        of the training samples (kronfluence's and Influenciae's reading of the detection curve)."""
        if not 0.0 <= fraction_inspected <= 1.0:
            raise ValueError(f"fraction_inspected must be in [0, 1], got {fraction_inspected!r}.")
        return float(np.mean([
            run.fraction_found[int(round(fraction_inspected * (run.fraction_found.size - 1)))] for run in self.runs
        ]))


def _to_numpy(dataset, name: str, nb_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x, integer labels)`` from a pair of arrays or an unbatched dataset of ``(x, y)``."""
    if isinstance(dataset, tf.data.Dataset):
        if len(dataset.element_spec) < 2:
            raise ValueError(f"{name} must yield (inputs, labels) pairs.")
        batches = list(dataset.batch(4096).as_numpy_iterator())
        if not batches:
            raise ValueError(f"{name} is empty.")
        x = np.concatenate([batch[0] for batch in batches])
        y = np.concatenate([batch[1] for batch in batches])
    elif isinstance(dataset, Sequence) and len(dataset) == 2:
        x, y = (np.asarray(part) for part in dataset)
    else:
        raise TypeError(
            f"{name} must be an unbatched tf.data.Dataset of (inputs, labels) or a pair of arrays (x, y), "
            f"got {type(dataset).__name__}."
        )
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(
            f"{name}: inputs and labels must be non-empty and of the same length, got {len(x)} and {len(y)}."
        )
    if y.ndim == 2 and y.shape[1] == nb_classes:
        y = y.argmax(axis=1)
    if y.ndim != 1:
        raise ValueError(
            f"{name}: labels must be class indices (n,) or one-hot (n, {nb_classes}), got shape {y.shape}."
        )
    return x.astype(np.float32), y.astype(np.int64)


class MislabelingDetectorEvaluator:
    """Benchmark of mislabel detectors on a classification dataset with planted label noise.

    Parameters
    ----------
    training_dataset, test_dataset
        Unbatched ``tf.data.Dataset`` of ``(inputs, labels)`` or pairs of arrays ``(x, y)``; labels
        as class indices or one-hot.
    training_procedure
        How to train the model: a :class:`~influence_lib.benchmark.training.TrainingProcedure`
        (e.g. :class:`~influence_lib.benchmark.training.MLPTrainingProcedure`), or an
        Influenciae-style procedure whose ``train(training_dataset, test_dataset, train_batch_size,
        test_batch_size, log_path)`` returns ``(train accuracy, test accuracy, model, info)`` (wrapped
        in :class:`~influence_lib.benchmark.training.InfluenciaeTrainingProcedure`).
    nb_classes
        Number of classes.
    mislabeling_ratio
        Fraction of the training labels flipped (exactly ``round(ratio · n)`` samples).
    train_batch_size, test_batch_size
        Batch sizes handed to an Influenciae-style procedure (a library procedure has its own
        ``batch_size``); Influenciae's signature.
    influence_batch_size
        Batch size of the training set given to the methods (default: ``train_batch_size``).
    config
        Settings saved with the results for traceability (merged into :meth:`config`).
    show_progress
        Show a progress bar over the runs.
    """

    def __init__(
        self,
        training_dataset,
        test_dataset,
        training_procedure: TrainingProcedure,
        nb_classes: int,
        mislabeling_ratio: float,
        train_batch_size: int = 128,
        test_batch_size: int = 128,
        influence_batch_size: int | None = None,
        config: Mapping | None = None,
        show_progress: bool = True,
    ):
        for name, value in (("train_batch_size", train_batch_size), ("test_batch_size", test_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict of settings, got {type(config).__name__}.")
        if influence_batch_size is None:
            influence_batch_size = train_batch_size
        is_influenciae_style = callable(getattr(training_procedure, "train", None))
        if not isinstance(training_procedure, TrainingProcedure) and is_influenciae_style:
            training_procedure = InfluenciaeTrainingProcedure(training_procedure, train_batch_size, test_batch_size)
        if not isinstance(training_procedure, TrainingProcedure):
            raise TypeError(f"training_procedure must be a TrainingProcedure, got {type(training_procedure).__name__}.")
        if not 0.0 < float(mislabeling_ratio) < 1.0:
            raise ValueError(
                "mislabeling_ratio must be in (0, 1) so that both flipped and clean samples exist, "
                f"got {mislabeling_ratio!r}."
            )
        batch_size_is_valid = isinstance(influence_batch_size, int) and not isinstance(influence_batch_size, bool)
        if not batch_size_is_valid or influence_batch_size < 1:
            raise ValueError(f"influence_batch_size must be a positive integer, got {influence_batch_size!r}.")
        self.nb_classes = int(nb_classes)
        self.x_train, self.y_train = _to_numpy(training_dataset, "training_dataset", self.nb_classes)
        self.x_test, self.y_test = _to_numpy(test_dataset, "test_dataset", self.nb_classes)
        if round(float(mislabeling_ratio) * len(self.y_train)) < 1:
            raise ValueError(
                f"mislabeling_ratio={mislabeling_ratio} flips no label of {len(self.y_train)} training samples; "
                "raise it."
            )
        self.training_procedure = training_procedure
        self.mislabeling_ratio = float(mislabeling_ratio)
        self.influence_batch_size = influence_batch_size
        self.train_batch_size = train_batch_size
        self.test_batch_size = test_batch_size
        self.user_config = dict(config or {})
        self.show_progress = show_progress

    def _one_hot(self, labels: np.ndarray) -> np.ndarray:
        return np.eye(self.nb_classes, dtype=np.float32)[labels]

    def bench(
        self,
        factories: Mapping[str, MethodFactory],
        nbr_of_evaluation: int,
        path_to_save: str | None = None,
        seed: int = 0,
    ) -> dict[str, MethodResult]:
        """Evaluate every method on ``nbr_of_evaluation`` seeds (``seed``, ``seed + 1``, …).

        Each seed trains one model that all methods share. With ``path_to_save``, the results
        are written there as ``results.json`` and the detection curves as ``detection_curves.png``.

        Returns
        -------
        dict
            Method name → :class:`MethodResult`, in the order of ``factories``.
        """
        if not isinstance(factories, Mapping) or not factories:
            raise ValueError("factories must be a non-empty mapping of method name → MethodFactory.")
        for name, factory in factories.items():
            if not isinstance(factory, MethodFactory):
                raise TypeError(f"factories[{name!r}] must be a MethodFactory, got {type(factory).__name__}.")
        if isinstance(nbr_of_evaluation, bool) or not isinstance(nbr_of_evaluation, int) or nbr_of_evaluation < 1:
            raise ValueError(f"nbr_of_evaluation must be a positive integer, got {nbr_of_evaluation!r}.")
        needs_checkpoints = any(factory.needs_checkpoints for factory in factories.values())
        runs: dict[str, list[RunResult]] = {name: [] for name in factories}
        for run_seed in progress(range(seed, seed + nbr_of_evaluation), self.show_progress, "Benchmark seeds"):
            with tempfile.TemporaryDirectory(prefix="influence_benchmark_") as scratch:
                for name, run in self._run_seed(factories, run_seed, scratch if needs_checkpoints else None).items():
                    runs[name].append(run)
        results = {name: MethodResult(name, method_runs) for name, method_runs in runs.items()}
        if path_to_save is not None:
            from ..plots.detection_curves import plot_detection_curves
            from .report import save_json

            os.makedirs(path_to_save, exist_ok=True)
            save_json(results, os.path.join(path_to_save, "results.json"), self.config())
            figure = plot_detection_curves(results, mislabeling_ratio=self.mislabeling_ratio)
            figure.savefig(os.path.join(path_to_save, "detection_curves.png"), dpi=120, bbox_inches="tight")
        return results

    def evaluate(
        self, factory: MethodFactory, nbr_of_evaluation: int, seed: int = 0, path_to_save: str | None = None,
        method_name: str = "method",
    ) -> MethodResult:
        """Evaluate one method on ``nbr_of_evaluation`` seeds (see :meth:`bench`)."""
        return self.bench({method_name: factory}, nbr_of_evaluation, path_to_save, seed)[method_name]

    def build_noisy_training_dataset(self, seed: int = 0) -> tuple[tf.data.Dataset, tuple[np.ndarray]]:
        """The training set with ``round(ratio · n)`` labels flipped (seed ``seed``), Influenciae's method.

        Returns
        -------
        noisy_dataset, flipped
            An unbatched dataset of ``(inputs, one-hot noisy labels)``, and the indices of the
            flipped samples wrapped in a 1-tuple as ``np.where`` returns them (Influenciae code
            reads ``flipped[0]``).
        """
        noisy_labels, flipped_indices = flip_labels(self.y_train, self.nb_classes, self.mislabeling_ratio, seed)
        dataset = tf.data.Dataset.from_tensor_slices((self.x_train, self._one_hot(noisy_labels)))
        return dataset, (np.sort(flipped_indices),)

    def config(self) -> dict:
        """The benchmark settings, as stored with the results (with the ``config`` given at construction)."""
        return {
            **self.user_config,
            "train_batch_size": self.train_batch_size,
            "test_batch_size": self.test_batch_size,
            "nb_train": int(len(self.y_train)),
            "nb_test": int(len(self.y_test)),
            "nb_classes": self.nb_classes,
            "mislabeling_ratio": self.mislabeling_ratio,
            "influence_batch_size": self.influence_batch_size,
            "training_procedure": repr(self.training_procedure),
        }

    def _run_seed(
        self, factories: Mapping[str, MethodFactory], seed: int, checkpoint_directory: str | None
    ) -> dict[str, RunResult]:
        noisy_labels, flipped_indices = flip_labels(self.y_train, self.nb_classes, self.mislabeling_ratio, seed)
        is_flipped = np.zeros(len(noisy_labels), dtype=bool)
        is_flipped[flipped_indices] = True
        keras.backend.clear_session()
        y_noisy, y_test = self._one_hot(noisy_labels), self._one_hot(self.y_test)
        trained = self.training_procedure.train(self.x_train, y_noisy, self.x_test, y_test, seed, checkpoint_directory)
        trained.independent_models = IndependentModels(
            self.training_procedure, RetrainingData(self.x_train, y_noisy, self.x_test, y_test), seed=seed,
            show_progress=self.show_progress,
        )
        train_set = tf.data.Dataset.from_tensor_slices((self.x_train, y_noisy)).batch(self.influence_batch_size)
        results = {}
        for name, factory in factories.items():
            start = time.perf_counter()
            scores = np.asarray(factory.score(trained, train_set), dtype=np.float64).reshape(-1)
            seconds = time.perf_counter() - start
            if scores.shape != is_flipped.shape:
                raise ValueError(
                    f"Method {name!r} returned {scores.size} scores for {is_flipped.size} training samples."
                )
            _, fraction_found = detection_curve(scores, is_flipped)
            inspected = np.linspace(0.0, 1.0, fraction_found.size)
            results[name] = RunResult(
                seed=seed,
                roc_auc=roc_auc(scores, is_flipped),
                curve_area=detection_curve_area(inspected, fraction_found),
                fraction_found=fraction_found,
                seconds=seconds,
                train_accuracy=trained.train_accuracy,
                test_accuracy=trained.test_accuracy,
                scores=scores,
                flipped_indices=flipped_indices,
            )
        return results
