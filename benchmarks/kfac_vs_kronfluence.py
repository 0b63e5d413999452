"""EK-FAC influence side by side with kronfluence 1.0.1: agreement of pairwise scores and wall time.

Usage (from the repository root, with the project's interpreter)::

    .venv/bin/python benchmarks/kfac_vs_kronfluence.py [--workloads mlp,cnn] [--train 10000] [--queries 500]
        [--damping heuristic|FLOAT] [--query-rank R] [--peer-python /work/torchpeers/bin/python] [--workdir DIR]

For each workload the script trains a small Keras network briefly (not timed), stores data and
weights in ``WORKDIR/WORKLOAD.npz``, runs ``kronfluence_side.py`` in the kronfluence interpreter
(same weights, same data, same damping, empirical Fisher, EK-FAC through every layer), then
runs influence_lib in this process: :class:`~influence_lib.EKFACIHVP` (factors saved to disk, as
kronfluence does) and :class:`~influence_lib.KroneckerInfluenceCalculator` for the pairwise
scores of every query against every training sample. Timed: fitting the factors + the pairwise
scores, including TensorFlow's tracing (cold run). Prints one JSON line per workload with both
times, their ratio, and the Pearson correlation of the two score matrices.

Workloads: ``mlp`` — MLP 64-256-256-10 (ReLU) on a 10-class Gaussian mixture; ``cnn`` —
Conv2D(16, 3×3, same)-ReLU-Conv2D(32, 3×3, stride 2)-ReLU-Flatten-Dense(10) on 16×16×3 images of
10 noisy class templates.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = REPO_ROOT / "benchmark_results" / "kfac_vs_kronfluence"
DEFAULT_PEER = "/work/torchpeers/bin/python"


def make_data(workload: str, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and integer labels of ``count`` samples (float32 inputs, 10 classes)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, count)
    if workload == "mlp":
        centers = np.random.default_rng(0).normal(size=(10, 64))
        return (centers[labels] + 1.5 * rng.normal(size=(count, 64))).astype(np.float32), labels
    templates = np.random.default_rng(0).normal(size=(10, 16, 16, 3))
    return (templates[labels] + 2.0 * rng.normal(size=(count, 16, 16, 3))).astype(np.float32), labels


def make_model(workload: str):
    import keras

    if workload == "mlp":
        return keras.Sequential([
            keras.Input((64,)), keras.layers.Dense(256, activation="relu"), keras.layers.Dense(256, activation="relu"),
            keras.layers.Dense(10),
        ])
    return keras.Sequential([
        keras.Input((16, 16, 3)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dense(10),
    ])


def prepare(workload: str, args, workdir: Path):
    """Train briefly and store data + weights for both sides; return the Keras model and data."""
    import keras

    keras.utils.set_random_seed(0)
    x_train, y_train = make_data(workload, args.train, seed=1)
    x_query, y_query = make_data(workload, args.queries, seed=2)
    model = make_model(workload)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=args.epochs, batch_size=128, verbose=0)
    weights = model.get_weights()
    settings = {"damping": args.damping, "batch_size": args.batch_size, "threads": args.threads, "query_rank": args.query_rank}
    np.savez(
        workdir / f"{workload}.npz", x_train=x_train, y_train=y_train, x_query=x_query, y_query=y_query,
        nb_weights=len(weights), settings=json.dumps(settings), **{f"weight_{i}": w for i, w in enumerate(weights)},
    )
    return model, (x_train, y_train), (x_query, y_query)


def run_influence_lib(model, train, queries, args, workdir: Path) -> tuple[np.ndarray, float, float]:
    """EK-FAC through every layer, pairwise scores; returns (scores, fit seconds, score seconds)."""
    import keras
    import tensorflow as tf

    import influence_lib as il

    one_hot = lambda labels: np.eye(10, dtype=np.float32)[labels]
    train_set = tf.data.Dataset.from_tensor_slices((train[0], one_hot(train[1]))).batch(args.batch_size)
    query_set = tf.data.Dataset.from_tensor_slices((queries[0], one_hot(queries[1]))).batch(len(queries[0]))
    influence_model = il.InfluenceModel(
        model, start_layer=0, last_layer=-1,
        loss_function=keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None),
    )
    damping = args.damping if args.damping == "heuristic" else float(args.damping)
    factors_path = workdir / "influence_lib_factors"
    shutil.rmtree(factors_path, ignore_errors=True)
    start = time.perf_counter()
    ihvp = il.EKFACIHVP(influence_model, train_set, damping=damping, factors_path=str(factors_path), show_progress=False)
    fitted = time.perf_counter()
    calculator = il.KroneckerInfluenceCalculator(
        influence_model, train_set, ihvp, query_rank=args.query_rank, show_progress=False
    )
    batches = calculator.estimate_influence_values_in_batches(query_set, train_set, influence_vector_in_cache=il.CACHE.NO_CACHE)
    scores = np.concatenate([np.concatenate([v.numpy() for _, v in values], axis=1) for _, values in batches])
    scored = time.perf_counter()
    return scores, fitted - start, scored - fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workloads", default="mlp,cnn")
    parser.add_argument("--train", type=int, default=10000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--damping", default="heuristic", help="'heuristic' (0.1 × mean eigenvalue per layer) or a number")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the kronfluence side")
    parser.add_argument("--query-rank", type=int, default=None, help="rank-r query batching on both sides (default exact)")
    parser.add_argument("--peer-python", default=os.environ.get("KRONFLUENCE_PYTHON", DEFAULT_PEER))
    parser.add_argument("--workdir", default=str(DEFAULT_WORKDIR))
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for workload in args.workloads.split(","):
        if workload not in ("mlp", "cnn"):
            raise SystemExit(f"Unknown workload {workload!r}: use mlp and/or cnn.")
        model, train, queries = prepare(workload, args, workdir)
        peer = subprocess.run(
            [args.peer_python, str(Path(__file__).with_name("kronfluence_side.py")), str(workdir), workload],
            capture_output=True, text=True,
        )
        (workdir / f"{workload}.kronfluence.log").write_text(peer.stderr)
        if peer.returncode != 0:
            raise SystemExit(f"kronfluence side failed (see {workdir / f'{workload}.kronfluence.log'}):\n{peer.stderr[-2000:]}")
        theirs = json.loads(peer.stdout.strip().splitlines()[-1])
        their_scores = np.load(workdir / f"{workload}.kronfluence.npy")
        scores, fit_s, score_s = run_influence_lib(model, train, queries, args, workdir)
        np.save(workdir / f"{workload}.influence_lib.npy", scores)
        total, their_total = fit_s + score_s, theirs["fit_s"] + theirs["score_s"]
        result = {
            "workload": workload,
            "params": int(sum(w.size for w in model.get_weights())),
            "train": args.train,
            "queries": args.queries,
            "damping": args.damping,
            "query_rank": args.query_rank,
            "influence_lib_fit_s": round(fit_s, 2),
            "influence_lib_score_s": round(score_s, 2),
            "kronfluence_fit_s": round(theirs["fit_s"], 2),
            "kronfluence_score_s": round(theirs["score_s"], 2),
            "speedup": round(their_total / total, 2),
            "pearson": float(np.corrcoef(scores.reshape(-1), their_scores.reshape(-1))[0, 1]),
            "max_abs_diff_over_max": float(np.abs(scores - their_scores).max() / np.abs(their_scores).max()),
        }
        print(json.dumps(result), flush=True)
        (workdir / f"{workload}.result.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
