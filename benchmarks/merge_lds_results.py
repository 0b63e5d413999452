"""Merge the results of several ``influence-benchmark lds`` runs on the same ground truth into one table and plot.

Methods of one benchmark are often run in separate invocations (a slow method does not block the
others; the same method with other settings needs its own run). Each invocation writes
``OUT/results.json``; this script picks methods from them, renames them, and writes one Markdown
table (``faithfulness_table``) and one figure (``plot_faithfulness``). The runs must share the
ground truth (same ``--store``): the noise ceiling of the first run is printed under the table,
and runs whose dataset, model or subsets differ are refused.

Usage::

    python benchmarks/merge_lds_results.py --out-md table.md --out-png lds.png \\
        runs/trak50:trak_ensemble:TRAK-50 runs/defaults:first_order_ekfac runs/defaults:random
"""
import argparse
import json
import os

import numpy as np

from influence_lib.benchmark.faithfulness import CorrelationSummary, NoiseCeiling
from influence_lib.benchmark.faithfulness_evaluator import FaithfulnessResult
from influence_lib.benchmark.faithfulness_report import faithfulness_table, plot_faithfulness


def _summary(entry: dict | None) -> CorrelationSummary | None:
    if entry is None:
        return None
    return CorrelationSummary(entry["mean"], entry["standard_error"], np.empty(0), entry.get("nb_undefined", 0))


def _protocol(config: dict) -> tuple:
    return config["dataset"], config["model"], config["nb_train"], config["nb_test"], json.dumps(config["setup"])


def merge(specs: list[str]) -> tuple[dict[str, FaithfulnessResult], NoiseCeiling | None, str]:
    """``DIR:METHOD[:LABEL]`` specifications → results by label, the noise ceiling and the description."""
    results, ceiling, protocol, description = {}, None, None, ""
    for spec in specs:
        directory, _, rest = spec.partition(":")
        method, _, label = rest.partition(":")
        with open(os.path.join(directory, "results.json"), encoding="utf-8") as stream:
            run = json.load(stream)
        if protocol is None:
            protocol, description = _protocol(run["config"]), run["config"].get("description", "")
            if run.get("noise_ceiling"):
                ceiling = NoiseCeiling(_summary(run["noise_ceiling"]["run_to_run"]), run["noise_ceiling"]["ceiling"])
        elif _protocol(run["config"]) != protocol:
            raise ValueError(f"{directory} was run on another protocol than {specs[0].partition(':')[0]}.")
        if method not in run["methods"]:
            raise ValueError(f"{directory}/results.json has no method {method!r}; it has {sorted(run['methods'])}.")
        entry = run["methods"][method]
        loo = None if entry["loo"] is None else {key: _summary(value) for key, value in entry["loo"].items()}
        name = label or method
        results[name] = FaithfulnessResult(name, _summary(entry["lds"]), loo, entry["seconds"], entry["error"])
    return results, ceiling, description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="DIR:METHOD[:LABEL]")
    parser.add_argument("--out-md", default=None, help="write the Markdown table here")
    parser.add_argument("--out-png", default=None, help="write the plot here")
    parser.add_argument("--title", default=None, help="plot title (default: the first run's description)")
    arguments = parser.parse_args()
    results, ceiling, description = merge(arguments.runs)
    print(faithfulness_table(results, ceiling))
    if arguments.out_md:
        with open(arguments.out_md, "w", encoding="utf-8") as stream:
            stream.write(faithfulness_table(results, ceiling, markdown=True) + "\n")
    if arguments.out_png:
        figure = plot_faithfulness(results, ceiling, title=arguments.title or description)
        figure.savefig(arguments.out_png, dpi=120, bbox_inches="tight")


if __name__ == "__main__":
    main()
