"""Scores of a mislabel detector: exact ROC-AUC (ties counted as one half) and the detection curve.

A detector gives every training sample a score; higher means "more likely mislabeled". Two
summaries of how well the scores separate the flipped samples from the clean ones:

* the ROC-AUC, the probability that a flipped sample scores higher than a clean one, a tie
  counting one half. It is the Mann–Whitney U statistic divided by ``n_flipped · n_clean``,
  computed from average ranks: ``AUC = (R_flipped − n_flipped (n_flipped + 1) / 2) / (n_flipped · n_clean)``
  with ``R_flipped`` the sum of the (tie-averaged) ranks of the flipped samples.
* the detection curve: the fraction of flipped samples found after inspecting the top
  ``k`` samples by descending score, for ``k = 0 … n``. Tied scores are inspected in random order,
  so within a tied group the curve is the expected value (a straight line across the group).
  Its area over the fraction of data inspected is 1/2 for random scores and
  ``1 − ρ/2`` for a perfect detector, where ρ is the fraction of flipped samples.
"""
import numpy as np


def _check_scores_and_labels(scores, is_flipped) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_flipped = np.asarray(is_flipped).reshape(-1)
    if is_flipped.dtype != bool:
        if not np.isin(is_flipped, (0, 1)).all():
            raise ValueError("is_flipped must hold booleans (or 0/1): True where the label was flipped.")
        is_flipped = is_flipped.astype(bool)
    if scores.shape != is_flipped.shape:
        raise ValueError(f"scores and is_flipped must have the same length, got {scores.size} and {is_flipped.size}.")
    if scores.size == 0:
        raise ValueError("scores is empty: there is nothing to rank.")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values; a detector must give a finite score to every sample.")
    return scores, is_flipped


def average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1…n of ``values`` in ascending order, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    group_starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    group_ends = np.r_[group_starts[1:], values.size]
    mean_rank_of_group = (group_starts + group_ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(mean_rank_of_group, group_ends - group_starts)
    return ranks


def roc_auc(scores, is_flipped) -> float:
    """Exact ROC-AUC of ``scores`` for detecting ``is_flipped`` (Mann–Whitney U, ties count 1/2).

    Parameters
    ----------
    scores
        One score per sample, higher = more suspicious, shape ``(n,)``.
    is_flipped
        Booleans, True for the mislabeled samples, shape ``(n,)``.

    Returns
    -------
    float
        ``P(score_flipped > score_clean) + ½ P(score_flipped = score_clean)``: 1.0 for a perfect
        detector, 0.5 for a constant or random one.
    """
    scores, is_flipped = _check_scores_and_labels(scores, is_flipped)
    n_flipped = int(is_flipped.sum())
    n_clean = is_flipped.size - n_flipped
    if n_flipped == 0 or n_clean == 0:
        raise ValueError("The ROC-AUC needs both flipped and clean samples; got only one kind.")
    rank_sum = average_ranks(scores)[is_flipped].sum()
    return float((rank_sum - n_flipped * (n_flipped + 1) / 2.0) / (n_flipped * n_clean))


def detection_curve(scores, is_flipped) -> tuple[np.ndarray, np.ndarray]:
    """Fraction of flipped samples found vs fraction of the data inspected, by descending score.

    Returns
    -------
    fraction_inspected, fraction_found
        Two arrays of shape ``(n + 1,)``: ``k / n`` and the (expected, for tied scores) fraction of
        the flipped samples among the ``k`` highest scores, for ``k = 0 … n``.
    """
    scores, is_flipped = _check_scores_and_labels(scores, is_flipped)
    n_flipped = int(is_flipped.sum())
    if n_flipped == 0:
        raise ValueError("The detection curve needs at least one flipped sample.")
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_flipped = is_flipped[order].astype(np.float64)
    group_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    group_ends = np.r_[group_starts[1:], scores.size]
    group_sizes = group_ends - group_starts
    flipped_per_group = np.add.reduceat(sorted_flipped, group_starts)
    expected_flipped = np.repeat(flipped_per_group / group_sizes, group_sizes)
    found = np.r_[0.0, np.cumsum(expected_flipped)] / n_flipped
    inspected = np.arange(scores.size + 1, dtype=np.float64) / scores.size
    return inspected, found


def detection_curve_area(fraction_inspected: np.ndarray, fraction_found: np.ndarray) -> float:
    """Area under a detection curve (trapezoids): 1/2 for random scores, ``1 − ρ/2`` at best."""
    fraction_inspected = np.asarray(fraction_inspected, dtype=np.float64)
    fraction_found = np.asarray(fraction_found, dtype=np.float64)
    if fraction_inspected.shape != fraction_found.shape or fraction_inspected.ndim != 1:
        raise ValueError("fraction_inspected and fraction_found must be 1-D arrays of the same length.")
    widths = np.diff(fraction_inspected)
    return float(np.sum(widths * (fraction_found[1:] + fraction_found[:-1]) / 2.0))
