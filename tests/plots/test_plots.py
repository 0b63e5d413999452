"""Figures: the plotted data is the data given (curves, histogram counts, image captions); bad input raises."""
import numpy as np
import pytest

from influence_lib.plots import plot_detection_curves, plot_influential_images, plot_self_influence_histogram


def test_detection_curves_plot_each_curve_and_the_references():
    curve = np.array([0.0, 0.5, 1.0, 1.0, 1.0])
    figure = plot_detection_curves({"method": curve}, mislabeling_ratio=0.4)
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["method", "random order (expected)", "perfect detector"]
    np.testing.assert_allclose(lines[0].get_xdata(), [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(lines[0].get_ydata(), curve)
    with pytest.raises(ValueError, match="1-D array"):
        plot_detection_curves({"bad": np.zeros((2, 2))})


def test_histogram_counts_clean_and_flipped_separately():
    scores = np.array([1.0, 10.0, 100.0, 1000.0, 10.0])
    is_flipped = np.array([False, False, True, True, False])
    figure = plot_self_influence_histogram(scores, is_flipped, bins=3)
    clean_bars, flipped_bars = figure.axes[0].containers
    assert [bar.get_height() for bar in clean_bars] == [1, 2, 0]
    assert [bar.get_height() for bar in flipped_bars] == [0, 0, 2]  # log10: 2 and 3 share the last bin
    with pytest.raises(ValueError, match="positive scores"):
        plot_self_influence_histogram(np.array([0.0, 1.0]), np.array([True, False]))
    with pytest.raises(ValueError, match="same length"):
        plot_self_influence_histogram(np.ones(3), np.ones(2))


def test_influential_images_show_labels_and_values():
    rng = np.random.default_rng(0)
    images = rng.random((3, 8, 8))
    figure = plot_influential_images(
        rng.random((8, 8)), 4, images, [1, 2, 3], [3.0, 2.0, 1.0],
        opponents=rng.random((3, 64)), opponent_labels=np.eye(3)[[0, 1, 2]], opponent_values=[-1.0, -2.0, -3.0],
        class_names=["zero", "one", "two", "three", "four"], predicted_label=4,
    )
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[0] == "test: four\npred: four"
    assert titles[1] == "proponent 1\none (3)"
    assert titles[5] == "opponent 1\nzero (-1)"
    assert len(figure.axes) == 8
    with pytest.raises(ValueError, match="same length"):
        plot_influential_images(images[0], 0, images, [1], [1.0])
    with pytest.raises(ValueError, match="opponent_labels"):
        plot_influential_images(images[0], 0, images, [1, 2, 3], [1, 2, 3], opponents=images)
    with pytest.raises(ValueError, match="square image"):
        plot_influential_images(np.zeros(10), 0, images, [1, 2, 3], [1, 2, 3])


def test_coinciding_detection_curves_stay_distinguishable_and_histogram_axis_names_the_score():
    curve = np.linspace(0.0, 1.0, 41)
    figure = plot_detection_curves({"a": curve, "b": curve.copy(), "c": curve.copy()})
    lines = figure.axes[0].get_lines()[:3]
    assert len({line.get_linestyle() for line in lines}) == 3
    assert len({line.get_marker() for line in lines}) == 3
    assert len({tuple(np.atleast_1d(line.get_markevery())) for line in lines}) == 3
    histogram = plot_self_influence_histogram(np.array([1.0, 2.0]), np.array([True, False]), score_name="margin score")
    assert histogram.axes[0].get_xlabel() == "log10(margin score)"
    assert histogram.axes[0].get_title() == "Margin score of clean and flipped samples"
