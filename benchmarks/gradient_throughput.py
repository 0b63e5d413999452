"""Per-sample gradient throughput: closed form vs. generic vectorization vs. one batch gradient.

For an MLP (64-128-10) and a small CNN (28×28×1 → Conv 16 → Conv 32 → Dense 10), all layers
watched, one batch, this times (median of up to ``--repeats`` runs after one warm-up/trace, about
``--budget`` seconds per method; the fast methods run in interleaved rounds so that their ratios
are stable on a shared machine):

* ``closed_form``      — ``InfluenceModel.batch_jacobian_tensor`` (one forward + one backward pass,
  per-layer closed form, concatenated into one ``(B, P)`` matrix),
* ``closed_form_blocks`` — ``InfluenceModel.batch_jacobian_blocks`` (the same, one ``(B, P_l)``
  block per layer: no concatenation copy),
* ``jacobian_pfor``    — ``GradientTape.jacobian`` with pfor (``per_sample_gradients="jacobian"``),
* ``vectorized_map``   — ``tf.vectorized_map`` of a one-sample gradient,
* ``batch_gradient``   — one plain forward + backward pass of the batch (gradient of the summed
  loss: the floor any per-sample method has to pay),
* ``norm_sq_closed``   — ``batch_gradient_norm_sq_tensor`` (factored ‖g_i‖², no gradients formed),
* ``write_result``     — filling a ``(B, P)`` float32 matrix once: no gradient at all, the memory
  traffic any method that returns the per-sample gradients has to pay on top of ``batch_gradient``,

and reports samples/s and the ratio of each to ``batch_gradient``. It also checks that the closed
form agrees with the pfor jacobian. Run from the repository root::

    python benchmarks/gradient_throughput.py [--batch-size 256] [--repeats 200] [--budget 3] [--json out.json]
"""
import argparse
import json
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

from influence_lib.model import InfluenceModel


def mlp() -> tuple[keras.Model, tuple[int, ...]]:
    model = keras.Sequential([
        keras.Input((64,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    return model, (64,)


def cnn() -> tuple[keras.Model, tuple[int, ...]]:
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Conv2D(16, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    return model, (28, 28, 1)


def vectorized_map_gradients(influence_model: InfluenceModel):
    """Per-sample gradients with ``tf.vectorized_map`` of a one-sample gradient."""
    model, loss_function, weights = influence_model.model, influence_model.loss_function, influence_model.tf_variables

    def one_sample(sample):
        inputs, targets = sample
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(weights)
            loss = tf.reduce_sum(loss_function(targets[None], model(inputs[None], training=False)))
        return influence_model.flatten(tape.gradient(loss, weights))

    @tf.function
    def run(batch):
        return tf.vectorized_map(one_sample, batch)

    return run


def write_result(nb_params: int):
    """Fill a ``(B, nb_params)`` float32 matrix with a value read from the batch (so it is not
    folded into a constant): the cost of writing the per-sample gradient matrix once."""

    @tf.function
    def run(batch):
        inputs = batch[0]
        return tf.fill([tf.shape(inputs)[0], nb_params], tf.reshape(inputs, [-1])[0])

    return run


def wait_for(result) -> None:
    """Block until ``result`` is computed on every device (``sync_devices``), without copying it to
    NumPy: a host copy of the B × P matrix is not part of computing per-sample gradients."""
    del result
    tf.test.experimental.sync_devices()


def seconds_of(function, batch) -> float:
    start = time.perf_counter()
    wait_for(function(batch))
    return time.perf_counter() - start


def median_seconds(methods: dict, batch, repeats: int, budget: float) -> dict[str, float]:
    """Median wall time of each ``method(batch)`` after a warm-up call.

    Methods fast enough for 10 runs within ``budget`` seconds are timed in interleaved rounds (one
    call of each per round, up to ``repeats`` rounds, about ``budget`` seconds per method), so that
    a slow spell of the machine hits them all alike and their ratios stay stable; slower ones get
    as many runs as fit in ``budget`` (at least one).
    """
    first = {}
    for name, function in methods.items():
        wait_for(function(batch))
        first[name] = seconds_of(function, batch)
    fast = [name for name, seconds in first.items() if seconds * 10 <= budget]
    timings = {name: [seconds] for name, seconds in first.items()}
    rounds = min(repeats, int(budget * len(fast) / max(sum(first[name] for name in fast), 1e-9)))
    for _ in range(rounds - 1):
        for name in fast:
            timings[name].append(seconds_of(methods[name], batch))
    for name in set(methods) - set(fast):
        for _ in range(min(repeats, int(budget / first[name])) - 1):
            timings[name].append(seconds_of(methods[name], batch))
    return {name: statistics.median(values) for name, values in timings.items()}


def benchmark(name: str, builder, batch_size: int, repeats: int, budget: float) -> dict:
    model, input_shape = builder()
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(size=(batch_size, *input_shape)).astype(np.float32))
    y = tf.constant(np.eye(10, dtype=np.float32)[rng.integers(0, 10, batch_size)])
    batch = (x, y)
    last = len(model.layers) - 1
    closed = InfluenceModel(model, 0, last)
    generic = InfluenceModel(model, 0, last, per_sample_gradients="jacobian")
    error = float(tf.reduce_max(tf.abs(closed.batch_jacobian_tensor(batch) - generic.batch_jacobian_tensor(batch))))
    if closed.fallback_reason is not None:
        raise RuntimeError(f"{name}: the closed form was not used ({closed.fallback_reason}).")
    methods = {
        "closed_form": closed.batch_jacobian_tensor,
        "closed_form_blocks": closed.batch_jacobian_blocks,
        "jacobian_pfor": generic.batch_jacobian_tensor,
        "vectorized_map": vectorized_map_gradients(closed),
        "batch_gradient": closed.batch_gradient_tensor,
        "norm_sq_closed": closed.batch_gradient_norm_sq_tensor,
        "write_result": write_result(closed.nb_params),
    }
    seconds = median_seconds(methods, batch, repeats, budget)
    return {
        "model": name,
        "nb_params": closed.nb_params,
        "batch_size": batch_size,
        "max_abs_difference_vs_pfor": error,
        "samples_per_second": {method: batch_size / s for method, s in seconds.items()},
        "time_vs_batch_gradient": {method: s / seconds["batch_gradient"] for method, s in seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed runs per method, at most")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    keras.utils.set_random_seed(0)
    models = (("MLP", mlp), ("CNN", cnn))
    results = [benchmark(name, builder, args.batch_size, args.repeats, args.budget) for name, builder in models]
    methods = list(results[0]["samples_per_second"])
    print(f"{'model':<6}{'params':>9}  " + "".join(f"{m:>20}" for m in methods))
    for result in results:
        rates = "".join(f"{result['samples_per_second'][m]:>18.0f}/s" for m in methods)
        ratios = "".join(f"{result['time_vs_batch_gradient'][m]:>19.2f}x" for m in methods)
        print(f"{result['model']:<6}{result['nb_params']:>9}  {rates}")
        print(f"{'':<6}{'time/fb':>9}  {ratios}   (max |closed − pfor| = {result['max_abs_difference_vs_pfor']:.1e})")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
