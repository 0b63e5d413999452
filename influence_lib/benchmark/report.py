"""Benchmark results as a text table (plain or Markdown) and as JSON."""
import json
from collections.abc import Mapping

import numpy as np

from .evaluator import MethodResult


def _row(result: MethodResult) -> list[str]:
    return [
        result.name,
        f"{result.roc_auc_mean:.3f} ± {result.roc_auc_std:.3f}",
        f"{result.curve_area_mean:.3f} ± {result.curve_area_std:.3f}",
        f"{result.found_at(0.1):.3f}",
        f"{result.found_at(0.2):.3f}",
        f"{result.seconds_mean:.1f} ± {result.seconds_std:.1f}",
    ]


HEADER = ["method", "ROC-AUC", "detection-curve area", "found in top 10%", "found in top 20%", "time (s)"]


def results_table(results: Mapping[str, MethodResult], markdown: bool = False) -> str:
    """The results as a table, one method per row (mean ± std over the seeds), best ROC-AUC first."""
    ordered = sorted(results.values(), key=lambda result: -result.roc_auc_mean)
    rows = [HEADER] + [_row(result) for result in ordered]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
        return "\n".join(lines)
    widths = [max(len(row[column]) for row in rows) for column in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


MAX_CURVE_POINTS = 1001


def _curve_points(fraction_found: np.ndarray) -> tuple[list[float], list[float]]:
    """The detection curve at no more than ``MAX_CURVE_POINTS`` evenly spaced points (ends included)."""
    inspected = np.linspace(0.0, 1.0, fraction_found.size)
    if fraction_found.size > MAX_CURVE_POINTS:
        kept = np.unique(np.linspace(0, fraction_found.size - 1, MAX_CURVE_POINTS).round().astype(int))
        inspected, fraction_found = inspected[kept], fraction_found[kept]
    return np.round(inspected, 6).tolist(), np.round(fraction_found, 6).tolist()


def results_to_dict(results: Mapping[str, MethodResult], config: Mapping | None = None) -> dict:
    """A JSON-serializable summary: config, per-method mean/std, per-seed numbers and the mean
    detection curve (at most ``MAX_CURVE_POINTS`` points)."""
    methods = {}
    for name, result in results.items():
        inspected, found = _curve_points(result.mean_fraction_found)
        methods[name] = {
            "roc_auc_mean": result.roc_auc_mean,
            "roc_auc_std": result.roc_auc_std,
            "curve_area_mean": result.curve_area_mean,
            "curve_area_std": result.curve_area_std,
            "found_in_top_10_percent": result.found_at(0.1),
            "found_in_top_20_percent": result.found_at(0.2),
            "seconds_mean": result.seconds_mean,
            "seconds_std": result.seconds_std,
            "mean_curve_fraction_inspected": inspected,
            "mean_curve_fraction_found": found,
            "runs": [
                {
                    "seed": run.seed,
                    "roc_auc": run.roc_auc,
                    "curve_area": run.curve_area,
                    "seconds": run.seconds,
                    "train_accuracy": run.train_accuracy,
                    "test_accuracy": run.test_accuracy,
                }
                for run in result.runs
            ],
        }
    return {"config": dict(config or {}), "methods": methods}


def save_json(results: Mapping[str, MethodResult], path: str, config: Mapping | None = None) -> None:
    """Write :func:`results_to_dict` to ``path``."""
    with open(path, "w", encoding="utf-8") as stream:
        json.dump(results_to_dict(results, config), stream, indent=2)
