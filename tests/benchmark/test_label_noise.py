"""Label flipping: exact count, never the same class, uniform over the other classes, reproducible."""
import numpy as np
import pytest

from influence_lib.benchmark.label_noise import flip_labels


@pytest.mark.parametrize("n, ratio", [(100, 0.1), (97, 0.25), (10, 0.0), (10, 1.0), (1437, 0.1)])
def test_exact_fraction_and_never_the_same_class(n, ratio):
    labels = np.random.default_rng(0).integers(0, 4, size=n)
    original = labels.copy()
    noisy, flipped = flip_labels(labels, 4, ratio, seed=3)
    assert len(flipped) == round(ratio * n) == len(np.unique(flipped))
    np.testing.assert_array_equal(labels, original)  # input not mutated
    changed = np.flatnonzero(noisy != labels)
    np.testing.assert_array_equal(changed, flipped)  # exactly the flipped ones changed, all of them
    assert noisy.min() >= 0 and noisy.max() < 4


def test_reproducible_by_seed_and_different_across_seeds():
    labels = np.arange(200) % 10
    first = flip_labels(labels, 10, 0.2, seed=7)
    again = flip_labels(labels, 10, 0.2, seed=7)
    other = flip_labels(labels, 10, 0.2, seed=8)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_new_class_is_uniform_over_the_other_classes():
    labels = np.zeros(30000, dtype=np.int64)
    noisy, flipped = flip_labels(labels, 4, 1.0, seed=0)
    counts = np.bincount(noisy[flipped], minlength=4)
    assert counts[0] == 0
    np.testing.assert_allclose(counts[1:] / len(flipped), 1 / 3, atol=0.015)


def test_two_classes_swap():
    labels = np.array([0, 1, 0, 1])
    noisy, flipped = flip_labels(labels, 2, 1.0)
    np.testing.assert_array_equal(noisy, 1 - labels)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="integer class labels"):
        flip_labels(np.eye(3), 3, 0.1)
    with pytest.raises(ValueError, match="nb_classes"):
        flip_labels(np.array([0, 0]), 1, 0.5)
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        flip_labels(np.array([0, 3]), 3, 0.5)
    with pytest.raises(ValueError, match="mislabeling_ratio"):
        flip_labels(np.array([0, 1]), 2, 1.5)
