"""TRAK side by side with the reference ``traker`` 0.3.2 (PyTorch, CPU) on an MLP.

Usage (from the repository root)::

    .venv/bin/python benchmarks/trak_vs_traker.py [--proj-dims 512,1024] [--n-train 1200] [--n-test 100]
        [--hidden 16] [--peer-python /work/torchpeers/bin/python] [--repeats 2] [--json FILE]

Trains an MLP 64-h-10 (ReLU, logits) on scikit-learn digits, copies its weights into a torch MLP,
and scores TRAK (one model, margin measurement, λ = 0) on both sides with the same projected
dimension ``k``: influence_lib with its dense projection and with its structured one, traker with
``BasicProjector`` (Rademacher, generated once). The two libraries draw different random
matrices, so each is compared with the *exact* TRAK (influence_lib with ``projection=None``,
``k = P``): the mean over test samples of the Spearman rank correlation of the scores over the
training set. Times: featurization + kernel + scoring of every test sample against every
training sample, in one process each, tracing included, best of ``--repeats`` (after one untimed
warm-up run of influence_lib). Also reported: the rank of the training feature matrix ``Φ`` — when
it is below ``k``, ``ΦᵀΦ`` is singular: influence_lib (λ = 0) takes its pseudo-inverse, and then
the projected TRAK equals the exact one, while traker inverts it as is.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import keras
import numpy as np
import tensorflow as tf
from scipy.stats import spearmanr
from sklearn.datasets import load_digits

import influence_lib as il
from influence_lib.common.enums import CACHE

TRAKER_SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "traker_side.py")


def train_mlp(hidden: int, n_train: int, n_test: int, seed: int = 0):
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = (x[order] / 16.0).astype(np.float32), y[order].astype(np.int64)
    test = slice(n_train, n_train + n_test)
    x_train, y_train, x_test, y_test = x[:n_train], y[:n_train], x[test], y[test]
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((64,)), keras.layers.Dense(hidden, activation="relu"), keras.layers.Dense(10),
    ])
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=40, batch_size=64, verbose=0)
    return model, x_train, y_train, x_test, y_test


def ours(model, x_train, y_train, x_test, y_test, projection, batch_size):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    wrapped = il.InfluenceModel(model, start_layer=0, last_layer=1, loss_function=loss)
    train_set = tf.data.Dataset.from_tensor_slices((x_train, y_train)).batch(batch_size)
    test_set = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(batch_size)
    start = time.perf_counter()
    trak = il.TRAK(wrapped, train_set, projection=projection, show_progress=False)
    rows = [
        np.concatenate([values.numpy() for _, values in scores], axis=1)
        for _, scores in trak.estimate_influence_values_in_batches(test_set, train_set, CACHE.MEMORY)
    ]
    seconds = time.perf_counter() - start
    features, _ = trak.features_tensor((x_train, y_train))
    return np.concatenate(rows), seconds, float32_rank(features.numpy()[:, 0])


def float32_rank(matrix: np.ndarray) -> int:
    """Numerical rank of a float32 matrix (singular values above ``σ_max · max(shape) · eps_float32``)."""
    singular_values = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
    return int((singular_values > singular_values[0] * max(matrix.shape) * np.finfo(np.float32).eps).sum())


def theirs(peer_python, model, x_train, y_train, x_test, y_test, proj_dim, batch_size):
    with tempfile.TemporaryDirectory() as directory:
        source, target = os.path.join(directory, "in.npz"), os.path.join(directory, "out.npz")
        weights = {}
        for index, layer in enumerate(model.layers):
            weights[f"kernel_{index}"], weights[f"bias_{index}"] = (w.numpy() for w in layer.weights)
        np.savez(source, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **weights)
        subprocess.run([peer_python, TRAKER_SIDE, source, target, str(proj_dim), str(batch_size)], check=True,
                       stdout=subprocess.DEVNULL)
        result = np.load(target)
        return result["scores"], float(result["seconds"]), None


def rank_agreement(scores, reference) -> float:
    """Mean over test samples of the Spearman correlation of two score rows."""
    return float(np.mean([spearmanr(a, b).statistic for a, b in zip(scores, reference)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proj-dims", default="512,1024")
    parser.add_argument("--n-train", type=int, default=1200)
    parser.add_argument("--n-test", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--peer-python", default=os.environ.get("TRAKER_PYTHON", "/work/torchpeers/bin/python"))
    parser.add_argument("--json")
    args = parser.parse_args()
    model, x_train, y_train, x_test, y_test = train_mlp(args.hidden, args.n_train, args.n_test)
    nb_params = sum(int(np.prod(w.shape)) for w in model.weights)
    ours(model, x_train, y_train, x_test, y_test, il.Projection(64), args.batch_size)  # warm-up, not timed
    exact, exact_seconds, exact_rank = ours(model, x_train, y_train, x_test, y_test, None, args.batch_size)
    print(f"MLP 64-{args.hidden}-10, P = {nb_params}, n_train = {args.n_train}, n_test = {args.n_test}; "
          f"exact TRAK (k = P): {exact_seconds:.2f} s, rank of the gradient matrix {exact_rank}")
    results = []
    for proj_dim in [int(k) for k in args.proj_dims.split(",")]:
        row = {"k": proj_dim, "P": nb_params}
        runs = {
            "influence_lib dense": lambda: ours(model, x_train, y_train, x_test, y_test,
                                                il.Projection(proj_dim, structured=False), args.batch_size),
            "influence_lib structured": lambda: ours(model, x_train, y_train, x_test, y_test,
                                                     il.Projection(proj_dim), args.batch_size),
            "traker": lambda: theirs(args.peer_python, model, x_train, y_train, x_test, y_test, proj_dim,
                                     args.batch_size),
        }
        scores = {}
        for name, run in runs.items():
            outcomes = [run() for _ in range(args.repeats)]
            scores[name] = outcomes[0][0]
            row[f"{name} seconds"] = min(outcome[1] for outcome in outcomes)
            row[f"{name} vs exact"] = rank_agreement(outcomes[0][0], exact)
            if outcomes[0][2] is not None:
                row[f"{name} rank of features"] = outcomes[0][2]
        row["dense vs traker"] = rank_agreement(scores["influence_lib dense"], scores["traker"])
        row["traker / dense time"] = row["traker seconds"] / row["influence_lib dense seconds"]
        row["traker / structured time"] = row["traker seconds"] / row["influence_lib structured seconds"]
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
