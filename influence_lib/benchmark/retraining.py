"""Ground truth by retraining: models trained on random subsets (for the LDS) or without one sample (LOO).

Every retrained model is one shard of a :class:`~influence_lib.common.storage.ShardStore`: the
subset mask, the training seed, the measurement of every test sample and the model's accuracies.
The store's fingerprint is the whole setup — a hash of the data, the training procedure's
settings, α, the number of models, the seeds and the measurement — so that:

* a killed run resumes where it stopped (the models already stored are skipped),
* a finished run is reused as is when the setup matches,
* a store made by another setup is refused (``ValueError`` naming what differs).

Memory: one model at a time; the store holds ``M`` rows of ``m`` measurements plus the masks.

:class:`IndependentModels` trains (and stores the weights of) models of the same procedure for
the methods that ensemble independently trained models (TRAK), with the same store machinery.
"""
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf

from ..common.progress import progress
from ..common.storage import ShardStore, fingerprint_variables
from ..model.measurement import MEASUREMENTS, resolve_measurement
from .faithfulness import LeaveOneOutGroundTruth, SubsetGroundTruth
from .training import TrainedModel, TrainingProcedure


@dataclass(frozen=True)
class RetrainingData:
    """Arrays the models are retrained on and measured on.

    Attributes
    ----------
    x_train, y_train
        Training inputs and one-hot labels ``(n, C)``.
    x_test, y_test
        Test inputs and one-hot labels ``(m, C)``, the samples whose measurement is recorded.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    def __post_init__(self):
        for name in ("x_train", "y_train", "x_test", "y_test"):
            if not isinstance(getattr(self, name), np.ndarray):
                raise TypeError(f"{name} must be a NumPy array, got {type(getattr(self, name)).__name__}.")
        if self.y_train.ndim != 2 or self.y_test.ndim != 2 or self.y_train.shape[1] != self.y_test.shape[1]:
            raise ValueError(
                f"y_train and y_test must be one-hot (n, classes) with the same classes, got {self.y_train.shape} "
                f"and {self.y_test.shape}."
            )
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError("Inputs and labels must have the same number of samples.")
        if len(self.x_train) < 2 or len(self.x_test) < 1:
            raise ValueError("Retraining needs at least 2 training samples and 1 test sample.")

    def fingerprint(self) -> str:
        """SHA-256 over the four arrays (shapes, dtypes, values)."""
        return fingerprint_variables([self.x_train, self.y_train, self.x_test, self.y_test])


def procedure_settings(procedure: TrainingProcedure) -> dict:
    """The settings of a training procedure, as stored in a fingerprint (dataclass fields, else attributes)."""
    if dataclasses.is_dataclass(procedure):
        settings = {field.name: getattr(procedure, field.name) for field in dataclasses.fields(procedure)}
    else:
        settings = {key: value for key, value in vars(procedure).items() if not key.startswith("_")}
    return {"class": type(procedure).__qualname__, **{key: repr(value) for key, value in settings.items()}}


def check_measurement(measurement: str) -> str:
    """``measurement`` if it is one of ``'margin'`` and ``'loss'``, else a ``ValueError``."""
    if measurement not in MEASUREMENTS:
        raise ValueError(f"measurement must be one of {MEASUREMENTS}, got {measurement!r}.")
    return measurement


def measure(
    trained: TrainedModel, x: np.ndarray, y: np.ndarray, measurement: str, batch_size: int = 1024
) -> np.ndarray:
    """The measurement (``'margin'`` or ``'loss'``) of every sample under the trained model, float64 ``(m,)``.

    The loss is the unreduced loss the model was trained with (``trained.loss_function``, by
    default categorical cross-entropy on probabilities); the margin is
    :func:`~influence_lib.model.measurement.margin`, computed from the logits when the loss says
    ``from_logits=True``.
    """
    loss_function = trained.loss_function or keras.losses.CategoricalCrossentropy(reduction=None)
    function: Callable = resolve_measurement(check_measurement(measurement), loss_function) or (
        lambda outputs, targets: loss_function(targets, outputs)
    )
    values = []
    for start in range(0, len(x), batch_size):
        outputs = trained.model(tf.convert_to_tensor(x[start: start + batch_size]), training=False)
        values.append(np.asarray(function(outputs, tf.convert_to_tensor(y[start: start + batch_size])), np.float64))
    return np.concatenate(values).reshape(-1)


def subset_masks(nb_train: int, alpha: float, nb_subsets: int, seed: int) -> np.ndarray:
    """``nb_subsets`` random subsets of exactly ``round(α·n)`` of ``n`` training samples, as masks ``(M, n)``."""
    size = int(round(alpha * nb_train))
    if not 0 < size < nb_train:
        raise ValueError(f"alpha={alpha} gives subsets of {size} of {nb_train} samples; choose alpha in (0, 1).")
    rng = np.random.default_rng(seed)
    masks = np.zeros((nb_subsets, nb_train), dtype=bool)
    for row in masks:
        row[rng.choice(nb_train, size=size, replace=False)] = True
    return masks


@dataclass(frozen=True)
class SubsetRetraining:
    """Settings of the LDS ground truth.

    Attributes
    ----------
    alpha
        Fraction of the training set in each subset (dattri and TRAK: 0.5).
    nb_subsets
        Number ``M`` of subsets, one model each (the published protocols use 50–100).
    subset_seed
        Seed of the subsets.
    training_seed
        The model of subset ``j`` is trained with seed ``training_seed + j``; a second run with
        another ``training_seed`` (same subsets) estimates the noise ceiling.
    measurement
        ``'margin'`` (default) or ``'loss'`` of each test sample.
    """

    alpha: float = 0.5
    nb_subsets: int = 100
    subset_seed: int = 0
    training_seed: int = 0
    measurement: str = "margin"

    def __post_init__(self):
        if isinstance(self.nb_subsets, bool) or not isinstance(self.nb_subsets, int) or self.nb_subsets < 3:
            raise ValueError(
                f"nb_subsets must be an integer ≥ 3 (a rank correlation needs 3 points), got {self.nb_subsets!r}."
            )
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha!r}.")
        check_measurement(self.measurement)


def _open_store(path: str, kind: str, data: RetrainingData, procedure: TrainingProcedure, settings: dict) -> ShardStore:
    fingerprint = {
        "kind": kind,
        "data": data.fingerprint(),
        "procedure": procedure_settings(procedure),
        **settings,
    }
    return ShardStore(path, fingerprint, what=f"{kind} ground truth")


def _train_and_measure(
    procedure: TrainingProcedure, data: RetrainingData, keep: np.ndarray | int, seed: int, measurement: str
) -> tuple[np.ndarray, float, float]:
    """Train on the samples of mask ``keep`` — or, for an integer, on all but that sample with
    :meth:`TrainingProcedure.train_without` — and measure the test samples."""
    if isinstance(keep, (int, np.integer)):
        trained = procedure.train_without(data.x_train, data.y_train, int(keep), data.x_test, data.y_test, seed)
    else:
        trained = procedure.train(data.x_train[keep], data.y_train[keep], data.x_test, data.y_test, seed)
    return measure(trained, data.x_test, data.y_test, measurement), trained.train_accuracy, trained.test_accuracy


def retrain_on_subsets(
    procedure: TrainingProcedure,
    data: RetrainingData,
    setup: SubsetRetraining = SubsetRetraining(),
    path: str | None = None,
    show_progress: bool = True,
) -> SubsetGroundTruth:
    """Train one model per random subset and record the measurement of every test sample.

    Parameters
    ----------
    procedure
        How to train a model (the same procedure that trained the model being explained).
    data
        Training and test arrays.
    setup
        α, number of subsets, seeds and measurement.
    path
        Directory of the resumable store (one shard per model); None keeps everything in memory.
    show_progress
        Show a progress bar of the models trained.

    Returns
    -------
    SubsetGroundTruth
        The masks ``(M, n)`` and the measurements ``(M, m)``.
    """
    if not isinstance(procedure, TrainingProcedure):
        raise TypeError(f"procedure must be a TrainingProcedure, got {type(procedure).__name__}.")
    masks = subset_masks(len(data.x_train), setup.alpha, setup.nb_subsets, setup.subset_seed)
    store = None if path is None else _open_store(path, "subset-retraining", data, procedure, dataclasses.asdict(setup))
    rows: dict[int, np.ndarray] = {}
    missing = []
    for index in range(setup.nb_subsets):
        if store is not None and store.has(f"model_{index:05d}"):
            rows[index] = store.read(f"model_{index:05d}")["measurement"]
        else:
            missing.append(index)
    for index in progress(missing, show_progress, "Retraining models on subsets", len(missing)):
        seed = setup.training_seed + index
        values, train_accuracy, test_accuracy = _train_and_measure(
            procedure, data, masks[index], seed, setup.measurement
        )
        rows[index] = values
        if store is not None:
            store.write(
                f"model_{index:05d}", mask=masks[index], seed=np.int64(seed), measurement=values,
                train_accuracy=np.float64(train_accuracy), test_accuracy=np.float64(test_accuracy),
            )
    if store is not None and store.completion() is None:
        store.mark_complete(nb_models=setup.nb_subsets)
    return SubsetGroundTruth(masks, np.stack([rows[index] for index in range(setup.nb_subsets)]))


def retrain_leave_one_out(
    procedure: TrainingProcedure,
    data: RetrainingData,
    removed: np.ndarray,
    training_seed: int = 0,
    measurement: str = "margin",
    path: str | None = None,
    show_progress: bool = True,
) -> LeaveOneOutGroundTruth:
    """Train the full model and one model without each training sample in ``removed``, with the same seed.

    The models without a sample come from :meth:`TrainingProcedure.train_without`, which keeps
    everything else as in the full training where the procedure allows it (common random
    numbers: for :class:`~influence_lib.benchmark.training.SGDTrainingProcedure`, the same
    initialization, batches and dropout).

    Returns
    -------
    LeaveOneOutGroundTruth
        ``changes[k, t] = f(t; D∖{removed[k]}) − f(t; D)``.
    """
    if not isinstance(procedure, TrainingProcedure):
        raise TypeError(f"procedure must be a TrainingProcedure, got {type(procedure).__name__}.")
    removed = np.asarray(removed)
    if removed.ndim != 1 or not np.issubdtype(removed.dtype, np.integer) or removed.size == 0:
        raise ValueError("removed must be a non-empty 1-D array of training-sample indices.")
    if removed.min() < 0 or removed.max() >= len(data.x_train) or np.unique(removed).size != removed.size:
        raise ValueError(f"removed must hold distinct indices in 0 … {len(data.x_train) - 1}.")
    check_measurement(measurement)
    settings = {
        "removed": removed.tolist(), "training_seed": int(training_seed), "measurement": measurement,
        "retraining": "train_without",
    }
    store = None if path is None else _open_store(path, "leave-one-out", data, procedure, settings)
    names = ["full"] + [f"without_{index:06d}" for index in removed]
    keeps = [np.ones(len(data.x_train), dtype=bool)] + [int(index) for index in removed]
    rows: dict[str, np.ndarray] = {}
    missing = []
    for name in names:
        if store is not None and store.has(name):
            rows[name] = store.read(name)["measurement"]
        else:
            missing.append(name)
    for name in progress(missing, show_progress, "Retraining models without one sample", len(missing)):
        values, train_accuracy, test_accuracy = _train_and_measure(
            procedure, data, keeps[names.index(name)], int(training_seed), measurement
        )
        rows[name] = values
        if store is not None:
            store.write(name, measurement=values, train_accuracy=np.float64(train_accuracy),
                        test_accuracy=np.float64(test_accuracy))
    if store is not None and store.completion() is None:
        store.mark_complete(nb_models=len(names))
    changes = np.stack([rows[name] - rows["full"] for name in names[1:]])
    return LeaveOneOutGroundTruth(removed.astype(np.int64), changes)


ENSEMBLE_SEED_OFFSET = 2_000_000


class IndependentModels:
    """Models trained independently of the explained one, with its training procedure — the ensemble of TRAK.

    Model ``j`` is trained from seed ``seed + 2,000,000 + j`` on a random α-subset of the training
    set (``alpha < 1``; the subsets are drawn from the same offset seed, so they differ from the
    ground-truth subsets) or on the whole training set (``alpha = 1``). TRAK (Park et al., ICML 2023,
    §3.3 and its experiments) and dattri's TRAK-10/50 (Deng et al., NeurIPS 2024 D&B) ensemble
    models trained on half-size subsets; that is the default.

    The models of one α are numbered, so an ensemble of 10 is the first 10 of an ensemble of 50.
    With a ``path``, every trained model's weights are one shard of a :class:`ShardStore` per α
    fingerprinted by the data, the procedure, α and the seed (a killed run resumes, a later run
    reuses the stored models, another setup is refused); without one they are kept in memory for
    the lifetime of this object. Memory: the weights of the models asked for.

    Parameters
    ----------
    procedure
        How every model is trained (the procedure of the explained model).
    data
        Training and test arrays (the test set only enters the accuracies the procedure reports).
    path
        Directory of the stores (one subdirectory per α); None: in memory only.
    seed
        Base seed (the explained model's training seed).
    show_progress
        Progress bar of the models trained.
    """

    def __init__(
        self, procedure: TrainingProcedure, data: RetrainingData, path: str | None = None, seed: int = 0,
        show_progress: bool = True,
    ):
        if not isinstance(procedure, TrainingProcedure):
            raise TypeError(f"procedure must be a TrainingProcedure, got {type(procedure).__name__}.")
        if not isinstance(data, RetrainingData):
            raise TypeError(f"data must be a RetrainingData, got {type(data).__name__}.")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be an integer ≥ 0, got {seed!r}.")
        self.procedure = procedure
        self.data = data
        self.path = path
        self.seed = int(seed)
        self.show_progress = show_progress
        self._memory: dict[tuple[float, int], list[np.ndarray]] = {}

    def masks(self, count: int, alpha: float) -> np.ndarray:
        """Training samples of models ``0 … count − 1``, ``(count, n)`` booleans (all true for ``alpha = 1``)."""
        if alpha == 1.0:
            return np.ones((count, len(self.data.x_train)), dtype=bool)
        return subset_masks(len(self.data.x_train), alpha, count, self.seed + ENSEMBLE_SEED_OFFSET)

    def weights(self, count: int, alpha: float = 0.5) -> list[list[np.ndarray]]:
        """The weight lists (``keras.Model.get_weights`` order) of models ``0 … count − 1``, training the missing ones.

        Raises
        ------
        ValueError
            ``count`` not a positive integer, ``alpha`` outside ``(0, 1]``, or a store written by
            another setup at ``path``.
        """
        if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 1:
            raise ValueError(f"count must be a positive integer (number of models), got {count!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1] (fraction of the training set per model), got {alpha!r}.")
        alpha = float(alpha)
        masks = self.masks(int(count), alpha)
        store = None if self.path is None else _open_store(
            os.path.join(self.path, f"alpha_{alpha:g}"), "independent-models", self.data, self.procedure,
            {"alpha": alpha, "seed": self.seed},
        )
        for index in range(int(count)):
            if (alpha, index) not in self._memory and store is not None and store.has(_model_name(index)):
                stored = store.read(_model_name(index))
                self._memory[alpha, index] = [stored[key] for key in sorted(stored) if key.startswith("weight_")]
        missing = [index for index in range(int(count)) if (alpha, index) not in self._memory]
        for index in progress(missing, self.show_progress, "Training independent models", len(missing)):
            seed = self.seed + ENSEMBLE_SEED_OFFSET + index
            keep = masks[index]
            trained = self.procedure.train(
                self.data.x_train[keep], self.data.y_train[keep], self.data.x_test, self.data.y_test, seed
            )
            values = [np.asarray(value) for value in trained.model.get_weights()]
            self._memory[alpha, index] = values
            if store is not None:
                store.write(_model_name(index), mask=keep, seed=np.int64(seed),
                            **{f"weight_{position:04d}": value for position, value in enumerate(values)})
        return [self._memory[alpha, index] for index in range(int(count))]

    def models(self, template: keras.Model, count: int, alpha: float = 0.5) -> list[keras.Model]:
        """Models ``0 … count − 1`` as Keras models: clones of ``template``'s architecture (``template`` is
        left untouched) holding the independently trained weights."""
        if not isinstance(template, keras.Model):
            raise TypeError(f"template must be a keras.Model, got {type(template).__name__}.")
        models = []
        for values in self.weights(count, alpha):
            clone = keras.models.clone_model(template)
            if len(values) != len(clone.weights):
                raise ValueError(
                    f"The independently trained models have {len(values)} weight arrays and the template "
                    f"{len(clone.weights)}: the template is not the architecture the procedure trains."
                )
            clone.set_weights(values)
            models.append(clone)
        return models


def _model_name(index: int) -> str:
    return f"model_{index:05d}"
