"""Command line of the benchmarks: mislabel detection (the default) and faithfulness (``lds``).

Examples::

    influence-benchmark --dataset digits --noise 0.1 --methods all --seeds 3 --out results/
    influence-benchmark lds --dataset fashion-mnist --model logreg --train-size 5000 --test-size 500 \\
        --subsets 100 --methods all --out lds_results/

The mislabel form (also ``influence-benchmark mislabel ...``) prints the results table and writes
``results.json``, ``detection_curves.png`` and ``self_influence_histogram.png``; the ``lds`` form
writes ``results.json``, ``results.md`` and ``lds.png`` (see :mod:`influence_lib.benchmark.lds_cli`).
Arguments and output directories are checked before anything is trained (exit code 2).
"""
import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from .cli_arguments import check_writable_directory, non_negative_int, open_fraction, positive_int, widths


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the mislabel benchmark (``influence-benchmark [mislabel] ...``)."""
    parser = argparse.ArgumentParser(
        prog="influence-benchmark",
        description="Mislabel-detection benchmark: flip a fraction of the labels, train an MLP, "
        "rank the training samples with each method, report ROC-AUC, detection curves and time. "
        "The faithfulness benchmark (LDS, leave-one-out) is the subcommand 'lds': influence-benchmark lds --help.",
    )
    parser.add_argument(
        "--dataset", default="digits", help="digits (offline, default), fashion_mnist, mnist or cifar10"
    )
    parser.add_argument(
        "--data-path", default=None, help="local directory of the dataset files (fashion_mnist, mnist, cifar10)"
    )
    parser.add_argument(
        "--noise", type=open_fraction, default=0.1, help="fraction of training labels flipped (default 0.1)"
    )
    parser.add_argument("--methods", default="all", help="'all' or a comma-separated list of method names")
    parser.add_argument("--seeds", type=positive_int, default=3, help="number of seeds (trainings) to average over")
    parser.add_argument("--first-seed", type=non_negative_int, default=0, help="first seed (default 0)")
    parser.add_argument("--out", default="benchmark_output", help="output directory for JSON and PNG files")
    parser.add_argument("--epochs", type=positive_int, default=30, help="training epochs of the MLP")
    parser.add_argument("--hidden", type=widths, default=(128,), help="comma-separated hidden layer widths of the MLP")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="training batch size")
    parser.add_argument(
        "--n-train", type=positive_int, default=None, help="use a random subset of this many training samples"
    )
    parser.add_argument(
        "--n-test", type=positive_int, default=None, help="use a random subset of this many test samples"
    )
    parser.add_argument("--list-methods", action="store_true", help="list the method names and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(arguments: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``arguments``; return the results."""
    from ..plots.self_influence_histogram import plot_self_influence_histogram
    from .datasets import load_dataset
    from .evaluator import MislabelingDetectorEvaluator
    from .factories import resolve_methods
    from .report import results_table
    from .training import MLPTrainingProcedure

    factories = resolve_methods(arguments.methods)
    data = load_dataset(arguments.dataset, arguments.data_path).subset(arguments.n_train, arguments.n_test)
    hidden_units = arguments.hidden
    procedure = MLPTrainingProcedure(hidden_units, arguments.epochs, arguments.batch_size)
    evaluator = MislabelingDetectorEvaluator(
        (data.x_train, data.y_train),
        (data.x_test, data.y_test),
        procedure,
        data.nb_classes,
        arguments.noise,
        show_progress=not arguments.quiet,
    )
    start = time.perf_counter()
    results = evaluator.bench(factories, arguments.seeds, arguments.out, seed=arguments.first_seed)
    elapsed = time.perf_counter() - start
    first_runs = next(iter(results.values())).runs
    accuracies = ", ".join(
        f"seed {run.seed}: train {run.train_accuracy:.3f} / test {run.test_accuracy:.3f}" for run in first_runs
    )
    print(
        f"\nMislabel detection on {data.name} ({len(data.y_train)} training samples, {arguments.noise:.0%} labels "
        f"flipped, MLP {hidden_units}, {arguments.seeds} seed(s)); mean ± std over seeds\n"
    )
    print(results_table(results))
    print(f"\nModel accuracy (noisy train / clean test): {accuracies}")
    best = max(results.values(), key=lambda result: result.roc_auc_mean)
    best_run = best.runs[0]
    is_flipped = np.zeros(best_run.scores.size, dtype=bool)
    is_flipped[best_run.flipped_indices] = True
    histogram = plot_self_influence_histogram(
        best_run.scores, is_flipped, log_scale=bool((best_run.scores > 0).all()),
        title=f"{best.name} scores, seed {best_run.seed}", score_name=f"{best.name} score",
    )
    histogram_path = os.path.abspath(os.path.join(arguments.out, "self_influence_histogram.png"))
    histogram.savefig(histogram_path, dpi=120, bbox_inches="tight")
    print(most_suspicious_table(results, data, arguments.noise))
    print(f"Total time {elapsed:.1f} s. Results: {os.path.abspath(os.path.join(arguments.out, 'results.json'))}")
    print(f"Detection curves: {os.path.abspath(os.path.join(arguments.out, 'detection_curves.png'))}")
    print(f"Score histogram: {histogram_path}")
    return results


def most_suspicious_table(results: dict, data, noise: float, count: int = 10) -> str:
    """The ``count`` highest-scored training samples of the first seed, by exact influence if it ran."""
    from .label_noise import flip_labels

    method = results.get("first_order_exact") or max(results.values(), key=lambda result: result.roc_auc_mean)
    run_result = method.runs[0]
    noisy_labels, _ = flip_labels(data.y_train, data.nb_classes, noise, run_result.seed)
    flipped = set(run_result.flipped_indices.tolist())
    lines = [
        f"\n{count} most suspicious training samples ({method.name}, seed {run_result.seed}):",
        f"{'index':>6}  {'score':>12}  {'given label':>11}  {'true label':>10}  flipped",
    ]
    for index in np.argsort(-run_result.scores, kind="stable")[:count]:
        lines.append(
            f"{index:>6}  {run_result.scores[index]:>12.4g}  {noisy_labels[index]:>11}  {data.y_train[index]:>10}  "
            f"{'yes' if index in flipped else 'no'}"
        )
    return "\n".join(lines)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace | int:
    """Parsed arguments, or the exit code argparse chose (2 for bad arguments, 0 for --help)."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m influence_lib.benchmark`` and of the ``influence-benchmark`` script.

    Returns the exit code: 0 on success, 2 for bad arguments or an unusable output directory
    (checked before any training) and for errors of the run itself (printed to stderr).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lds":
        from .lds_cli import main as lds_main

        return lds_main(argv[1:])
    if argv and argv[0] == "mislabel":
        argv = argv[1:]
    parser = build_parser()
    arguments = _parse(parser, argv)
    if isinstance(arguments, int):
        return arguments
    if arguments.list_methods:
        from .factories import METHODS

        print("\n".join(METHODS))
        return 0
    try:
        from .factories import resolve_methods

        resolve_methods(arguments.methods)
        check_writable_directory(parser, arguments.out, "--out")
    except ValueError as error:
        print(f"influence-benchmark: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 2
    try:
        run(arguments)
    except (ValueError, FileNotFoundError, ImportError, RuntimeError) as error:
        print(f"influence-benchmark: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
