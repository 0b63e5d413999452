"""Influenciae's benchmark names: the evaluator's signature, build_noisy_training_dataset, Influenciae-style
procedures, the factory names and the CIFAR-10 benchmark from a local copy."""
import pickle

import keras
import numpy as np
import pytest
import tensorflow as tf
from reference_math import pseudo_inverse, softmax_gradients, softmax_hessian, softmax_regression

from influence_lib.benchmark import (
    ArnoldiCalculatorFactory,
    Cifar10MislabelingDetectorEvaluator,
    Cifar10TrainingProcedure,
    LossFactory,
    MislabelingDetectorEvaluator,
    MLPTrainingProcedure,
    RPSL2Factory,
    RPSLJEFactory,
    SampleBoundaryCalculatorFactory,
    SampleBoundaryFactory,
    WeightsBoundaryCalculatorFactory,
    WeightsBoundaryFactory,
)
from influence_lib.benchmark.training import TrainedModel
from influence_lib.influence.representer_l2 import RepresenterPointL2
from influence_lib.influence.representer_lje import RepresenterPointLJE
from influence_lib.curvature.factory import ExactIHVPFactory
from influence_lib.model.influence_model import InfluenceModel


def blobs(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    return (np.eye(3)[labels] * 3 + rng.normal(size=(n, 3))).astype(np.float32), labels


def test_evaluator_takes_influenciae_positional_arguments_and_config():
    evaluator = MislabelingDetectorEvaluator(
        blobs(40, 0), blobs(10, 1), MLPTrainingProcedure((4,), epochs=1), 3, 0.25, 32, 16, None, {"experiment": "x"},
    )
    assert evaluator.influence_batch_size == 32 and evaluator.test_batch_size == 16
    config = evaluator.config()
    assert config["experiment"] == "x" and config["train_batch_size"] == 32 and config["mislabeling_ratio"] == 0.25
    with pytest.raises(ValueError, match="train_batch_size"):
        MislabelingDetectorEvaluator(blobs(40, 0), blobs(10, 1), MLPTrainingProcedure(), 3, 0.25, 0)
    with pytest.raises(TypeError, match="config"):
        MislabelingDetectorEvaluator(blobs(40, 0), blobs(10, 1), MLPTrainingProcedure(), 3, 0.25, config=[1])


def test_build_noisy_training_dataset_flips_exactly_the_returned_samples():
    x, labels = blobs(40, 0)
    evaluator = MislabelingDetectorEvaluator((x, labels), blobs(10, 1), MLPTrainingProcedure(), 3, 0.25)
    dataset, flipped = evaluator.build_noisy_training_dataset(seed=3)
    noisy = np.stack([y for _, y in dataset.as_numpy_iterator()]).argmax(axis=1)
    inputs = np.stack([inputs for inputs, _ in dataset.as_numpy_iterator()])
    np.testing.assert_array_equal(inputs, x)
    np.testing.assert_array_equal(np.flatnonzero(noisy != labels), flipped[0])  # Influenciae reads [0]
    assert len(flipped[0]) == 10


class InfluenciaeStyleProcedure:
    """Influenciae's BaseTrainingProcedure interface: datasets in, (acc, acc, model, info) out."""

    def __init__(self):
        self.batch_sizes = None

    def train(self, training_dataset, test_dataset, train_batch_size=128, test_batch_size=128, log_path=None):
        self.batch_sizes = (train_batch_size, test_batch_size)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3, activation="softmax")])
        model.compile("adam", "categorical_crossentropy")
        model.fit(training_dataset.batch(train_batch_size), epochs=1, verbose=0, shuffle=False)
        return 0.5, 0.5, model, None


def test_influenciae_style_procedures_run_in_the_evaluator():
    procedure = InfluenciaeStyleProcedure()
    evaluator = MislabelingDetectorEvaluator(blobs(40, 0), blobs(10, 1), procedure, 3, 0.25, 8, 4, show_progress=False)
    results = evaluator.bench({"loss": LossFactory()}, 1)
    assert procedure.batch_sizes == (8, 4)
    run = results["loss"].runs[0]
    assert run.scores.shape == (40,) and run.train_accuracy == 0.5


def test_boundary_factory_names_are_the_library_factories():
    assert WeightsBoundaryCalculatorFactory is WeightsBoundaryFactory
    assert SampleBoundaryCalculatorFactory is SampleBoundaryFactory
    assert WeightsBoundaryCalculatorFactory(step_nbr=10, norm_type=2).step_nbr == 10


def test_arnoldi_calculator_factory_matches_the_pseudo_inverse():
    model, train_set, x, y = softmax_regression(n=40, d=3, c=3)
    trained = TrainedModel(model, 0.0, 0.0, seed=0)
    # All (d + 1)(c − 1) = 8 nonzero eigenvalues of the 12-parameter Hessian: Arnoldi equals the pseudo-inverse.
    factory = ArnoldiCalculatorFactory(12, True, 8, dtype=tf.float64)
    scores = factory.score(trained, train_set)
    kernel, bias = (w.astype(np.float64) for w in model.layers[-1].get_weights())
    gradients = softmax_gradients(x, y, kernel, bias)
    expected = np.einsum("np,pq,nq->n", gradients, pseudo_inverse(softmax_hessian(x, kernel, bias)), gradients)
    np.testing.assert_allclose(scores, expected, rtol=2e-3)


def test_representer_factory_names_map_their_arguments():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=30)]
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5, activation="relu"),
                              keras.layers.Dense(3, activation="softmax", use_bias=False)])
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    trained = TrainedModel(model, 0.0, 0.0, seed=0)
    direct = RepresenterPointLJE(
        InfluenceModel(model, start_layer=-1), train_set, ExactIHVPFactory(show_progress=False), show_progress=False
    )
    expected = np.concatenate([v.numpy() for _, v in direct.compute_influence_values(train_set)])
    np.testing.assert_allclose(RPSLJEFactory("exact").score(trained, train_set), expected, rtol=1e-5)
    loss = keras.losses.CategoricalCrossentropy(reduction=None)
    direct_l2 = RepresenterPointL2(model, train_set, loss, 0.01, epochs=20, show_progress=False)
    expected_l2 = np.concatenate([v.numpy() for _, v in direct_l2.compute_influence_values(train_set)])
    np.testing.assert_allclose(RPSL2Factory(loss, 0.01, epochs=20).score(trained, train_set), expected_l2, rtol=1e-5)
    with pytest.raises(ValueError, match="feature_extractor must be -1"):
        RPSLJEFactory("exact", feature_extractor=2)
    with pytest.raises(ValueError, match="ihvp_mode"):
        RPSLJEFactory("newton")


def write_cifar(directory, per_batch=12):
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = np.arange(per_batch) % 10
        pixels = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        pixels[:, :1024] = (labels[:, None] * 25).astype(np.uint8)  # the red channel tells the class
        with open(directory / name, "wb") as stream:
            pickle.dump({b"data": pixels, b"labels": labels.tolist()}, stream)


def test_cifar10_benchmark_reads_a_local_copy(tmp_path):
    write_cifar(tmp_path)
    evaluator = Cifar10MislabelingDetectorEvaluator(
        epochs=1, model_type="cnn", mislabeling_ratio=0.1, train_batch_size=20, data_path=str(tmp_path),
        show_progress=False,
    )
    assert evaluator.x_train.shape == (60, 32, 32, 3) and evaluator.x_train.min() >= -1.0
    assert evaluator.config()["model_type"] == "cnn" and evaluator.config()["samples_to_take"] == -1
    results = evaluator.bench({"loss": LossFactory()}, 1)
    assert results["loss"].runs[0].scores.shape == (60,) and len(results["loss"].runs[0].flipped_indices) == 6
    with pytest.raises(ValueError, match="checkpoint_every_n_epochs"):
        Cifar10MislabelingDetectorEvaluator(epochs_to_save=[1, 2], data_path=str(tmp_path))
    with pytest.raises(ValueError, match="model_type"):
        Cifar10TrainingProcedure(model_type="alexnet")
    with pytest.raises(FileNotFoundError, match="CIFAR-10 directory"):
        Cifar10MislabelingDetectorEvaluator(data_path=str(tmp_path / "missing"))
