"""influence_lib side of the side-by-side benchmark (runs in the project's own interpreter).

``prepare`` trains the MLP 64-128-10 once on the shared Gaussian-mixture data and writes the
data, the final weights and the TracIn checkpoints to ``model.npz``; ``run`` times the workloads
and prints one JSON line per workload (see :mod:`workloads`).
"""
import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workloads

from influence_lib.curvature import ConjugateGradientDescentIHVP, ExactIHVP
from influence_lib.influence.first_order import FirstOrderInfluenceCalculator
from influence_lib.model.influence_model import InfluenceModel

SIDE = "influence_lib"
# Workloads whose method may not be in this version of influence_lib yet: skipped with a note.
OPTIONAL_MODULES = {
    "tracin": "influence_lib.influence.tracin",
    "tracin_all": "influence_lib.influence.tracin",
    "arnoldi": "influence_lib.influence.arnoldi",
}


def build_model(settings: workloads.Settings, weights: list[np.ndarray] | None = None) -> keras.Model:
    """The MLP input_dim → hidden (ReLU) → n_classes (softmax)."""
    model = keras.Sequential(
        [
            keras.Input((settings.input_dim,)),
            keras.layers.Dense(settings.hidden_units, activation="relu"),
            keras.layers.Dense(settings.n_classes, activation="softmax"),
        ]
    )
    if weights is not None:
        model.set_weights(weights)
    return model


def prepare(settings: workloads.Settings, workdir: Path) -> dict:
    """Train once with SGD and store data, final weights and per-epoch checkpoints."""
    keras.utils.set_random_seed(settings.seed)
    inputs, labels = workloads.make_data(settings)
    model = build_model(settings)
    model.compile(
        optimizer=keras.optimizers.SGD(settings.learning_rate),
        loss=keras.losses.CategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    arrays = {"inputs": inputs, "labels": labels}
    accuracy = float("nan")
    for epoch in range(1, settings.train_epochs + 1):
        history = model.fit(inputs, labels, batch_size=settings.train_batch_size, epochs=1, shuffle=True, verbose=0)
        accuracy = float(history.history["accuracy"][-1])
        if epoch in settings.checkpoint_epochs:
            for index, weight in enumerate(model.get_weights()):
                arrays[f"epoch{epoch}_{index}"] = weight
    for index, weight in enumerate(model.get_weights()):
        arrays[f"final_{index}"] = weight
    np.savez(workdir / "model.npz", **arrays)
    return {"side": SIDE, "step": "prepare", "train_accuracy": accuracy}


def dataset(inputs: np.ndarray, labels: np.ndarray, batch_size: int) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices((inputs, labels)).batch(batch_size)


def self_influence(calculator, data: tf.data.Dataset) -> np.ndarray:
    return np.concatenate([values.numpy() for _, values in calculator.compute_influence_values(data)])


def run_exact(settings, model, inputs, labels) -> np.ndarray:
    hessian_data = dataset(*workloads.hessian_part(inputs, labels, settings), settings.influence_lib_batch_size)
    # damping=0: Influenciae's pseudo-inverse, which this side-by-side compares against.
    ihvp = ExactIHVP(model, hessian_data, damping=0.0, show_progress=False)
    calculator = FirstOrderInfluenceCalculator(model, hessian_data, ihvp_calculator=ihvp, show_progress=False)
    return self_influence(calculator, dataset(inputs, labels, settings.influence_lib_batch_size))


def run_cg(settings, model, inputs, labels) -> np.ndarray:
    hessian_data = dataset(*workloads.hessian_part(inputs, labels, settings), settings.influence_lib_batch_size)
    ihvp = ConjugateGradientDescentIHVP(
        model, hessian_data, n_opt_iters=settings.cg_max_iterations, damping=0.0, tolerance=settings.cg_tolerance
    )
    calculator = FirstOrderInfluenceCalculator(model, hessian_data, ihvp_calculator=ihvp, show_progress=False)
    return self_influence(calculator, dataset(inputs, labels, settings.cg_influence_lib_rhs_batch_size))


def tracin_calculator(settings, arrays, layers: tuple[int, int | None]):
    """TracIn over one wrapped model per checkpoint, built once (it computes nothing until scoring)."""
    from influence_lib.influence.tracin import TracIn

    start_layer, last_layer = layers
    models = [
        InfluenceModel(
            build_model(settings, workloads.weights_of(arrays, prefix)), start_layer=start_layer, last_layer=last_layer
        )
        for prefix in workloads.checkpoint_prefixes(settings)
    ]
    return TracIn(models, settings.learning_rate, show_progress=False)


def run_arnoldi(settings, model, inputs, labels) -> np.ndarray:
    from influence_lib.influence.arnoldi import ArnoldiInfluenceCalculator

    hessian_data = dataset(*workloads.hessian_part(inputs, labels, settings), settings.influence_lib_batch_size)
    calculator = ArnoldiInfluenceCalculator(
        model,
        hessian_data,
        settings.arnoldi_subspace_dim,
        force_hermitian=True,
        k_largest_eig_vals=settings.arnoldi_k,
        damping=0.0,
        seed=settings.seed,
        show_progress=False,
    )
    return self_influence(calculator, dataset(inputs, labels, settings.influence_lib_batch_size))


def module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def run(settings: workloads.Settings, workdir: Path, names: list[str]) -> Iterator[dict]:
    """Time each workload; yield its JSON summary as soon as it is done."""
    arrays = workloads.load_model_file(workdir)
    inputs, labels = arrays["inputs"], arrays["labels"]
    model = InfluenceModel(build_model(settings, workloads.weights_of(arrays)), start_layer=-1)
    tracin = {
        name: tracin_calculator(settings, arrays, workloads.TRACIN_LAYERS[name])
        for name in workloads.TRACIN_LAYERS
        if name in names and module_available(OPTIONAL_MODULES[name])
    }
    runners = {
        "exact": lambda: run_exact(settings, model, inputs, labels),
        "cg": lambda: run_cg(settings, model, inputs, labels),
        **{
            name: lambda calculator=calculator: self_influence(
                calculator, dataset(inputs, labels, settings.influence_lib_batch_size)
            )
            for name, calculator in tracin.items()
        },
        "arnoldi": lambda: run_arnoldi(settings, model, inputs, labels),
    }
    skipped = {
        name: f"{module} not found" for name, module in OPTIONAL_MODULES.items() if not module_available(module)
    }
    yield from workloads.run_all(SIDE, runners, names, settings, workdir, skipped)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=["prepare", "run"])
    parser.add_argument("--workdir", type=Path, required=True, help="Holds settings.json and model.npz.")
    parser.add_argument("--workloads", default=",".join(workloads.WORKLOADS))
    args = parser.parse_args(argv)
    settings = workloads.Settings.load(args.workdir / "settings.json")
    if args.step == "prepare":
        print(json.dumps(prepare(settings, args.workdir)), flush=True)
        return
    for result in run(settings, args.workdir, workloads.parse_workloads(args.workloads)):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
