"""Faithfulness (LDS) of TRAK-1 / TRAK over checkpoints / TRAK over independently trained models,
next to influence functions and the gradient-similarity baselines, on the offline digits MLP.

Usage (from the repository root; a bounded run, a few minutes on 2 CPU cores)::

    .venv/bin/python benchmarks/trak_lds.py [--train-size 1000] [--test-size 100] [--subsets 30]
        [--hidden 32] [--epochs 30] [--ensemble 10] [--proj-dim 1024] [--out trak_lds/]

Uses the faithfulness harness of :mod:`influence_lib.benchmark` (ground truth: ``--subsets`` models
retrained on random halves of the training set, resumable under ``OUT/ground_truth``; no noise
ceiling). TRAK over ``--ensemble`` independently trained models needs the training procedure, so it
is defined here (it trains ``ensemble − 1`` more models with other seeds, on the whole training
set, and adds them to the model being explained); the other methods come from the registry and
watch the last layer (the registry's default); TRAK is also run on all layers.
"""
import argparse
import dataclasses
import os

import keras

from influence_lib.benchmark.factories import METHODS, CalculatorFactory, TRAKFactory
from influence_lib.benchmark.faithfulness_evaluator import FaithfulnessEvaluator
from influence_lib.benchmark.faithfulness_report import faithfulness_table
from influence_lib.benchmark.retraining import SubsetRetraining
from influence_lib.benchmark.lds_cli import build_lds_parser, retraining_data
from influence_lib.benchmark.training import SGDTrainingProcedure
from influence_lib.influence.trak import TRAK
from influence_lib.model.influence_model import InfluenceModel
from influence_lib.model.projection import Projection


@dataclasses.dataclass(frozen=True)
class IndependentTRAKFactory(CalculatorFactory):
    """TRAK over the explained model and ``nb_models − 1`` more trained from other seeds (all layers
    watched, or the last one)."""

    effect_sign = 1.0
    procedure: SGDTrainingProcedure | None = None
    data: object = None
    nb_models: int = 10
    dimension: int | None = 256
    all_layers: bool = True
    damping: float = 0.0

    def build(self, trained, train_set, measurement=None) -> TRAK:
        data = self.data
        models = [trained.model]
        for index in range(1, self.nb_models):
            models.append(self.procedure.train(data.x_train, data.y_train, data.x_test, data.y_test,
                                               trained.seed + 7919 * index).model)
        layers = dict(start_layer=0, last_layer=len(trained.model.layers) - 1) if self.all_layers else {}
        wrapped = [InfluenceModel(m, loss_function=trained.loss_function, **layers) for m in models]
        projection = None if self.dimension is None else Projection(self.dimension, seed=trained.seed)
        return TRAK(wrapped, train_set, projection, self.damping,
                    measurement=measurement or "margin", show_progress=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=1000)
    parser.add_argument("--test-size", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--ensemble", type=int, default=10)
    parser.add_argument("--proj-dim", type=int, default=256)
    parser.add_argument("--damping", type=float, default=0.0, help="λ of every TRAK (default 0: pseudo-inverse)")
    parser.add_argument("--out", default="trak_lds")
    args = parser.parse_args()
    cli = build_lds_parser().parse_args(["--dataset", "digits", "--train-size", str(args.train_size),
                                         "--test-size", str(args.test_size)])
    data, _ = retraining_data(cli)
    procedure = SGDTrainingProcedure(hidden_units=(args.hidden,), epochs=args.epochs, learning_rate=0.01,
                                     momentum=0.9, checkpoint_every_n_epochs=max(1, args.epochs // 5))
    evaluator = FaithfulnessEvaluator(data, procedure, SubsetRetraining(nb_subsets=args.subsets), noise_ceiling=False,
                                      store_path=os.path.join(args.out, "ground_truth"))
    k, m, damping = args.proj_dim, args.ensemble, args.damping
    methods = {
        "first_order_exact (λ=1e-3)": dataclasses.replace(METHODS["first_order_exact"], damping=1e-3),
        "tracin": METHODS["tracin"],
        "grad_dot": METHODS["grad_dot"],
        "grad_cos": METHODS["grad_cos"],
        "trak (1 model)": TRAKFactory(dimension=k, damping=damping),
        "trak (5 checkpoints)": TRAKFactory(dimension=k, damping=damping, checkpoints=True),
        f"trak ({m} models)": IndependentTRAKFactory(procedure, data, m, k, all_layers=False, damping=damping),
        "trak (1 model, all layers)": IndependentTRAKFactory(procedure, data, 1, k, damping=damping),
        f"trak ({m} models, all layers)": IndependentTRAKFactory(procedure, data, m, k, damping=damping),
        "trak (1 model, no projection)": TRAKFactory(dimension=None, damping=damping),
        f"trak ({m} models, no projection)": IndependentTRAKFactory(
            procedure, data, m, None, all_layers=False, damping=damping
        ),
        f"trak ({3 * m} models, all layers)": IndependentTRAKFactory(procedure, data, 3 * m, k, damping=damping),
    }
    results = evaluator.evaluate(methods)
    keras.backend.clear_session()
    print(f"digits MLP 64-{args.hidden}-10, {args.train_size} train / {args.test_size} test, LDS over "
          f"{args.subsets} half-subset models (margin); TRAK k = {k}, λ = {damping}")
    print(faithfulness_table(results, None, markdown=True))


if __name__ == "__main__":
    main()
