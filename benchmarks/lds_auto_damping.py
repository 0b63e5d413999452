"""Print the number ``damping='auto'`` resolves to for each method of an ``influence-benchmark lds`` run.

Takes the same arguments as ``influence-benchmark lds`` (dataset, sizes, model, ``--methods``,
``--set``), trains the model to explain exactly as that command does (same data, seed and
procedure) and builds each method's calculator once, so that the damping grid of a ``--sweep`` can
be read against the value the default picks (``0.1 · tr(C) / P``, :mod:`influence_lib.curvature.spectrum`)
and against ``early_stopping_damping`` of the training run (``(1 − β)/(ηT)``, printed last).

Example::

    python benchmarks/lds_auto_damping.py --dataset digits --model mlp --train-size 1000 --test-size 300 \\
        --methods first_order_exact,first_order_cg,first_order_lissa,first_order_arnoldi --set damping=auto
"""
import sys

import tensorflow as tf

from influence_lib.benchmark.lds_cli import build_lds_parser, factories_from, procedure_from, retraining_data
from influence_lib.curvature.spectrum import early_stopping_damping


def training_damping(procedure, nb_samples: int) -> float:
    """``early_stopping_damping`` of an ``SGDTrainingProcedure`` run on ``nb_samples`` samples
    (``ceil(n / batch_size)`` steps per epoch, the last batch partial)."""
    steps = procedure.epochs * -(-nb_samples // procedure.batch_size)
    return early_stopping_damping(procedure.learning_rate, steps, procedure.momentum)


def resolved_dampings(argv: list[str]) -> dict[str, float]:
    """Method name → the damping its calculator uses on the model ``influence-benchmark lds`` would explain,
    and ``'early_stopping_damping'`` → the ridge of that model's training run."""
    arguments = build_lds_parser().parse_args(argv)
    procedure = procedure_from(arguments)
    data, _ = retraining_data(arguments)
    trained = procedure.train(data.x_train, data.y_train, data.x_test, data.y_test, arguments.seed)
    train_set = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).batch(arguments.influence_batch_size)
    dampings = {}
    for name, factory in factories_from(arguments).items():
        calculator = factory.build(trained, train_set)
        solver = getattr(calculator, "ihvp_calculator", calculator)
        dampings[name] = float(solver.damping)
    dampings["early_stopping_damping"] = training_damping(procedure, len(data.x_train))
    return dampings


if __name__ == "__main__":
    for method, damping in resolved_dampings(sys.argv[1:]).items():
        print(f"{method}\t{damping:.4g}")
