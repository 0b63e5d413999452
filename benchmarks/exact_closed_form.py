"""All-weight ExactIHVP on a 784→10 logistic regression (P = 7,850) against NumPy's closed form.

Both sides start from the same trained Keras model and the same Fashion-MNIST samples and compute

    H = (1/n) Σ_i (ã_i ã_iᵀ) ⊗ (diag p_i − p_i p_iᵀ),   ã = [x; 1],   then (H + δI)⁻¹ by eigh,

in float64, with the default damping δ = 0.1 · tr(H) / P. influence_lib's side is
``ExactIHVP(model, dataset)`` (which recognises the case and uses its closed form); NumPy's side is
the textbook formula: one weighted Gram matrix per class on the diagonal blocks plus one
``BᵀB`` with ``B = [ã_i ⊗ p_i]``. Reported: seconds of each phase, the ratio, and the largest
differences of H and of the inverse. The Hessian phase is timed alone by default; ``--inverse``
also times the whole ``ExactIHVP`` (Hessian + float64 eigendecomposition of the 7,850 × 7,850
matrix, minutes on a small CPU) against NumPy's Hessian + ``eigh``. ``--hvp-samples`` also times
the generic path (blocks of 512 Hessian-vector products per batch) on a few samples, which is what
ExactIHVP did before.

    .venv/bin/python benchmarks/exact_closed_form.py --n-train 5000 --repeats 3
"""
import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
import tensorflow as tf

import influence_lib as il
from influence_lib.benchmark.datasets import load_dataset
from influence_lib.curvature.hessian import HessianOperator, gauss_newton_hessian


def trained_logistic_regression(x: np.ndarray, y: np.ndarray, epochs: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((x.shape[1],)), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    model.fit(x, y, batch_size=256, epochs=epochs, verbose=0)
    return model


def numpy_hessian(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The closed form in float64 NumPy: diagonal blocks Ãᵀ diag(p_c) Ã, minus BᵀB with B = [ã ⊗ p]."""
    features = np.concatenate([x.astype(np.float64), np.ones((len(x), 1))], axis=1)
    logits = features[:, :-1] @ kernel.astype(np.float64) + bias.astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    n, size = features.shape
    classes = p.shape[1]
    outer = (features[:, :, None] * p[:, None, :]).reshape(n, size * classes)
    hessian = -(outer.T @ outer)
    blocks = hessian.reshape(size, classes, size, classes)
    for c in range(classes):
        blocks[:, c, :, c] += (features * p[:, c : c + 1]).T @ features
    return hessian / n


def numpy_damped_inverse(hessian: np.ndarray) -> tuple[np.ndarray, float]:
    damping = 0.1 * np.trace(hessian) / len(hessian)
    eigenvalues, eigenvectors = np.linalg.eigh(hessian)
    return (eigenvectors / (eigenvalues + damping)) @ eigenvectors.T, damping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each Hessian build (median reported)")
    parser.add_argument("--inverse", action="store_true", help="also time ExactIHVP and NumPy's Hessian + eigh")
    parser.add_argument("--hvp-samples", type=int, default=0, help="also time the HVP-block path on this many samples")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    data = load_dataset("fashion_mnist").subset(n_train=args.n_train, n_test=10)
    x = data.x_train.reshape(len(data.x_train), -1).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[data.y_train]
    model = trained_logistic_regression(x, y, args.epochs)
    influence_model = il.InfluenceModel(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(args.batch_size)
    kernel, bias = [w.numpy() for w in influence_model.weights]
    result = {"n_train": len(x), "nb_params": influence_model.nb_params}

    gauss_newton_hessian(influence_model, dataset.take(1))  # trace once, outside the timing
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved, so that a slow spell of a shared machine hits both
        start = time.perf_counter()
        ours_hessian = gauss_newton_hessian(influence_model, dataset).numpy()
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs_hessian = numpy_hessian(x, kernel, bias)
        theirs.append(time.perf_counter() - start)
    result["influence_lib_hessian_s"] = float(np.median(ours))
    result["numpy_hessian_s"] = float(np.median(theirs))
    result["ratio_hessian"] = result["influence_lib_hessian_s"] / result["numpy_hessian_s"]
    result["hessian_max_abs_diff"] = float(np.abs(ours_hessian - theirs_hessian).max())
    result["hessian_max_abs"] = float(np.abs(theirs_hessian).max())
    result["damping"] = float(0.1 * np.trace(theirs_hessian) / len(theirs_hessian))

    if args.inverse:
        start = time.perf_counter()
        exact = il.ExactIHVP(influence_model, dataset, show_progress=False)
        result["influence_lib_exact_ihvp_s"] = time.perf_counter() - start
        start = time.perf_counter()
        theirs_inverse, damping = numpy_damped_inverse(numpy_hessian(x, kernel, bias))
        result["numpy_hessian_and_inverse_s"] = time.perf_counter() - start
        result["damping"] = {"influence_lib": exact.damping, "numpy": damping}
        result["inverse_max_rel_diff"] = float(
            np.abs(exact.inv_hessian.numpy() - theirs_inverse).max() / np.abs(theirs_inverse).max()
        )
        result["ratio_exact_ihvp"] = result["influence_lib_exact_ihvp_s"] / result["numpy_hessian_and_inverse_s"]

    if args.hvp_samples:
        few = tf.data.Dataset.from_tensor_slices((x[: args.hvp_samples], y[: args.hvp_samples])).batch(args.batch_size)
        start = time.perf_counter()
        HessianOperator(influence_model, few, curvature="hessian").dense()
        result["hvp_blocks_s"] = time.perf_counter() - start
        result["hvp_blocks_samples"] = args.hvp_samples

    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
