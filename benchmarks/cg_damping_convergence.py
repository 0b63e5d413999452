"""Conjugate gradient through every layer at the library's settings: default damping vs ``early_stopping_damping``.

Takes the arguments of ``influence-benchmark lds`` (dataset, sizes, model, training flags), trains
the model to explain exactly as that command does, watches every layer (Gauss-Newton curvature on
``--hessian-samples`` training samples) and solves for the per-sample gradients of ``--rhs`` test
samples with :class:`~influence_lib.ConjugateGradientDescentIHVP` at its defaults (100 iterations,
tolerance 1e-5) for ``damping='auto'`` (``0.1 · tr(H)/P``) and for
``early_stopping_damping(η, T, β)`` of the training run. Reports the damping, the iterations used
(curvature passes), whether every right-hand side reached the tolerance, and the relative residual
``‖(H + λI)x − v‖ / ‖v‖`` (median / largest).

Example::

    python benchmarks/cg_damping_convergence.py --dataset digits --model mlp --train-size 1000 --test-size 300
"""
import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import tensorflow as tf

import influence_lib as il
from influence_lib.benchmark.lds_cli import build_lds_parser, procedure_from, retraining_data
from influence_lib.influence.first_order import hessian_subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lds_auto_damping import training_damping  # noqa: E402


def main(argv: list[str]) -> None:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--hessian-samples", type=int, default=512)
    extra.add_argument("--rhs", type=int, default=32)
    settings, rest = extra.parse_known_args(argv)
    arguments = build_lds_parser().parse_args(rest)
    procedure = procedure_from(arguments)
    data, _ = retraining_data(arguments)
    trained = procedure.train(data.x_train, data.y_train, data.x_test, data.y_test, arguments.seed)
    model = il.InfluenceModel(trained.model, start_layer=0, last_layer=-1, loss_function=trained.loss_function)
    train_set = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).batch(arguments.influence_batch_size)
    hessian_set = hessian_subset(train_set, settings.hessian_samples, 10000, trained.seed)
    vectors = model.batch_jacobian_tensor((data.x_test[: settings.rhs], data.y_test[: settings.rhs]))
    stopping = training_damping(procedure, len(data.x_train))
    print(f"P = {model.nb_params}, {settings.hessian_samples} Hessian samples, {settings.rhs} right-hand sides")
    for name, damping in (("auto (0.1 tr/P)", "auto"), ("early_stopping_damping", stopping)):
        cg = il.ConjugateGradientDescentIHVP(model, hessian_set, damping=damping)
        calls = []
        damped = cg.hvp
        cg.hvp = lambda v, damped=damped: calls.append(1) or damped(v)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            solution = cg.ihvp(vectors)
        residuals = (tf.norm(damped(solution) - vectors, axis=1) / tf.norm(vectors, axis=1)).numpy()
        print(f"{name:24s} λ = {cg.damping:.3g}: {len(calls)} iterations, converged {not caught}, residual median "
              f"{np.median(residuals):.1e} / max {residuals.max():.1e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
