"""EK-FAC at scale: factors through every layer of a ~0.9M-parameter CNN and the self-influence of every sample.

Usage (from the repository root, with the project's interpreter)::

    .venv/bin/python benchmarks/ekfac_scale.py [--samples 50000] [--batch-size 250] [--factors-path DIR]

CIFAR-shaped inputs (32×32×3, random; 10 random classes), streamed from a ``tf.data`` pipeline
that generates them batch by batch (never held in memory as a whole). The network (random
initial weights: the cost does not depend on training) is Conv2D(32, 3×3, same)-Conv2D(64, 3×3,
stride 2)-Conv2D(128, 3×3, stride 2)-Flatten-Dense(128)-Dense(10), ReLU, 897,482 parameters, all
watched. Prints one JSON line: wall times of the two factor passes (with the float64
eigendecompositions) and of the self-influence pass, and the peak resident memory of the process.
"""
import argparse
import json
import resource
import time

import keras
import numpy as np
import tensorflow as tf

import influence_lib as il


def make_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(128, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def make_dataset(samples: int, batch_size: int) -> tf.data.Dataset:
    """Deterministic CIFAR-shaped batches generated on the fly (sample i depends only on i)."""

    def sample(index):
        seed = tf.stack([tf.constant(7, tf.int64), index])
        image = tf.random.stateless_uniform((32, 32, 3), seed=seed)
        label = tf.random.stateless_uniform((), seed=seed + 1, maxval=10, dtype=tf.int64)
        return image, tf.one_hot(label, 10)

    return tf.data.Dataset.range(samples).map(sample).batch(batch_size).prefetch(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=50000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--factors-path", default=None, help="save the factors there (default: not saved)")
    args = parser.parse_args()
    model = make_model()
    dataset = make_dataset(args.samples, args.batch_size)
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=-1)
    start = time.perf_counter()
    ihvp = il.EKFACIHVP(influence_model, dataset, factors_path=args.factors_path, show_progress=False)
    fitted = time.perf_counter()
    calculator = il.KroneckerInfluenceCalculator(influence_model, dataset, ihvp, show_progress=False)
    values = il.extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    scored = time.perf_counter()
    print(json.dumps({
        "params": influence_model.nb_params,
        "samples": args.samples,
        "factors_s": round(fitted - start, 1),
        "self_influence_s": round(scored - fitted, 1),
        "total_s": round(scored - start, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "self_influence_finite": bool(np.isfinite(values).all()),
        "self_influence_count": int(values.size),
    }), flush=True)


if __name__ == "__main__":
    main()
