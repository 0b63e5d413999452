"""Influenciae 0.3.0 side of the side-by-side benchmark.

Runs in Influenciae's own interpreter (TF 2.21 with legacy Keras 2: ``TF_USE_LEGACY_KERAS=1``),
never imports influence_lib, reads the weights trained by the influence_lib side from
``model.npz`` and prints one JSON line per workload (see :mod:`workloads`).

Influenciae's limits that shape the settings:

* ``ExactIHVP`` builds the Hessian with a per-batch ``jacobian`` of the per-sample gradients,
  whose memory grows as batch × P²: batches of more than 8 samples do not fit for P = 1290.
* ``ConjugateGradientDescentIHVP`` solves one right-hand side at a time and every
  Hessian-vector product loops over the Hessian samples one by one (``map_fn``), so it is timed
  on a subset of the samples and compared per sample.
"""
import argparse
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from deel.influenciae.common import ConjugateGradientDescentIHVP, ExactIHVP, InfluenceModel
from deel.influenciae.influence import ArnoldiInfluenceCalculator, FirstOrderInfluenceCalculator
from deel.influenciae.trac_in import TracIn
from tensorflow.keras.losses import CategoricalCrossentropy, Reduction

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads

SIDE = "influenciae"


def build_model(settings: workloads.Settings, weights: list[np.ndarray]) -> tf.keras.Model:
    """The same MLP as the influence_lib side, in Keras 2, with the given weights."""
    model = tf.keras.Sequential(
        [
            tf.keras.Input((settings.input_dim,)),
            tf.keras.layers.Dense(settings.hidden_units, activation="relu"),
            tf.keras.layers.Dense(settings.n_classes, activation="softmax"),
        ]
    )
    model.set_weights(weights)
    return model


def influence_model(
    settings: workloads.Settings, weights: list[np.ndarray], layers: tuple[int, int | None] = (-1, None)
) -> InfluenceModel:
    loss = CategoricalCrossentropy(from_logits=False, reduction=Reduction.NONE)
    start_layer, last_layer = layers
    return InfluenceModel(build_model(settings, weights), start_layer, last_layer, loss_function=loss)


def dataset(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)


def self_influence(calculator, data: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([np.reshape(values.numpy(), -1) for _, values in calculator.compute_influence_values(data)])


def run_exact(settings, model, inputs, labels) -> np.ndarray:
    hessian_data = dataset(*workloads.hessian_part(inputs, labels, settings), settings.influenciae_hessian_batch_size)
    ihvp = ExactIHVP(model, hessian_data)
    calculator = FirstOrderInfluenceCalculator(model, hessian_data, ihvp_calculator=ihvp)
    return self_influence(calculator, dataset(inputs, labels, settings.influenciae_batch_size))


def run_cg(settings, model, inputs, labels) -> np.ndarray:
    hessian_data = dataset(*workloads.hessian_part(inputs, labels, settings), settings.influenciae_batch_size)
    ihvp = ConjugateGradientDescentIHVP(model, -1, hessian_data, n_opt_iters=settings.cg_max_iterations)
    calculator = FirstOrderInfluenceCalculator(model, hessian_data, ihvp_calculator=ihvp)
    subset = dataset(inputs[: settings.cg_subset], labels[: settings.cg_subset], settings.cg_subset)
    return self_influence(calculator, subset)


def run_arnoldi(settings, model, inputs, labels) -> np.ndarray:
    tf.random.set_seed(settings.seed)
    hessian_data = dataset(*workloads.hessian_part(inputs, labels, settings), settings.influenciae_batch_size)
    calculator = ArnoldiInfluenceCalculator(
        model, hessian_data, settings.arnoldi_subspace_dim, force_hermitian=True, k_largest_eig_vals=settings.arnoldi_k
    )
    return self_influence(calculator, dataset(inputs, labels, settings.influenciae_batch_size))


def run(settings: workloads.Settings, workdir: Path, names: list[str]) -> Iterator[dict]:
    """Time each workload; yield its JSON summary as soon as it is done."""
    arrays = workloads.load_model_file(workdir)
    inputs, labels = arrays["inputs"], arrays["labels"]
    model = influence_model(settings, workloads.weights_of(arrays))
    tracin = {
        name: TracIn(
            [influence_model(settings, workloads.weights_of(arrays, prefix), layers)
             for prefix in workloads.checkpoint_prefixes(settings)],
            settings.learning_rate,
        )
        for name, layers in workloads.TRACIN_LAYERS.items()
        if name in names
    }
    runners = {
        "exact": lambda: run_exact(settings, model, inputs, labels),
        "cg": lambda: run_cg(settings, model, inputs, labels),
        **{
            name: lambda calculator=calculator: self_influence(
                calculator, dataset(inputs, labels, settings.influenciae_batch_size)
            )
            for name, calculator in tracin.items()
        },
        "arnoldi": lambda: run_arnoldi(settings, model, inputs, labels),
    }
    yield from workloads.run_all(SIDE, runners, names, settings, workdir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workdir", type=Path, required=True, help="Holds settings.json and model.npz.")
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOADS))
    args = parser.parse_args(argv)
    settings = workloads.Settings.load(args.workdir / "settings.json")
    for result in run(settings, args.workdir, workloads.parse_workloads(args.workloads)):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
