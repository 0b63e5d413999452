"""Benchmarks of the attribution methods.

* Mislabel detection: flip a known fraction of the training labels, train, and measure how well
  each method's scores find the flipped samples (exact ROC-AUC, detection curve, time).
  ``influence-benchmark --dataset digits --noise 0.1 --methods all --seeds 3 --out DIR``.
* Faithfulness: how well each method's attributions predict retraining — the linear datamodeling
  score (LDS) over models retrained on random subsets, the leave-one-out correlation, and the
  noise ceiling. ``influence-benchmark lds --dataset fashion-mnist --model logreg --out DIR``.
"""
from .cifar10 import Cifar10MislabelingDetectorEvaluator, Cifar10TrainingProcedure
from .datasets import ClassificationData, load_cifar10, load_dataset, load_digits, load_fashion_mnist, load_mnist
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
    TRAKEnsembleFactory,
    WeightsBoundaryFactory,
    configure,
    method_fields,
    parse_setting,
    resolve_methods,
    sweep_damping,
)
from .faithfulness import (
    CorrelationSummary,
    LeaveOneOutGroundTruth,
    NoiseCeiling,
    SubsetGroundTruth,
    linear_datamodeling_score,
    loo_correlation,
    noise_ceiling,
)
from .faithfulness_evaluator import FaithfulnessEvaluator, FaithfulnessResult
from .faithfulness_report import faithfulness_table, faithfulness_to_dict, plot_faithfulness, save_faithfulness_json
from .influenciae_factories import (
    ArnoldiCalculatorFactory,
    RPSL2Factory,
    RPSLJEFactory,
    SampleBoundaryCalculatorFactory,
    WeightsBoundaryCalculatorFactory,
)
from .label_noise import flip_labels
from .metrics import average_ranks, detection_curve, detection_curve_area, roc_auc
from .report import results_table, results_to_dict, save_json
from .retraining import (
    IndependentModels,
    RetrainingData,
    SubsetRetraining,
    measure,
    retrain_leave_one_out,
    retrain_on_subsets,
    subset_masks,
)
from .training import (
    InfluenciaeTrainingProcedure,
    MLPTrainingProcedure,
    SGDTrainingProcedure,
    TrainedModel,
    TrainingProcedure,
)

__all__ = [
    "METHODS",
    "ArnoldiCalculatorFactory",
    "ArnoldiFactory",
    "CalculatorFactory",
    "ClassificationData",
    "Cifar10MislabelingDetectorEvaluator",
    "Cifar10TrainingProcedure",
    "CorrelationSummary",
    "FaithfulnessEvaluator",
    "FaithfulnessResult",
    "FirstOrderFactory",
    "GradientNormFactory",
    "IndependentModels",
    "InfluenciaeTrainingProcedure",
    "LeaveOneOutGroundTruth",
    "LossFactory",
    "MLPTrainingProcedure",
    "MethodFactory",
    "MethodResult",
    "MislabelingDetectorEvaluator",
    "NoiseCeiling",
    "RPSL2Factory",
    "RPSLJEFactory",
    "RandomFactory",
    "RepresenterL2Factory",
    "RepresenterLJEFactory",
    "RetrainingData",
    "RunResult",
    "SGDTrainingProcedure",
    "SampleBoundaryCalculatorFactory",
    "SampleBoundaryFactory",
    "SubsetGroundTruth",
    "SubsetRetraining",
    "TRAKEnsembleFactory",
    "TracInFactory",
    "TrainedModel",
    "TrainingProcedure",
    "WeightsBoundaryCalculatorFactory",
    "WeightsBoundaryFactory",
    "average_ranks",
    "configure",
    "detection_curve",
    "detection_curve_area",
    "faithfulness_table",
    "faithfulness_to_dict",
    "flip_labels",
    "linear_datamodeling_score",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_mnist",
    "loo_correlation",
    "measure",
    "method_fields",
    "noise_ceiling",
    "parse_setting",
    "plot_faithfulness",
    "resolve_methods",
    "results_table",
    "results_to_dict",
    "retrain_leave_one_out",
    "retrain_on_subsets",
    "roc_auc",
    "save_faithfulness_json",
    "save_json",
    "subset_masks",
    "sweep_damping",
]
