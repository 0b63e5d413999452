"""Mislabel-detection benchmark: flip a known fraction of the training labels, train, and measure
how well each method's scores find the flipped samples (exact ROC-AUC, detection curve, time).

Command line: ``python -m influence_lib.benchmark --dataset digits --noise 0.1 --methods all --seeds 3 --out DIR``.
"""
from .datasets import ClassificationData, load_cifar10, load_dataset, load_digits, load_fashion_mnist
from .evaluator import MethodResult, MislabelingDetectorEvaluator, RunResult
from .factories import (
    METHODS,
    ArnoldiFactory,
    CalculatorFactory,
    FirstOrderFactory,
    GradientNormFactory,
    LossFactory,
    MethodFactory,
    RandomFactory,
    RepresenterL2Factory,
    RepresenterLJEFactory,
    SampleBoundaryFactory,
    TracInFactory,
    WeightsBoundaryFactory,
    resolve_methods,
)
from .label_noise import flip_labels
from .metrics import average_ranks, detection_curve, detection_curve_area, roc_auc
from .report import results_table, results_to_dict, save_json
from .training import MLPTrainingProcedure, TrainedModel, TrainingProcedure

__all__ = [
    "METHODS",
    "ArnoldiFactory",
    "CalculatorFactory",
    "ClassificationData",
    "FirstOrderFactory",
    "GradientNormFactory",
    "LossFactory",
    "MLPTrainingProcedure",
    "MethodFactory",
    "MethodResult",
    "MislabelingDetectorEvaluator",
    "RandomFactory",
    "RepresenterL2Factory",
    "RepresenterLJEFactory",
    "RunResult",
    "SampleBoundaryFactory",
    "TracInFactory",
    "TrainedModel",
    "TrainingProcedure",
    "WeightsBoundaryFactory",
    "average_ranks",
    "detection_curve",
    "detection_curve_area",
    "flip_labels",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "resolve_methods",
    "results_table",
    "results_to_dict",
    "roc_auc",
    "save_json",
]
