"""Per-batch overhead of the library's result streams around the per-batch arithmetic (issue 17).

For a CNN with BatchNormalization (all layers watched, closed-form per-sample gradients) and
batch sizes 8, 32 and 256, it times

* ``arithmetic``: the compiled per-batch computation alone, called on the training batches
  already in memory (TracIn's ``_compute_influence_value_from_batch`` for self-influence,
  ``_compute_influence_vector`` for influence vectors), waiting for the result;
* ``stream``: iterating the result dataset the user gets (``compute_influence_values`` /
  ``compute_influence_vector``) over a ``tf.data`` training set, per batch — what a user pays,
  including reading the input batches, checks, casts and the stream machinery.

The overhead is ``stream − arithmetic``; the goal is ``stream ≤ 1.5 × arithmetic`` at batch 32.
Both run in interleaved rounds (one pass of each per round, so that a slow spell of the shared
machine hits both alike); each figure is the median over ``--repeats`` rounds after one warm-up
pass (traces excluded).

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


def _interleaved_medians(functions: list, repeats: int) -> list[float]:
    """Median seconds of each function, timed in rounds of one call of each."""
    times = [[] for _ in functions]
    for _ in range(repeats):
        for function, spent in zip(functions, times):
            start = time.perf_counter()
            function()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


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
        arithmetic, per_batch = (
            seconds / batches
            for seconds in _interleaved_medians(
                [lambda: [hook(batch).numpy() for batch in in_memory], lambda: [v.numpy() for _, v in result]],
                repeats,
            )
        )
        row[name] = {
            "arithmetic_ms": 1e3 * arithmetic,
            "stream_ms": 1e3 * per_batch,
            "overhead_ms": 1e3 * (per_batch - arithmetic),
            "ratio": per_batch / arithmetic,
        }
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 256])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the rows to this file")
    arguments = parser.parse_args()
    rows = [measure(size, arguments.batches, arguments.repeats) for size in arguments.batch_sizes]
    print(f"{'batch':>5} {'result':<17} {'arithmetic ms':>13} {'stream ms':>9} {'overhead ms':>11} {'ratio':>5}")
    for row in rows:
        for name in ("self_influence", "influence_vector"):
            figures = row[name]
            print(
                f"{row['batch_size']:>5} {name:<17} {figures['arithmetic_ms']:>13.2f} {figures['stream_ms']:>9.2f} "
                f"{figures['overhead_ms']:>11.2f} {figures['ratio']:>5.2f}"
            )
    print("per-sample gradients:", rows[0]["path"])
    if arguments.json:
        with open(arguments.json, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
