"""Conjugate gradient through ALL layers of an MLP: curvature, damping and preconditioner compared.

A 784-128-64-10 MLP (the issue's Fashion-MNIST MLP, P = 109,386) is trained briefly; the Hessian
dataset is ``--n-hessian`` training samples and the right-hand sides are the per-sample gradients
of ``--n-rhs`` test samples, solved together. For each configuration it reports whether CG
converged, its iterations (curvature-vector passes over the Hessian set), seconds, seconds per
iteration and right-hand side, and the relative residual ``‖(H + λI)x − v‖ / ‖v‖`` reached
(median and largest over the right-hand sides).

    .venv/bin/python benchmarks/cg_preconditioner.py --n-hessian 500 --n-rhs 16 --iterations 300 --tolerance 1e-2
"""
import argparse
import json
import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import influence_lib as il
from influence_lib.benchmark.datasets import load_dataset


def trained_mlp(x: np.ndarray, y: np.ndarray, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((x.shape[1],)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=0)
    return model


def solve(influence_model, dataset, vectors, **settings) -> dict:
    """Build CG with ``settings``, solve for ``vectors``; what happened, in numbers."""
    calls = []
    start = time.perf_counter()
    try:
        cg = il.ConjugateGradientDescentIHVP(influence_model, dataset, show_progress=False, **settings)
        original = cg.hvp
        cg.hvp = lambda v: calls.append(1) or original(v)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            solution = cg.ihvp(vectors)
        seconds = time.perf_counter() - start
        residuals = (tf.norm(original(solution) - vectors, axis=1) / tf.norm(vectors, axis=1)).numpy()
        outcome = {
            "converged": not caught,
            "damping": cg.damping,
            "curvature": cg.curvature,
            "median_residual": float(np.median(residuals)),
            "max_residual": float(residuals.max()),
        }
    except il.SingularHessianError as error:
        seconds, outcome = time.perf_counter() - start, {"converged": False, "error": str(error).split(":")[0]}
    outcome.update(
        iterations=len(calls),
        seconds=round(seconds, 2),
        ms_per_iteration_and_rhs=round(1000 * seconds / max(len(calls), 1) / len(vectors), 2),
    )
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-hessian", type=int, default=1000)
    parser.add_argument("--n-rhs", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    data = load_dataset("fashion_mnist").subset(n_train=args.n_train, n_test=args.n_rhs)
    x = data.x_train.reshape(len(data.x_train), -1).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[data.y_train]
    model = trained_mlp(x, y, args.epochs)
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=-1)
    dataset = tf.data.Dataset.from_tensor_slices((x[: args.n_hessian], y[: args.n_hessian])).batch(250)
    x_test = data.x_test.reshape(len(data.x_test), -1).astype(np.float32)
    vectors = influence_model.batch_jacobian_tensor((x_test, np.eye(10, dtype=np.float32)[data.y_test]))

    results = {"nb_params": influence_model.nb_params, "n_hessian": args.n_hessian, "n_rhs": args.n_rhs}
    common = {"n_opt_iters": args.iterations, "tolerance": args.tolerance}
    configurations = {
        "hessian, damping 0 (old default)": {"curvature": "hessian", "damping": 0.0},
        "hessian, damping auto": {"curvature": "hessian"},
        "ggn, damping auto (new default)": {},
        "ggn, damping auto, diagonal preconditioner": {"preconditioner": "diagonal"},
        "ggn, damping 1e-2": {"damping": 1e-2},
        "ggn, damping 1e-2, diagonal preconditioner": {"damping": 1e-2, "preconditioner": "diagonal"},
    }
    for name, settings in configurations.items():
        results[name] = solve(influence_model, dataset, vectors, **common, **settings)
        print(name, results[name], flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
