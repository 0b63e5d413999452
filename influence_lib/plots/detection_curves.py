"""Detection curves: fraction of the flipped labels found vs fraction of the training data inspected."""
from collections.abc import Mapping

import numpy as np

from ._backend import use_agg_without_display

use_agg_without_display()
import matplotlib.pyplot as plt


_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">")


def plot_detection_curves(results: Mapping, mislabeling_ratio: float | None = None, title: str | None = None):
    """One curve per method (mean over seeds), with the random and the perfect detector for reference.

    Methods whose curves coincide stay distinguishable: each has its own colour, line style and
    marker, and the markers of different methods sit at different points of the curve.

    Parameters
    ----------
    results
        Method name → :class:`~influence_lib.benchmark.evaluator.MethodResult`, or → a 1-D array
        of fraction found at ``k = 0 … n`` inspected samples.
    mislabeling_ratio
        Fraction of flipped labels: draws the perfect detector's curve ``min(1, x / ratio)``.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure, axes = plt.subplots(figsize=(6.4, 4.8))
    palette = plt.get_cmap("tab20" if len(results) > 10 else "tab10").colors
    for index, (name, result) in enumerate(results.items()):
        found = np.asarray(getattr(result, "mean_fraction_found", result), dtype=np.float64)
        if found.ndim != 1 or found.size < 2:
            raise ValueError(f"The detection curve of {name!r} must be a 1-D array of at least two points.")
        inspected = np.linspace(0.0, 1.0, found.size)
        label = name
        if hasattr(result, "roc_auc_mean"):
            label = f"{name} (AUC {result.roc_auc_mean:.3f})"
        step = max(1, (found.size - 1) // 8)
        axes.plot(
            inspected, found, label=label, color=palette[index % len(palette)],
            linestyle=_LINE_STYLES[index % len(_LINE_STYLES)], marker=_MARKERS[index % len(_MARKERS)],
            markersize=4, markevery=(min(found.size - 1, index * max(1, step // max(1, len(results)))), step),
        )
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="random order (expected)")
    if mislabeling_ratio is not None:
        axes.plot([0, mislabeling_ratio, 1], [0, 1, 1], color="black", linestyle="--", label="perfect detector")
    axes.set_xlabel("fraction of the training data inspected")
    axes.set_ylabel("fraction of the flipped labels found")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="lower right")
    axes.set_title(title or "Mislabel detection by descending score")
    figure.tight_layout()
    return figure
