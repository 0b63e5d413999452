"""LDS of damping rules with the exact damped Gauss-Newton solve, through any watched layers.

For the model ``influence-benchmark lds`` explains (same arguments, same data, seed and training)
this script builds the Gauss-Newton matrix of the watched weights as a low-rank factor

.. math::  G = \\frac{1}{n} A^\\top A, \\qquad A_i = L_i^\\top J_i, \\quad
           L_i L_i^\\top = \\operatorname{diag}(p_i) - p_i p_i^\\top

(``J_i`` the Jacobian of the logits, ``p_i`` the softmax; ``A`` has ``n·C`` rows), and solves
``(G + D) x = g`` exactly in float64 for every training gradient with the Woodbury identity
``(G + D)⁻¹ = D⁻¹ − D⁻¹Aᵀ(nI + A D⁻¹ Aᵀ)⁻¹ A D⁻¹`` — one ``nC × nC`` Cholesky per damping
``D``. Each damping rule is scored by the LDS against the stored retraining ground truth, so the
rules are compared without the truncation error of an iterative solver:

* ``global δ``: ``D = δI`` for each δ of ``--grid`` (the sweep);
* ``mean``: ``D = f · tr(G)/P · I`` (``damping='auto'``: ``f = 0.1``) for each ``f`` of ``--fractions``;
* ``weighted``: ``D = f · tr(G²)/tr(G) · I``, the eigenvalue-weighted mean eigenvalue (the mean
  curvature along vectors distributed like ``G``, such as the training gradients);
* ``per-layer`` (``--per-layer``): ``D = diag(f · tr(G_ll)/P_l · I_l)``, the mean eigenvalue of each
  layer's diagonal block (as EK-FAC's per-layer damping), and the same per weight tensor;
* ``early stopping``: ``D = (1 − β)/(η T) · I`` from the training run
  (:func:`~influence_lib.curvature.spectrum.early_stopping_damping`).

It also prints the spectrum's λ_max, rank, ``tr/P``, ``tr/rank``, ``tr(G²)/tr(G)`` and the mean
Rayleigh quotient of the training gradients. Cost: ``P × P`` (or ``nC × nC``) float64 matrices and
one solve with all training gradients per rule.

Example (the ground-truth store of ``influence-benchmark lds`` with the same arguments)::

    python benchmarks/lds_damping_rules.py --dataset digits --model mlp --train-size 1000 --test-size 300 \\
        --subsets 100 --store STORE --start-layer 0 --last-layer -1 --hessian-samples 512 --per-layer
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from influence_lib.benchmark.faithfulness import linear_datamodeling_score
from influence_lib.benchmark.faithfulness_evaluator import FaithfulnessEvaluator
from influence_lib.benchmark.lds_cli import build_lds_parser, procedure_from, retraining_data
from influence_lib.benchmark.retraining import SubsetRetraining
from influence_lib.curvature.hessian import HessianOperator
from influence_lib.influence.first_order import hessian_subset
from influence_lib.model.influence_model import InfluenceModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_auto_damping import training_damping  # noqa: E402


def _layer_or_none(text: str):
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        return text


def extra_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--start-layer", type=_layer_or_none, default=None)
    parser.add_argument("--last-layer", type=_layer_or_none, default=None)
    parser.add_argument("--hessian-samples", type=int, default=None, help="samples of G (default: all)")
    parser.add_argument("--grid", default="1e-6,1e-5,1e-4,1e-3,1e-2,1e-1,1")
    parser.add_argument("--fractions", default="0.01,0.1,1")
    parser.add_argument("--per-layer", action="store_true", help="also the per-layer and per-variable rules")
    return parser


def _flat_rows(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float64).reshape(values.shape[0], -1)


def gauss_newton_rows(model: InfluenceModel, dataset: tf.data.Dataset):
    """Per batch, the rows ``A_i = L_iᵀ J_i`` of the samples, shape ``(b·C, P)``, with ``G = AᵀA / n``
    for softmax cross-entropy on logits."""
    for inputs, _ in dataset:
        with tf.GradientTape() as tape:
            logits = tf.cast(model.model(inputs, training=False), tf.float64)
        jacobians = tape.jacobian(logits, model.tf_variables)
        jacobian = np.concatenate(
            [np.asarray(j, np.float64).reshape(j.shape[0], j.shape[1], -1) for j in jacobians], axis=2
        )
        probabilities = tf.nn.softmax(logits).numpy()
        centred = jacobian - np.einsum("bc,bcp->bp", probabilities, jacobian)[:, None, :]
        yield (np.sqrt(probabilities)[:, :, None] * centred).reshape(-1, jacobian.shape[2])


class GaussNewton:
    """``G = AᵀA / n`` kept as the factor ``A`` (when it has fewer rows than columns) or as the matrix."""

    def __init__(self, model: InfluenceModel, dataset: tf.data.Dataset, nb_rows: int):
        self.low_rank = nb_rows < model.nb_params
        parts, gram, count = [], np.zeros((0, 0)), 0
        for rows in gauss_newton_rows(model, dataset):
            count += rows.shape[0]
            if self.low_rank:
                parts.append(rows)
            else:
                gram = rows.T @ rows if not gram.size else gram + rows.T @ rows
        self.count = count
        self.factor = np.concatenate(parts) if self.low_rank else None
        self.gram = None if self.low_rank else gram

    def normalize(self, nb_samples: int) -> None:
        if self.low_rank:
            self.factor = self.factor / np.sqrt(nb_samples)
        else:
            self.gram = self.gram / nb_samples

    def matmat(self, vectors: np.ndarray) -> np.ndarray:
        return (vectors @ self.factor.T) @ self.factor if self.low_rank else vectors @ self.gram

    def diagonal(self) -> np.ndarray:
        return np.sum(self.factor**2, axis=0) if self.low_rank else np.diag(self.gram).copy()

    def eigenvalues(self) -> np.ndarray:
        small = self.factor @ self.factor.T if self.low_rank else self.gram
        return np.clip(np.linalg.eigvalsh(small), 0.0, None)

    def solve(self, diagonal: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """``(G + diag(d))⁻¹ R`` for the columns of ``R`` (float64; Woodbury for the factor)."""
        if not self.low_rank:
            return np.linalg.solve(self.gram + np.diag(diagonal), rhs)
        inverse_d = 1.0 / diagonal
        weighted = self.factor * inverse_d[None, :]
        inner = np.eye(self.factor.shape[0]) + weighted @ self.factor.T
        return inverse_d[:, None] * rhs - weighted.T @ np.linalg.solve(inner, weighted @ rhs)


def main(argv: list[str]) -> None:
    extra, rest = extra_parser().parse_known_args(argv)
    arguments = build_lds_parser().parse_args(rest)
    procedure = procedure_from(arguments)
    data, _ = retraining_data(arguments)
    setup = SubsetRetraining(arguments.alpha, arguments.subsets, arguments.seed, arguments.seed, arguments.measurement)
    evaluator = FaithfulnessEvaluator(
        data, procedure, setup, noise_ceiling=False, store_path=arguments.store,
        influence_batch_size=arguments.influence_batch_size, show_progress=False,
    )
    ground_truth = evaluator.ground_truth()
    trained = evaluator.train_model()
    model = InfluenceModel(trained.model, extra.start_layer, extra.last_layer, loss_function=trained.loss_function)
    batch = arguments.influence_batch_size
    train_set = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).batch(batch)
    test_set = tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test)).batch(batch)
    hessian_set = hessian_subset(train_set, extra.hessian_samples, 10000, trained.seed)

    start = time.perf_counter()
    classes = data.y_train.shape[1]
    nb_hessian = extra.hessian_samples or len(data.x_train)
    curvature = GaussNewton(model, hessian_set, nb_hessian * classes)
    count = curvature.count // classes
    curvature.normalize(count)
    probe = np.random.default_rng(0).standard_normal((2, model.nb_params))
    library = HessianOperator(model, hessian_set, curvature="ggn").matmat(tf.constant(probe, model.dtype)).numpy()
    mine = curvature.matmat(probe)
    difference = np.abs(library - mine).max() / np.abs(mine).max()
    print(f"P = {model.nb_params}, n = {count}, low rank {curvature.low_rank}; GGN check: relative difference to "
          f"the library's products {difference:.1e} ({time.perf_counter() - start:.0f} s)")
    train_gradients = np.concatenate([model.batch_jacobian_tensor(b).numpy() for b in train_set]).astype(np.float64)
    query = model.with_measurement(arguments.measurement)
    test_gradients = np.concatenate([query.batch_jacobian_tensor(b).numpy() for b in test_set]).astype(np.float64)

    sizes = [int(np.prod(w.shape)) for w in model.weights]
    watched = {id(weight) for weight in model.weights}
    layer_of = [id(layer) for layer in model.watched_layers for w in layer.trainable_weights if id(w) in watched]
    diagonal = curvature.diagonal()
    layer_ids = np.repeat(np.arange(len(sizes)), sizes)
    layer_index = {key: index for index, key in enumerate(dict.fromkeys(layer_of))}
    block_of = np.repeat([layer_index[key] for key in layer_of], sizes)
    mean_eigenvalue = diagonal.mean()
    block_means = {
        "layer": np.array([diagonal[block_of == b].mean() for b in range(block_of.max() + 1)])[block_of],
        "variable": np.array([diagonal[layer_ids == v].mean() for v in range(len(sizes))])[layer_ids],
    }
    print(f"tr(G)/P = {mean_eigenvalue:.3e}; per layer: "
          + ", ".join(f"{diagonal[block_of == b].mean():.3e} (P={int((block_of == b).sum())})"
                      for b in range(block_of.max() + 1)))

    spectrum = curvature.eigenvalues()
    rank = int((spectrum > 1e-6 * spectrum.max()).sum())
    weighted_mean = float((spectrum**2).sum() / spectrum.sum())
    rayleigh = np.mean(np.sum(curvature.matmat(train_gradients) * train_gradients, axis=1)
                       / np.sum(train_gradients**2, axis=1))
    print(f"spectrum: λ_max {spectrum.max():.3e}, rank {rank}, tr/P {mean_eigenvalue:.3e}, tr/rank "
          f"{spectrum.sum() / rank:.3e}, tr(G²)/tr(G) {weighted_mean:.3e}, mean Rayleigh quotient of the training "
          f"gradients {rayleigh:.3e}", flush=True)

    def lds_of(name: str, damping_diagonal: np.ndarray) -> None:
        tick = time.perf_counter()
        solved = curvature.solve(damping_diagonal, train_gradients.T)
        scores = -(test_gradients @ solved)
        summary = linear_datamodeling_score(scores, ground_truth)
        print(f"{name:40s} LDS {summary.mean:.3f} ± {summary.standard_error:.3f} ({time.perf_counter() - tick:.0f} s)",
              flush=True)

    ones = np.ones(model.nb_params)
    stopping = training_damping(procedure, len(data.x_train))
    lds_of(f"early stopping: (1-β)/(ηT) = {stopping:.2e}", stopping * ones)
    for value in [float(v) for v in extra.grid.split(",") if v]:
        lds_of(f"global δ = {value:g}", value * ones)
    for fraction in [float(v) for v in extra.fractions.split(",") if v]:
        lds_of(f"mean: {fraction:g}·tr/P = {fraction * mean_eigenvalue:.2e}", fraction * mean_eigenvalue * ones)
        lds_of(f"weighted: {fraction:g}·tr(G²)/tr(G) = {fraction * weighted_mean:.2e}", fraction * weighted_mean * ones)
        for kind, means in block_means.items() if extra.per_layer else ():
            lds_of(f"per-{kind}: {fraction:g}·tr_l/P_l", fraction * means)


if __name__ == "__main__":
    main(sys.argv[1:])
