"""Per-batch overhead of the library's result streams around the per-batch arithmetic (issue 17).

For a CNN with BatchNormalization (all layers watched, closed-form per-sample gradients) and
batch sizes 8, 32 and 256, it times

* ``arithmetic``: the compiled per-batch computation alone, called on the training batches
  already in memory (TracIn's ``_compute_influence_value_from_batch`` for self-influence,
  ``_compute_influence_vector`` for influence vectors), waiting for the result;
* ``stream``: iterating the result dataset the user gets (``compute_influence_values`` /
  ``compute_influence_vector``) over a ``tf.data`` training set, per batch — what a user pays,
  including reading the input batches, checks, casts and the stream machinery;
* ``input``: iterating the ``tf.data`` training set alone (reading the batches, no computation),
  the part of the overhead that any consumer of the user's dataset pays.

The overhead is ``stream − arithmetic``, of which ``stream − arithmetic − input`` is the library's
own; the goal is ``stream ≤ 1.5 × arithmetic`` at batch 32.
Both run in interleaved rounds (one pass of each per round, so that a slow spell of the shared
machine hits both alike), after one warm-up pass (traces excluded); each figure is reported as the
minimum and the median over ``--repeats`` rounds, in two clocks:

* ``wall``: elapsed time, what a user waits (on a shared machine, mostly a measure of its load);
* ``cpu``: CPU time of the whole process (all threads, ``time.process_time``), which other jobs on
  the machine barely change; with ``--threads 1`` (one TensorFlow thread) it is the work done.

Each pass drops every result once read (``.numpy()``), as a user streaming them would.

Command (≈ 1 min on 2 cores): ``python benchmarks/per_batch_overhead.py``
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import influence_lib as il  # noqa: E402


def cnn() -> keras.Model:
    """28×28×1 → Conv 16 → BN → ReLU → pool → Conv 32 → BN → ReLU → pool → Dropout → Dense 10 softmax."""
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.3),
        keras.layers.Dense(10, activation="softmax"),
    ])


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _interleaved_times(functions: list, repeats: int) -> list[dict[str, list[float]]]:
    """Seconds of each call of each function on each clock, timed in rounds of one call of each."""
    times = [{clock: [] for clock in CLOCKS} for _ in functions]
    for _ in range(repeats):
        for function, spent in zip(functions, times):
            start = {clock: read() for clock, read in CLOCKS.items()}
            function()
            for clock, read in CLOCKS.items():
                spent[clock].append(read() - start[clock])
    return times


def _read_all(values) -> None:
    """Copy every result to the host and drop it."""
    for value in values:
        value.numpy()


def measure(batch_size: int, batches: int, repeats: int) -> dict:
    model = cnn()
    rng = np.random.default_rng(0)
    n = batch_size * batches
    x = rng.normal(size=(n, 28, 28, 1)).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, n)]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    tracin = il.TracIn([il.InfluenceModel(model, 0, -1)], 0.1, show_progress=False)
    in_memory = [tuple(batch) for batch in dataset]
    row = {"batch_size": batch_size, "path": tracin.models[0].per_sample_gradient_path.split(" (")[0]}
    for name, hook, stream in (
        ("self_influence", tracin._compute_influence_value_from_batch, tracin.compute_influence_values),
        ("influence_vector", tracin._compute_influence_vector, tracin.compute_influence_vector),
    ):
        result = stream(dataset)
        list(result)
        arithmetic, per_batch, reading = _interleaved_times(
            [
                lambda: _read_all(hook(batch) for batch in in_memory),
                lambda: _read_all(v for _, v in result),
                lambda: _read_all(batch[0] for batch in dataset),
            ],
            repeats,
        )
        row[name] = {
            clock: {
                f"{statistic}_{what}_ms": 1e3 * reduce(spent[clock]) / batches
                for statistic, reduce in (("min", min), ("median", statistics.median))
                for what, spent in (("arithmetic", arithmetic), ("stream", per_batch), ("input", reading))
            }
            for clock in CLOCKS
        }
        for figures in row[name].values():
            for statistic in ("min", "median"):
                figures[f"{statistic}_ratio"] = figures[f"{statistic}_stream_ms"] / figures[f"{statistic}_arithmetic_ms"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 256])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, help="TensorFlow intra- and inter-op threads (default: TensorFlow's)")
    parser.add_argument("--json", help="write the rows to this file")
    arguments = parser.parse_args()
    if arguments.threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(arguments.threads)
        tf.config.threading.set_inter_op_parallelism_threads(arguments.threads)
    rows = [measure(size, arguments.batches, arguments.repeats) for size in arguments.batch_sizes]
    print("ms per batch, min / median over the rounds")
    print(
        f"{'batch':>5} {'result':<17} {'clock':<5} {'arithmetic':>15} {'stream':>15} {'input':>13} "
        f"{'stream/arithmetic':>17}"
    )
    for row in rows:
        for name in ("self_influence", "influence_vector"):
            for clock, figures in row[name].items():
                cells = [
                    f"{figures['min_' + what]:.2f} / {figures['median_' + what]:.2f}"
                    for what in ("arithmetic_ms", "stream_ms", "input_ms", "ratio")
                ]
                print(
                    f"{row['batch_size']:>5} {name:<17} {clock:<5} {cells[0]:>15} {cells[1]:>15} {cells[2]:>13} "
                    f"{cells[3]:>17}"
                )
    print("per-sample gradients:", rows[0]["path"])
    if arguments.json:
        with open(arguments.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
