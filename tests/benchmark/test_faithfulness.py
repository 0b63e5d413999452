"""LDS, leave-one-out correlation and noise ceiling against planted datamodels and scipy's correlations."""
import numpy as np
import pytest
from scipy import stats

from influence_lib.benchmark.faithfulness import (
    LeaveOneOutGroundTruth,
    SubsetGroundTruth,
    average_ranks_rows,
    linear_datamodeling_score,
    loo_correlation,
    noise_ceiling,
    pearson_rows,
    spearman_rows,
)


def planted(nb_test=30, nb_train=40, nb_subsets=25, seed=0):
    rng = np.random.default_rng(seed)
    weights = rng.normal(size=(nb_test, nb_train))
    masks = rng.random((nb_subsets, nb_train)) < 0.5
    bias = rng.normal(size=nb_test)
    measurements = masks.astype(float) @ weights.T + bias
    return weights, masks, measurements


def test_lds_of_the_planted_linear_datamodel_is_one():
    weights, masks, measurements = planted()
    result = linear_datamodeling_score(weights, SubsetGroundTruth(masks, measurements))
    assert result.mean == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(result.per_sample, 1.0, atol=1e-12)
    assert result.standard_error == pytest.approx(0.0, abs=1e-12) and result.nb_undefined == 0
    # A rank correlation: any increasing transform of the measurements keeps LDS = 1, a sign flip gives −1.
    transformed = SubsetGroundTruth(masks, np.exp(measurements / 10))
    assert linear_datamodeling_score(weights, transformed).mean == pytest.approx(1.0)
    assert linear_datamodeling_score(-weights, SubsetGroundTruth(masks, measurements)).mean == pytest.approx(-1.0)


def test_lds_matches_scipy_spearman_per_test_sample():
    weights, masks, measurements = planted(seed=1)
    noisy = measurements + np.random.default_rng(2).normal(scale=3.0, size=measurements.shape)
    result = linear_datamodeling_score(weights, SubsetGroundTruth(masks, noisy))
    predictions = masks.astype(float) @ weights.T
    expected = [stats.spearmanr(predictions[:, t], noisy[:, t]).statistic for t in range(weights.shape[0])]
    np.testing.assert_allclose(result.per_sample, expected, atol=1e-12)
    assert result.mean == pytest.approx(np.mean(expected))
    assert result.standard_error == pytest.approx(np.std(expected, ddof=1) / np.sqrt(len(expected)))


def test_lds_of_random_scores_is_zero_within_its_standard_error():
    _, masks, measurements = planted(nb_test=400, nb_subsets=40, seed=3)
    scores = np.random.default_rng(4).normal(size=(400, masks.shape[1]))
    result = linear_datamodeling_score(scores, SubsetGroundTruth(masks, measurements))
    assert abs(result.mean) < 3 * result.standard_error
    assert 0.005 < result.standard_error < 0.05


def test_spearman_averages_tied_ranks_like_scipy():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 4, size=(50, 12)).astype(float)  # many ties
    b = rng.integers(0, 3, size=(50, 12)).astype(float)
    a[0] = [1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0, 5]
    correlations, undefined = spearman_rows(a, b)
    for row in range(50):
        if np.ptp(a[row]) == 0 or np.ptp(b[row]) == 0:
            assert undefined[row] and correlations[row] == 0.0
        else:
            assert correlations[row] == pytest.approx(stats.spearmanr(a[row], b[row]).statistic, abs=1e-12)
    np.testing.assert_allclose(average_ranks_rows(a), np.stack([stats.rankdata(row) for row in a]))


def test_constant_rows_have_no_correlation_and_are_counted():
    weights, masks, measurements = planted(nb_test=4)
    measurements[:, 1] = 7.0
    result = linear_datamodeling_score(weights, SubsetGroundTruth(masks, measurements))
    assert result.nb_undefined == 1 and result.per_sample[1] == 0.0
    np.testing.assert_allclose(result.per_sample[[0, 2, 3]], 1.0)
    correlations, undefined = pearson_rows(np.ones((2, 5)), np.arange(10.0).reshape(2, 5))
    assert undefined.all() and (correlations == 0).all()


def test_loo_correlation_of_scores_that_predict_the_changes():
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(20, 30))
    removed = np.array([1, 4, 7, 9, 12, 20, 29])
    changes = -scores[:, removed].T  # removing i changes the measurement by −τ(t, i)
    result = loo_correlation(scores, LeaveOneOutGroundTruth(removed, changes))
    assert result["pearson"].mean == pytest.approx(1.0) and result["spearman"].mean == pytest.approx(1.0)
    cubed = loo_correlation(scores, LeaveOneOutGroundTruth(removed, changes ** 3))
    assert cubed["spearman"].mean == pytest.approx(1.0) and cubed["pearson"].mean < 0.99
    expected = [stats.pearsonr(-scores[t, removed], changes[:, t] ** 3).statistic for t in range(20)]
    np.testing.assert_allclose(cubed["pearson"].per_sample, expected, atol=1e-12)


def test_noise_ceiling_recovers_the_signal_to_noise_ratio():
    rng = np.random.default_rng(7)
    masks = rng.random((400, 10)) < 0.5
    signal = rng.normal(size=(400, 300))
    first = SubsetGroundTruth(masks, signal + rng.normal(size=signal.shape))  # var s = σ² → r = 1/2
    second = SubsetGroundTruth(masks, signal + rng.normal(size=signal.shape))
    ceiling = noise_ceiling(first, second)
    assert ceiling.run_to_run.mean == pytest.approx(6 / np.pi * np.arcsin(0.25), abs=0.02)  # Spearman of ρ = 1/2
    # The noise-free signal correlates with one run by about √r: the ceiling.
    best = np.mean(spearman_rows(signal.T, first.measurements.T)[0])
    assert ceiling.ceiling == pytest.approx(best, abs=0.03)


def test_bad_inputs_are_named():
    weights, masks, measurements = planted()
    with pytest.raises(ValueError, match="scores has shape"):
        linear_datamodeling_score(weights[:, :-1], SubsetGroundTruth(masks, measurements))
    with pytest.raises(ValueError, match="boolean"):
        linear_datamodeling_score(weights, SubsetGroundTruth(masks.astype(int), measurements))
    with pytest.raises(ValueError, match="at least 3"):
        linear_datamodeling_score(weights, SubsetGroundTruth(masks[:2], measurements[:2]))
    bad = weights.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        linear_datamodeling_score(bad, SubsetGroundTruth(masks, measurements))
    with pytest.raises(ValueError, match="outside"):
        loo_correlation(weights, LeaveOneOutGroundTruth(np.array([0, 1, 99]), np.zeros((3, weights.shape[0]))))
    with pytest.raises(ValueError, match="same subsets"):
        noise_ceiling(SubsetGroundTruth(masks, measurements), SubsetGroundTruth(~masks, measurements))
