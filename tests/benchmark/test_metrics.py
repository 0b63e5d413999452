"""ROC-AUC and detection curve against brute force: all (flipped, clean) pairs counted, ties as 1/2;
every ordering of tied samples enumerated."""
import itertools

import numpy as np
import pytest

from influence_lib.benchmark.metrics import average_ranks, detection_curve, detection_curve_area, roc_auc


def brute_force_auc(scores, is_flipped):
    flipped = [s for s, f in zip(scores, is_flipped) if f]
    clean = [s for s, f in zip(scores, is_flipped) if not f]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in flipped for b in clean)
    return wins / (len(flipped) * len(clean))


def brute_force_curve(scores, is_flipped):
    """Average over every order of inspection consistent with descending scores (ties permuted)."""
    scores, is_flipped = np.asarray(scores), np.asarray(is_flipped)
    groups = [np.flatnonzero(scores == value) for value in sorted(set(scores), reverse=True)]
    curves = []
    for orders in itertools.product(*(itertools.permutations(group) for group in groups)):
        order = np.concatenate(orders).astype(int)
        curves.append(np.r_[0, np.cumsum(is_flipped[order])] / is_flipped.sum())
    return np.mean(curves, axis=0)


@pytest.mark.parametrize("seed", range(8))
def test_roc_auc_matches_pairwise_counting_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 40
    scores = rng.integers(0, 6, size=n).astype(float)  # few distinct values: many ties
    is_flipped = rng.random(n) < 0.3
    is_flipped[:2] = [True, False]
    assert roc_auc(scores, is_flipped) == pytest.approx(brute_force_auc(scores, is_flipped), abs=1e-12)


def test_roc_auc_extremes_and_constant():
    is_flipped = np.array([1, 0, 0, 1, 0], dtype=bool)
    assert roc_auc(is_flipped.astype(float), is_flipped) == 1.0
    assert roc_auc(-is_flipped.astype(float), is_flipped) == 0.0
    assert roc_auc(np.full(5, 3.0), is_flipped) == 0.5


def test_average_ranks_share_the_mean_of_tied_ranks():
    np.testing.assert_array_equal(average_ranks([10, 20, 10, 30, 20, 10]), [2, 4.5, 2, 6, 4.5, 2])


@pytest.mark.parametrize("seed", range(4))
def test_detection_curve_is_the_expectation_over_tied_orders(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=7).astype(float)
    is_flipped = rng.random(7) < 0.4
    is_flipped[0] = True
    inspected, found = detection_curve(scores, is_flipped)
    np.testing.assert_allclose(inspected, np.arange(8) / 7)
    np.testing.assert_allclose(found, brute_force_curve(scores, is_flipped), atol=1e-12)


def test_detection_curve_area_of_perfect_constant_and_worst_detectors():
    n, n_flipped = 100, 10
    is_flipped = np.zeros(n, dtype=bool)
    is_flipped[:n_flipped] = True
    ratio = n_flipped / n
    # Perfect: the curve rises linearly to 1 at x = ratio, then stays: area 1 - ratio / 2.
    assert detection_curve_area(*detection_curve(is_flipped.astype(float), is_flipped)) == pytest.approx(1 - ratio / 2)
    # Constant scores: the expected curve is the diagonal, area 1/2.
    assert detection_curve_area(*detection_curve(np.zeros(n), is_flipped)) == pytest.approx(0.5)
    # Worst: flipped found last, area ratio / 2.
    assert detection_curve_area(*detection_curve(-is_flipped.astype(float), is_flipped)) == pytest.approx(ratio / 2)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="same length"):
        roc_auc([1.0, 2.0], [True])
    with pytest.raises(ValueError, match="both flipped and clean"):
        roc_auc([1.0, 2.0], [True, True])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([np.nan, 2.0], [True, False])
    with pytest.raises(ValueError, match="booleans"):
        roc_auc([1.0, 2.0], [2, 0])
    with pytest.raises(ValueError, match="empty"):
        roc_auc([], [])
    with pytest.raises(ValueError, match="at least one flipped"):
        detection_curve([1.0, 2.0], [False, False])
    with pytest.raises(ValueError, match="same length"):
        detection_curve_area(np.zeros(3), np.zeros(4))
