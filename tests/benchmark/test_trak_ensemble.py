"""TRAK over independently trained models in the benchmark registry (``trak_ensemble``).

Ground truth: the ensemble's models are retrained in the test with the procedure, seeds and
subsets documented by :class:`IndependentModels`, and TRAK's formula is computed from their weights
in float64 NumPy (margin gradients of softmax regression in closed form); the stored models are
reused without retraining.
"""
import numpy as np
import pytest
import tensorflow as tf
from reference_math import margin_gradients

from influence_lib.benchmark import METHODS, MislabelingDetectorEvaluator, TRAKEnsembleFactory
from influence_lib.benchmark.faithfulness import linear_datamodeling_score
from influence_lib.benchmark.faithfulness_evaluator import FaithfulnessEvaluator
from influence_lib.benchmark.lds_cli import build_lds_parser, factories_from
from influence_lib.benchmark.retraining import (
    ENSEMBLE_SEED_OFFSET,
    IndependentModels,
    RetrainingData,
    SubsetRetraining,
    subset_masks,
)
from influence_lib.benchmark.training import SGDTrainingProcedure, TrainedModel

PROCEDURE = SGDTrainingProcedure(epochs=3, batch_size=32, learning_rate=0.1)


def digits(n_train=100, n_test=12) -> RetrainingData:
    from influence_lib.benchmark.datasets import load_digits

    data = load_digits().subset(n_train, n_test)
    eye = np.eye(10, dtype=np.float32)
    scale = lambda x: (x.reshape(len(x), -1) / 16.0).astype(np.float32)  # noqa: E731
    return RetrainingData(scale(data.x_train), eye[data.y_train], scale(data.x_test), eye[data.y_test])


def numpy_trak(weight_lists, data: RetrainingData, damping: float) -> np.ndarray:
    """``τ(t, i) = [1/M Σ_m φ_m(t)ᵀ (Φ_mᵀΦ_m + λI)⁻¹ φ_m(i)] · 1/M Σ_m (1 − p_m(y_i | x_i))`` without projection."""
    x, labels = data.x_train.astype(np.float64), data.y_train.argmax(1)
    test_x, test_labels = data.x_test.astype(np.float64), data.y_test.argmax(1)
    kernels, weighting = [], []
    for kernel, bias in ((w[0].astype(np.float64), w[1].astype(np.float64)) for w in weight_lists):
        train = margin_gradients(x, labels, kernel, bias)
        test = margin_gradients(test_x, test_labels, kernel, bias)
        kernels.append(test @ np.linalg.solve(train.T @ train + damping * np.eye(train.shape[1]), train.T))
        logits = x @ kernel + bias
        probabilities = np.exp(logits - logits.max(1, keepdims=True))
        probabilities /= probabilities.sum(1, keepdims=True)
        weighting.append(1.0 - probabilities[np.arange(len(x)), labels])
    return np.mean(kernels, axis=0) * np.mean(weighting, axis=0)[None, :]


def retrained_weights(data: RetrainingData, count: int, seed: int = 0):
    """The ensemble retrained here: model j from seed ``seed + 2,000,000 + j`` on its half-size subset."""
    masks = subset_masks(len(data.x_train), 0.5, count, seed + ENSEMBLE_SEED_OFFSET)
    return [
        PROCEDURE.train(data.x_train[m], data.y_train[m], data.x_test, data.y_test, seed + ENSEMBLE_SEED_OFFSET + j)
        .model.get_weights()
        for j, m in enumerate(masks)
    ]


def test_ensemble_factory_equals_trak_of_the_retrained_models_and_reuses_the_store(tmp_path, monkeypatch):
    data = digits()
    store = str(tmp_path / "store")
    evaluator = FaithfulnessEvaluator(data, PROCEDURE, SubsetRetraining(nb_subsets=6), noise_ceiling=False,
                                      store_path=store, influence_batch_size=32, show_progress=False)
    factory = TRAKEnsembleFactory(models=3, dimension=None, damping=1.0)
    result = evaluator.evaluate({"trak_ensemble": factory})["trak_ensemble"]
    assert result.error is None

    expected = numpy_trak(retrained_weights(data, 3), data, damping=1.0)
    assert np.all(np.isfinite(expected)) and np.abs(expected).max() > 0
    assert result.lds.mean == pytest.approx(linear_datamodeling_score(expected, evaluator.ground_truth()).mean,
                                            abs=2e-3)
    trained = evaluator.train_model()
    trained.independent_models = IndependentModels(PROCEDURE, data, str(tmp_path / "store" / "independent_models"),
                                                   show_progress=False)
    train_set, test_set = (tf.data.Dataset.from_tensor_slices(pair).batch(32)
                           for pair in ((data.x_train, data.y_train), (data.x_test, data.y_test)))

    # The second use reads the three stored models: training is not called.
    def no_training(*args, **kwargs):
        raise AssertionError("the stored independent models must be reused, not retrained")

    monkeypatch.setattr(SGDTrainingProcedure, "train", no_training)
    scores = factory.attribute(trained, train_set, test_set, "margin")
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_models_are_numbered_resumed_and_refused_for_another_setup(tmp_path, monkeypatch):
    data = digits(60, 5)
    path = str(tmp_path / "models")
    first = IndependentModels(PROCEDURE, data, path, seed=3, show_progress=False).weights(2)
    calls = []
    original = SGDTrainingProcedure.train

    def counted(self, x_train, *args, **kwargs):
        calls.append(len(x_train))
        return original(self, x_train, *args, **kwargs)

    monkeypatch.setattr(SGDTrainingProcedure, "train", counted)
    again = IndependentModels(PROCEDURE, data, path, seed=3, show_progress=False).weights(3)
    assert calls == [30]  # only model 2 is trained, on its half of the 60 samples
    for stored, reread in zip(first, again[:2]):
        for a, b in zip(stored, reread):
            np.testing.assert_array_equal(a, b)
    full = IndependentModels(PROCEDURE, data, path, seed=3, show_progress=False).weights(1, alpha=1.0)
    assert calls == [30, 60] and len(full) == 1
    with pytest.raises(ValueError, match="procedure"):
        IndependentModels(SGDTrainingProcedure(epochs=4), data, path, seed=3, show_progress=False).weights(1)


def test_bad_settings_raise_clear_errors():
    data = digits(20, 4)
    models = IndependentModels(PROCEDURE, data, show_progress=False)
    with pytest.raises(ValueError, match="count must be a positive integer"):
        models.weights(0)
    with pytest.raises(ValueError, match="alpha must be in"):
        models.weights(1, alpha=1.5)
    with pytest.raises(TypeError, match="TrainingProcedure"):
        IndependentModels("sgd", data)
    with pytest.raises(TypeError, match="template must be a keras.Model"):
        models.models("mlp", 1)
    trained = TrainedModel(PROCEDURE.train(data.x_train, data.y_train, data.x_test, data.y_test, 0).model, 0, 0, 0)
    train_set = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).batch(8)
    with pytest.raises(ValueError, match="independently trained models"):
        METHODS["trak_ensemble"].score(trained, train_set)
    trained.independent_models = models
    with pytest.raises(ValueError, match="ensemble size"):
        TRAKEnsembleFactory(models=0).score(trained, train_set)


def test_command_line_sets_the_ensemble_size():
    arguments = build_lds_parser().parse_args(["--methods", "trak,trak_ensemble", "--set", "trak_ensemble.models=50"])
    factories = factories_from(arguments)
    assert factories["trak_ensemble"].models == 50 and factories["trak_ensemble"].alpha == 0.5
    assert not hasattr(factories["trak"], "models")


def test_mislabel_benchmark_runs_the_ensemble():
    data = digits(60, 10)
    evaluator = MislabelingDetectorEvaluator(
        tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train.argmax(1))),
        tf.data.Dataset.from_tensor_slices((data.x_test, data.y_test.argmax(1))),
        PROCEDURE, 10, 0.2, influence_batch_size=16, show_progress=False,
    )
    run = evaluator.bench({"trak_ensemble": TRAKEnsembleFactory(models=2, dimension=32)}, 1)["trak_ensemble"].runs[0]
    assert run.scores.shape == (60,) and np.all(np.isfinite(run.scores)) and 0.0 <= run.roc_auc <= 1.0


def test_ensemble_watches_every_layer_by_default():
    data = digits(40, 4)
    procedure = SGDTrainingProcedure(hidden_units=(8,), epochs=1, batch_size=16)
    trained = TrainedModel(procedure.train(data.x_train, data.y_train, data.x_test, data.y_test, 0).model, 0, 0, 0,
                           loss_function=procedure.loss_function())
    trained.independent_models = IndependentModels(procedure, data, show_progress=False)
    train_set = tf.data.Dataset.from_tensor_slices((data.x_train, data.y_train)).batch(16)
    trak = TRAKEnsembleFactory(models=2, dimension=16).build(trained, train_set)
    assert len(trak.models) == 2 and trak.models[0].nb_params == trained.model.count_params() == 64 * 8 + 8 + 8 * 10 + 10
    assert trak.models[0].model is not trained.model
