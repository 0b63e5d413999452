"""Figures (matplotlib): detection curves of the benchmark, most influential training images,
self-influence histograms split by clean / flipped labels.

Every function returns a :class:`matplotlib.figure.Figure` (save it with ``figure.savefig``).
On a machine without a display, matplotlib's non-interactive Agg backend is selected.
"""
from .detection_curves import plot_detection_curves
from .influential_images import plot_influential_images
from .self_influence_histogram import plot_self_influence_histogram

__all__ = ["plot_detection_curves", "plot_influential_images", "plot_self_influence_histogram"]
