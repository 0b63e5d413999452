"""Self-influence ranks artificially flipped labels above clean ones on a real dataset (digits).

300 scikit-learn digits (bundled, offline), 10% of the labels flipped to another class, a small MLP
trained until it fits the noisy labels. Each method's self-influence must reach a ROC-AUC of 0.8
for "flipped vs clean": with ~30 flipped samples a random score has ROC-AUC 0.5 ± 0.056, so 0.8 is
more than five standard deviations away from chance.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

from influence_lib.curvature.factory import ExactIHVPFactory
from influence_lib.influence.base import extract_only_values
from influence_lib.influence.boundary_sample import SampleBoundaryCalculator
from influence_lib.influence.boundary_weights import WeightsBoundaryCalculator
from influence_lib.influence.representer_l2 import RepresenterPointL2
from influence_lib.influence.representer_lje import RepresenterPointLJE
from influence_lib.influence.tracin import TracIn
from influence_lib.influence.tracin_checkpoint import TracInCheckpoint
from influence_lib.model.influence_model import InfluenceModel

AUC_THRESHOLD = 0.8


@pytest.fixture(scope="module")
def noisy_digits(tmp_path_factory):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x, labels = load_digits(return_X_y=True)
    chosen = rng.permutation(len(x))[:300]
    x, labels = (x[chosen] / 16).astype(np.float32), labels[chosen]
    flipped = rng.random(len(x)) < 0.1
    noisy = labels.copy()
    noisy[flipped] = (labels[flipped] + rng.integers(1, 10, flipped.sum())) % 10
    y = np.eye(10, dtype=np.float32)[noisy]
    model = keras.Sequential(
        [
            keras.Input((64,)),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dense(10, use_bias=False, activation="softmax"),
        ]
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    checkpoints = TracInCheckpoint(str(tmp_path_factory.mktemp("checkpoints")), every_n_epochs=25)
    model.fit(x, y, batch_size=50, epochs=100, verbose=0, callbacks=[checkpoints])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(100)
    return model, dataset, flipped, checkpoints


def _auc(calculator, dataset, flipped) -> float:
    scores = extract_only_values(calculator.compute_influence_values(dataset)).numpy()
    return roc_auc_score(flipped, scores)


def test_tracin_detects_flipped_labels(noisy_digits):
    model, dataset, flipped, checkpoints = noisy_digits
    assert _auc(TracIn.from_callback(checkpoints, show_progress=False), dataset, flipped) >= AUC_THRESHOLD


def test_representer_l2_detects_flipped_labels(noisy_digits):
    model, dataset, flipped, _ = noisy_digits
    loss = keras.losses.CategoricalCrossentropy(reduction=None)
    calculator = RepresenterPointL2(model, dataset, loss, lambda_regularization=1e-3, show_progress=False)
    assert _auc(calculator, dataset, flipped) >= AUC_THRESHOLD


def test_representer_lje_detects_flipped_labels(noisy_digits):
    model, dataset, flipped, _ = noisy_digits
    calculator = RepresenterPointLJE(
        InfluenceModel(model), dataset, ExactIHVPFactory(damping=1e-3), show_progress=False
    )
    assert _auc(calculator, dataset, flipped) >= AUC_THRESHOLD


@pytest.mark.parametrize("calculator_type", [SampleBoundaryCalculator, WeightsBoundaryCalculator])
def test_boundary_methods_detect_flipped_labels(noisy_digits, calculator_type):
    model, dataset, flipped, _ = noisy_digits
    assert _auc(calculator_type(model, show_progress=False), dataset, flipped) >= AUC_THRESHOLD
