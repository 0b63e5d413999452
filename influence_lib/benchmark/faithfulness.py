"""Faithfulness metrics: how well attribution scores predict what retraining actually does.

Two metrics compare a method's scores ``τ(t, i)`` (test sample ``t``, training sample ``i``)
with retrained models:

* **Linear datamodeling score** (LDS; Park et al., "TRAK: Attributing Model Behavior at Scale",
  ICML 2023, §2). Train ``M`` models on random subsets ``S_1 … S_M`` of the training set and
  record a measurement ``f(t; S_j)`` (the margin or the loss of ``t``). The scores predict
  ``g(t; S) = Σ_{i∈S} τ(t, i)``; the LDS of test sample ``t`` is the Spearman rank correlation
  over the ``M`` subsets

  .. math::  \\mathrm{LDS}(t) = \\rho_s\\big(\\{g(t; S_j)\\}_j, \\{f(t; S_j)\\}_j\\big),

  and the LDS of the method is its mean over the test samples (reported with its standard error).
* **Leave-one-out correlation** (Koh & Liang 2017, Fig. 2; dattri, Deng et al. NeurIPS 2024 D&B):
  retrain without each of ``K`` training samples; per test sample, the Pearson and the Spearman
  correlation over the ``K`` removed samples between the predicted change ``−τ(t, i)`` and the
  actual change ``f(t; D∖{i}) − f(t; D)``; then the mean over test samples.

Scores are **datamodel weights**: ``τ(t, i) > 0`` means that including ``i`` raises the
measurement of ``t`` (see :meth:`~influence_lib.benchmark.factories.MethodFactory.attribute`
for how each method's values are oriented).

The **noise ceiling** answers "what is the best LDS achievable here?". Retraining is random
(initialization, batch order), so ``f(t; S)`` is a signal plus noise. Two ground-truth runs on the
same subsets with other training seeds, ``y_a = s + ε_a`` and ``y_b = s + ε_b`` (independent
noises of equal variance), correlate by ``r = var s / (var s + σ²)``, and the best possible
predictor ``s`` correlates with one run by ``√r``. :func:`noise_ceiling` reports both.

Correlations are computed per test sample and vectorized over all of them. Ranks of tied values
are averaged (as in ``scipy.stats.spearmanr``). A test sample whose predictions or measurements are
constant has no defined correlation; it counts as 0 (a constant prediction ranks nothing) and is
counted in ``nb_undefined``.
"""
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class CorrelationSummary:
    """Per-test-sample correlations and their mean.

    Attributes
    ----------
    mean
        Mean correlation over the test samples.
    standard_error
        ``std / √m`` over the ``m`` test samples (``ddof=1``; 0 for one sample).
    per_sample
        The correlation of every test sample, shape ``(m,)``.
    nb_undefined
        Test samples with constant predictions or measurements (counted as 0).
    """

    mean: float
    standard_error: float
    per_sample: np.ndarray = field(repr=False)
    nb_undefined: int = 0

    def to_dict(self) -> dict:
        """``mean``, ``standard_error`` and ``nb_undefined`` as JSON-able numbers."""
        return {"mean": self.mean, "standard_error": self.standard_error, "nb_undefined": self.nb_undefined}


@dataclass(frozen=True)
class SubsetGroundTruth:
    """Measurements of models retrained on random subsets of the training set.

    Attributes
    ----------
    masks
        ``masks[j, i]`` is True when training sample ``i`` was in subset ``j``, shape ``(M, n)``.
    measurements
        ``measurements[j, t]``: measurement of test sample ``t`` by the model trained on subset
        ``j``, shape ``(M, m)``.
    """

    masks: np.ndarray
    measurements: np.ndarray


@dataclass(frozen=True)
class LeaveOneOutGroundTruth:
    """Measurement changes of models retrained without one training sample each.

    Attributes
    ----------
    removed
        Indices of the removed training samples, shape ``(K,)``.
    changes
        ``changes[k, t] = f(t; D∖{removed[k]}) − f(t; D)``, shape ``(K, m)``.
    """

    removed: np.ndarray
    changes: np.ndarray


def average_ranks_rows(values: np.ndarray) -> np.ndarray:
    """Ranks ``1 … k`` within each row of a 2-D array, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    rows, columns = values.shape
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    starts = np.ones_like(ordered, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    flat_starts = starts.ravel()
    group = np.cumsum(flat_starts) - 1
    position = np.tile(np.arange(columns, dtype=np.float64), rows)
    first = position[flat_starts]
    sizes = np.bincount(group)
    mean_rank = first + (sizes + 1) / 2.0
    ranks = np.empty_like(ordered)
    np.put_along_axis(ranks, order, mean_rank[group].reshape(rows, columns), axis=1)
    return ranks


def pearson_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pearson correlation of each row of ``a`` with the same row of ``b``.

    Returns
    -------
    correlations, undefined
        Shape ``(rows,)`` each; ``undefined`` is True where a row is constant (correlation set to 0).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    norms = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    undefined = norms == 0.0
    correlations = np.where(undefined, 0.0, (a * b).sum(axis=1) / np.where(undefined, 1.0, norms))
    return np.clip(correlations, -1.0, 1.0), undefined


def spearman_rows(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Spearman rank correlation (average ranks for ties) of each row of ``a`` with that of ``b``."""
    return pearson_rows(average_ranks_rows(a), average_ranks_rows(b))


def summarize(correlations: np.ndarray, undefined: np.ndarray) -> CorrelationSummary:
    """Mean and standard error of per-sample correlations."""
    count = correlations.size
    error = float(correlations.std(ddof=1) / np.sqrt(count)) if count > 1 else 0.0
    return CorrelationSummary(float(correlations.mean()), error, correlations, int(undefined.sum()))


def _check_matrix(values, name: str, shape: tuple[int | None, int | None]) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {values.shape}.")
    for axis, expected in enumerate(shape):
        if expected is not None and values.shape[axis] != expected:
            raise ValueError(f"{name} has shape {values.shape}; axis {axis} must have length {expected}.")
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or infinite values; every entry must be finite.")
    return values


def _check_enough(count: int, what: str) -> None:
    if count < 3:
        raise ValueError(f"A correlation over {what} needs at least 3 of them, got {count}.")


def linear_datamodeling_score(scores, ground_truth: SubsetGroundTruth) -> CorrelationSummary:
    """Linear datamodeling score of ``scores`` against models retrained on subsets.

    Parameters
    ----------
    scores
        Datamodel weights ``τ(t, i)``, shape ``(m, n)`` (test samples × training samples);
        positive = including training sample ``i`` raises the measurement of ``t``.
    ground_truth
        The subsets and the measurements of the models retrained on them
        (:class:`SubsetGroundTruth`, e.g. from
        :func:`~influence_lib.benchmark.retraining.retrain_on_subsets`).

    Returns
    -------
    CorrelationSummary
        Per test sample ``t``: Spearman over the ``M`` subsets of ``Σ_{i∈S_j} τ(t, i)`` and
        ``f(t; S_j)``; their mean and standard error.
    """
    masks = np.asarray(ground_truth.masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(
            f"ground_truth.masks must be a boolean array (subsets, n_train), got {masks.dtype} {masks.shape}."
        )
    nb_subsets, nb_train = masks.shape
    _check_enough(nb_subsets, "subsets")
    measurements = _check_matrix(ground_truth.measurements, "ground_truth.measurements", (nb_subsets, None))
    scores = _check_matrix(scores, "scores", (measurements.shape[1], nb_train))
    predictions = scores @ masks.T.astype(np.float64)
    return summarize(*spearman_rows(predictions, measurements.T))


def loo_correlation(scores, ground_truth: LeaveOneOutGroundTruth) -> dict[str, CorrelationSummary]:
    """Leave-one-out correlation of ``scores`` against models retrained without one sample each.

    Parameters
    ----------
    scores
        Datamodel weights ``τ(t, i)``, shape ``(m, n)``.
    ground_truth
        The removed training samples and the measurement changes (:class:`LeaveOneOutGroundTruth`).

    Returns
    -------
    dict
        ``{"pearson": CorrelationSummary, "spearman": CorrelationSummary}``: per test sample, the
        correlation over the removed samples ``i`` of the predicted change ``−τ(t, i)`` with the
        actual change; mean and standard error over test samples.
    """
    removed = np.asarray(ground_truth.removed)
    if removed.ndim != 1 or not np.issubdtype(removed.dtype, np.integer):
        raise ValueError(
            f"ground_truth.removed must be a 1-D array of training indices, got {removed.dtype} {removed.shape}."
        )
    _check_enough(removed.size, "removed training samples")
    changes = _check_matrix(ground_truth.changes, "ground_truth.changes", (removed.size, None))
    scores = _check_matrix(scores, "scores", (changes.shape[1], None))
    if removed.min() < 0 or removed.max() >= scores.shape[1]:
        raise ValueError(f"ground_truth.removed indexes training samples outside 0 … {scores.shape[1] - 1}.")
    predicted = -scores[:, removed]
    return {
        "pearson": summarize(*pearson_rows(predicted, changes.T)),
        "spearman": summarize(*spearman_rows(predicted, changes.T)),
    }


@dataclass(frozen=True)
class NoiseCeiling:
    """How reproducible retraining is, and the best LDS it allows.

    Attributes
    ----------
    run_to_run
        Per test sample, the Spearman correlation over subsets between two ground-truth runs
        (same subsets, other training seeds); mean and standard error.
    ceiling
        Mean over test samples of ``√max(r_t, 0)``: the correlation of the noise-free signal
        with one run (see the module docstring), an estimate of the best achievable LDS.
    """

    run_to_run: CorrelationSummary
    ceiling: float

    def to_dict(self) -> dict:
        """JSON-able summary."""
        return {"run_to_run": self.run_to_run.to_dict(), "ceiling": self.ceiling}


def noise_ceiling(first: SubsetGroundTruth, second: SubsetGroundTruth) -> NoiseCeiling:
    """Noise ceiling of the LDS from two ground-truth runs on the same subsets with other training seeds."""
    if not np.array_equal(np.asarray(first.masks), np.asarray(second.masks)):
        raise ValueError("The two ground-truth runs must use the same subsets (identical masks); only the training "
                         "seeds may differ.")
    a = _check_matrix(first.measurements, "first.measurements", (None, None))
    b = _check_matrix(second.measurements, "second.measurements", a.shape)
    _check_enough(a.shape[0], "subsets")
    correlations, undefined = spearman_rows(a.T, b.T)
    return NoiseCeiling(summarize(correlations, undefined), float(np.sqrt(np.maximum(correlations, 0.0)).mean()))
