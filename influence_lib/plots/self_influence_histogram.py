"""Histogram of self-influence (or any detector score) split by clean and flipped labels."""
import numpy as np

from ._backend import use_agg_without_display

use_agg_without_display()
import matplotlib.pyplot as plt


def plot_self_influence_histogram(
    scores,
    is_flipped,
    bins: int = 50,
    log_scale: bool = True,
    title: str | None = None,
    score_name: str = "self-influence",
):
    """Overlaid histograms of the scores of the clean and of the flipped samples.

    Parameters
    ----------
    scores
        One score per training sample (e.g. self-influence), shape ``(n,)``.
    is_flipped
        Booleans (or 0/1), True for the samples whose label was flipped, shape ``(n,)``.
    bins
        Number of bins (shared by both histograms).
    log_scale
        Bin ``log10(score)`` (for positive scores spanning orders of magnitude, like self-influence).
    title
        Figure title.
    score_name
        What the scores are, for the axis label and default title (e.g. ``"TracIn self-influence"``,
        ``"margin score"``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    is_flipped = np.asarray(is_flipped).astype(bool).reshape(-1)
    if scores.shape != is_flipped.shape:
        raise ValueError(f"scores and is_flipped must have the same length, got {scores.size} and {is_flipped.size}.")
    if log_scale:
        if (scores <= 0).any():
            raise ValueError("log_scale=True needs positive scores; pass log_scale=False for scores that can be ≤ 0.")
        scores = np.log10(scores)
    edges = np.histogram_bin_edges(scores, bins=bins)
    figure, axes = plt.subplots(figsize=(6.4, 4.0))
    axes.hist(scores[~is_flipped], bins=edges, alpha=0.6, label=f"clean ({int((~is_flipped).sum())})")
    axes.hist(scores[is_flipped], bins=edges, alpha=0.6, label=f"flipped ({int(is_flipped.sum())})")
    axes.set_xlabel(f"log10({score_name})" if log_scale else score_name)
    axes.set_ylabel("number of training samples")
    axes.legend()
    axes.set_title(title or f"{score_name[:1].upper()}{score_name[1:]} of clean and flipped samples")
    figure.tight_layout()
    return figure
