"""Faithfulness results as a table (plain or Markdown), as JSON and as a figure (LDS with error bars, time)."""
import textwrap
from collections.abc import Mapping

import numpy as np

from ..common.storage import atomic_write_json
from ..plots._backend import use_agg_without_display
from .faithfulness import NoiseCeiling
from .faithfulness_evaluator import FaithfulnessResult

use_agg_without_display()
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def _estimate(summary) -> str:
    return "—" if summary is None else f"{summary.mean:.3f} ± {summary.standard_error:.3f}"


def _ordered(results: Mapping[str, FaithfulnessResult]) -> list[FaithfulnessResult]:
    return sorted(results.values(), key=lambda result: np.inf if result.lds is None else -result.lds.mean)


def faithfulness_table(
    results: Mapping[str, FaithfulnessResult], ceiling: NoiseCeiling | None = None, markdown: bool = False
) -> str:
    """One row per method, best LDS first: LDS and LOO correlations (mean ± standard error over test
    samples) and seconds; a last row gives the noise ceiling; failed methods show their error."""
    with_loo = any(result.loo is not None for result in results.values())
    header = ["method", "LDS"] + (["LOO Pearson", "LOO Spearman"] if with_loo else []) + ["time (s)"]
    rows = [header]
    for result in _ordered(results):
        if result.error is not None:
            rows.append([result.name, f"failed: {result.error}"] + [""] * (len(header) - 2))
            continue
        row = [result.name, _estimate(result.lds)]
        if with_loo:
            loo = result.loo or {}
            row += [_estimate(loo.get("pearson")), _estimate(loo.get("spearman"))]
        rows.append(row + [f"{result.seconds:.1f}"])
    if ceiling is not None:
        rows.append(
            ["noise ceiling", f"{ceiling.ceiling:.3f} (run-to-run {_estimate(ceiling.run_to_run)})"]
            + [""] * (len(header) - 2)
        )
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in header) + "|")
        return "\n".join(lines)
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def faithfulness_to_dict(
    results: Mapping[str, FaithfulnessResult], config: Mapping | None = None, ceiling: NoiseCeiling | None = None
) -> dict:
    """A JSON-able summary: config, noise ceiling, and per method LDS / LOO (mean, standard error), seconds, error."""
    return {
        "config": dict(config or {}),
        "noise_ceiling": None if ceiling is None else ceiling.to_dict(),
        "methods": {name: result.to_dict() for name, result in results.items()},
    }


def save_faithfulness_json(
    results: Mapping[str, FaithfulnessResult], path: str, config: Mapping | None = None,
    ceiling: NoiseCeiling | None = None,
) -> None:
    """Write :func:`faithfulness_to_dict` to ``path`` atomically."""
    atomic_write_json(path, faithfulness_to_dict(results, config, ceiling))


def plot_faithfulness(results: Mapping[str, FaithfulnessResult], ceiling: NoiseCeiling | None = None,
                      title: str | None = None):
    """Two panels: LDS per method with ±1 standard-error bars (and the noise ceiling), and seconds per method.

    Returns
    -------
    matplotlib.figure.Figure
    """
    shown = [result for result in _ordered(results) if result.lds is not None]
    if not shown:
        raise ValueError("No method has an LDS to plot (all of them failed).")
    names = [result.name for result in shown]
    positions = np.arange(len(shown))
    figure, (lds_axes, time_axes) = plt.subplots(1, 2, figsize=(11, 0.45 * len(shown) + 2.0), sharey=True)
    lds_axes.barh(
        positions, [result.lds.mean for result in shown], xerr=[result.lds.standard_error for result in shown],
        color="tab:blue", capsize=3,
    )
    if ceiling is not None:
        lds_axes.axvline(ceiling.ceiling, color="tab:red", linestyle="--", label=f"noise ceiling {ceiling.ceiling:.2f}")
        lds_axes.legend(loc="lower right")
    lds_axes.axvline(0.0, color="grey", linewidth=0.8)
    lds_axes.set_yticks(positions, names)
    lds_axes.invert_yaxis()
    lds_axes.set_xlabel("LDS (mean ± standard error over test samples)")
    time_axes.barh(positions, [max(result.seconds, 1e-3) for result in shown], color="tab:gray")
    time_axes.set_xscale("log")
    time_axes.set_xlabel("seconds (attributions of all test samples)")
    if title:
        figure.suptitle(textwrap.fill(title, 110), fontsize="medium")
    figure.tight_layout()
    return figure
