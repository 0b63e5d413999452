"""The evaluator end to end on a tiny problem: planted perfect scores give AUC 1.0, constant ones 0.5;
the factories' scores against closed forms computed in float64 NumPy from the trained weights."""
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from influence_lib.benchmark.evaluator import MislabelingDetectorEvaluator
from influence_lib.benchmark.factories import (
    METHODS,
    FirstOrderFactory,
    GradientNormFactory,
    LossFactory,
    MethodFactory,
    RandomFactory,
    TracInFactory,
    resolve_methods,
)
from influence_lib.benchmark.training import MLPTrainingProcedure

NB_CLASSES = 3


def blobs(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % NB_CLASSES
    centers = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    return (centers[labels] + rng.normal(size=(n, 4))).astype(np.float32), labels


class PlantedFactory(MethodFactory):
    """Knows the truth: scores 1 where the training label differs from the clean one."""

    def __init__(self, clean_labels):
        self.clean_labels = clean_labels

    def score(self, trained, train_set):
        noisy = np.concatenate([y.numpy().argmax(axis=1) for _, y in train_set])
        return (noisy != self.clean_labels).astype(float)


class ConstantFactory(MethodFactory):
    def score(self, trained, train_set):
        return np.full(sum(int(x.shape[0]) for x, _ in train_set), 7.0)


@pytest.fixture(scope="module")
def evaluator():
    return MislabelingDetectorEvaluator(
        blobs(60, 0), blobs(15, 1), MLPTrainingProcedure((8,), epochs=3, batch_size=16), NB_CLASSES, 0.2,
        influence_batch_size=16, show_progress=False,
    )


def test_planted_perfect_scores_give_auc_one_and_constant_scores_one_half(evaluator, tmp_path):
    factories = {"planted": PlantedFactory(evaluator.y_train), "constant": ConstantFactory()}
    results = evaluator.bench(factories, nbr_of_evaluation=2, path_to_save=str(tmp_path), seed=5)
    assert [run.seed for run in results["planted"].runs] == [5, 6]
    for run in results["planted"].runs:
        assert run.roc_auc == 1.0
        assert run.curve_area == pytest.approx(1 - 0.2 / 2)
        assert len(run.flipped_indices) == 12
    for run in results["constant"].runs:
        assert run.roc_auc == 0.5
        assert run.curve_area == pytest.approx(0.5)
    assert results["planted"].roc_auc_mean == 1.0 and results["planted"].roc_auc_std == 0.0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["methods"]["constant"]["roc_auc_mean"] == 0.5
    assert [run["seed"] for run in saved["methods"]["planted"]["runs"]] == [5, 6]
    assert saved["config"]["nb_train"] == 60
    assert os.path.getsize(tmp_path / "detection_curves.png") > 0


def test_same_seed_gives_same_flips_and_model(evaluator):
    first = evaluator.evaluate(LossFactory(), 1, seed=3)
    again = evaluator.evaluate(LossFactory(), 1, seed=3)
    np.testing.assert_array_equal(first.runs[0].flipped_indices, again.runs[0].flipped_indices)
    np.testing.assert_allclose(first.runs[0].scores, again.runs[0].scores, rtol=1e-5)


@pytest.fixture(scope="module")
def trained_and_set():
    x, labels = blobs(40, 2)
    y = np.eye(NB_CLASSES, dtype=np.float32)[labels]
    trained = MLPTrainingProcedure((5,), epochs=5, batch_size=8, output_bias=True).train(x, y, x, y, seed=0)
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    hidden, probabilities = forward(trained.model, x)
    return trained, train_set, hidden, probabilities, y.astype(np.float64)


def forward(model, x):
    """Hidden features and softmax outputs of the one-hidden-layer MLP, float64."""
    dense_hidden, dense_out = model.layers[1], model.layers[2]
    hidden = np.maximum(x.astype(np.float64) @ dense_hidden.kernel.numpy() + dense_hidden.bias.numpy(), 0)
    logits = hidden @ dense_out.kernel.numpy()
    if dense_out.use_bias:
        logits = logits + dense_out.bias.numpy()
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    return hidden, probabilities / probabilities.sum(axis=1, keepdims=True)


def last_layer_gradients(hidden, probabilities, y):
    """Per-sample gradients of softmax cross-entropy w.r.t. (kernel, bias) of the last Dense layer."""
    residual = probabilities - y
    kernel = np.einsum("na,nc->nac", hidden, residual).reshape(len(y), -1)
    return np.concatenate([kernel, residual], axis=1)


def test_loss_and_gradient_norm_baselines_match_closed_forms(trained_and_set):
    trained, train_set, hidden, probabilities, y = trained_and_set
    loss = LossFactory().score(trained, train_set)
    np.testing.assert_allclose(loss, -np.log((probabilities * y).sum(axis=1)), rtol=1e-4)
    norms = GradientNormFactory().score(trained, train_set)
    np.testing.assert_allclose(norms, np.linalg.norm(last_layer_gradients(hidden, probabilities, y), axis=1), rtol=1e-4)


@pytest.mark.parametrize("normalize", [False, True])
def test_first_order_factory_matches_numpy_self_influence(trained_and_set, normalize):
    trained, train_set, hidden, probabilities, y = trained_and_set
    damping = 0.05
    augmented = np.concatenate([hidden, np.ones((len(y), 1))], axis=1)
    output_curvature = np.einsum("nc,cd->ncd", probabilities, np.eye(NB_CLASSES)) - np.einsum(
        "nc,nd->ncd", probabilities, probabilities
    )
    hessian = np.mean([np.kron(np.outer(h, h), a) for h, a in zip(augmented, output_curvature)], axis=0)
    gradients = last_layer_gradients(hidden, probabilities, y)
    influence_vectors = np.linalg.solve(hessian + damping * np.eye(len(hessian)), gradients.T).T
    if normalize:
        influence_vectors /= np.linalg.norm(influence_vectors, axis=1, keepdims=True)
    expected = np.sum(gradients * influence_vectors, axis=1)
    scores = FirstOrderFactory("exact", damping=damping, normalize=normalize).score(trained, train_set)
    np.testing.assert_allclose(scores, expected, rtol=2e-3)


def test_random_baseline_is_reproducible_and_sized(trained_and_set):
    trained, train_set, *_ = trained_and_set
    scores = RandomFactory().score(trained, train_set)
    assert scores.shape == (40,)
    np.testing.assert_array_equal(scores, RandomFactory().score(trained, train_set))


def test_bad_inputs_raise_clear_errors(evaluator):
    procedure = MLPTrainingProcedure((4,), epochs=1)
    with pytest.raises(ValueError, match="mislabeling_ratio"):
        MislabelingDetectorEvaluator(blobs(20, 0), blobs(5, 1), procedure, NB_CLASSES, 0.0)
    with pytest.raises(ValueError, match="flips no label"):
        MislabelingDetectorEvaluator(blobs(20, 0), blobs(5, 1), procedure, NB_CLASSES, 0.01)
    with pytest.raises(TypeError, match="TrainingProcedure"):
        MislabelingDetectorEvaluator(blobs(20, 0), blobs(5, 1), "mlp", NB_CLASSES, 0.1)
    with pytest.raises(TypeError, match="unbatched tf.data.Dataset"):
        MislabelingDetectorEvaluator(np.zeros((20, 4)), blobs(5, 1), procedure, NB_CLASSES, 0.1)
    with pytest.raises(TypeError, match="MethodFactory"):
        evaluator.bench({"loss": "loss"}, 1)
    with pytest.raises(ValueError, match="nbr_of_evaluation"):
        evaluator.bench({"loss": LossFactory()}, 0)
    with pytest.raises(ValueError, match="Unknown or no method"):
        resolve_methods("loss,nope")
    with pytest.raises(ValueError, match="ihvp"):
        FirstOrderFactory("newton")._ihvp_factory()


def test_accepts_an_unbatched_dataset_with_one_hot_labels():
    x, labels = blobs(20, 0)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.eye(NB_CLASSES, dtype=np.float32)[labels]))
    procedure = MLPTrainingProcedure((4,), epochs=1)
    evaluator = MislabelingDetectorEvaluator(dataset, blobs(5, 1), procedure, NB_CLASSES, 0.1)
    np.testing.assert_array_equal(evaluator.y_train, labels)
    np.testing.assert_allclose(evaluator.x_train, x)


def test_tracin_factory_sums_learning_rate_times_squared_gradient_norm_over_checkpoints(tmp_path):
    """Ground truth: each checkpoint's weights reloaded into a clone, last-layer gradients in NumPy."""
    x, labels = blobs(24, 3)
    y = np.eye(NB_CLASSES, dtype=np.float32)[labels]
    procedure = MLPTrainingProcedure((4,), epochs=4, batch_size=8, checkpoint_every_n_epochs=2)
    trained = procedure.train(x, y, x, y, seed=0, checkpoint_directory=str(tmp_path))
    checkpoints = trained.checkpoint_callback.checkpoints
    assert len(checkpoints) == 2
    expected = np.zeros(len(x))
    for path, rate in checkpoints:
        clone = procedure.build_model(x.shape[1:], NB_CLASSES)
        clone.load_weights(path)
        hidden, probabilities = forward(clone, x)
        kernel_gradients = np.einsum("na,nc->nac", hidden, probabilities - y).reshape(len(x), -1)
        expected += rate * np.sum(kernel_gradients**2, axis=1)
    train_set = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    np.testing.assert_allclose(TracInFactory().score(trained, train_set), expected, rtol=1e-3)
    with pytest.raises(ValueError, match="checkpoint"):
        TracInFactory().build(procedure.train(x, y, x, y, seed=0), train_set)


def test_every_registered_method_scores_every_training_sample(evaluator):
    """All methods run through the evaluator (TracIn checkpoints saved on demand) with finite scores."""
    results = evaluator.bench(dict(METHODS), nbr_of_evaluation=1)
    assert list(results) == list(METHODS)
    for name, result in results.items():
        run = result.runs[0]
        assert run.scores.shape == (60,), name
        assert np.isfinite(run.scores).all(), name
        assert 0.0 <= run.roc_auc <= 1.0 and run.seconds >= 0


def test_json_curve_is_subsampled_keeping_its_ends():
    from influence_lib.benchmark.evaluator import MethodResult, RunResult
    from influence_lib.benchmark.report import MAX_CURVE_POINTS, results_to_dict

    found = np.linspace(0.0, 1.0, 5001) ** 0.5
    run = RunResult(0, 0.9, 0.8, found, 1.0, 0.9, 0.9, np.zeros(5000), np.arange(3))
    saved = results_to_dict({"m": MethodResult("m", [run])})["methods"]["m"]
    assert len(saved["mean_curve_fraction_found"]) == MAX_CURVE_POINTS
    assert saved["mean_curve_fraction_inspected"][0] == 0.0 and saved["mean_curve_fraction_inspected"][-1] == 1.0
    inspected, found = saved["mean_curve_fraction_inspected"], saved["mean_curve_fraction_found"]
    np.testing.assert_allclose(found, np.sqrt(inspected), atol=1e-5)


def test_found_in_top_fraction_reads_the_detection_curve():
    from influence_lib.benchmark.evaluator import MethodResult, RunResult
    from influence_lib.benchmark.metrics import detection_curve
    from influence_lib.benchmark.report import results_table, results_to_dict

    is_flipped = np.zeros(50, dtype=bool)
    is_flipped[:10] = True  # 20% flipped
    runs = []
    for seed, scores in enumerate([is_flipped.astype(float), np.full(50, 3.0)]):  # perfect, then constant
        _, found = detection_curve(scores, is_flipped)
        runs.append(RunResult(seed, 0.5, 0.5, found, 1.0, 1.0, 1.0, scores, np.flatnonzero(is_flipped)))
    perfect, constant = MethodResult("perfect", runs[:1]), MethodResult("constant", runs[1:])
    # Top 10% (5 samples) of a perfect ranking holds 5 of the 10 flips; top 20% all of them.
    assert perfect.found_at(0.1) == pytest.approx(0.5) and perfect.found_at(0.2) == pytest.approx(1.0)
    # Tied scores are inspected in random order: the expected fraction found equals the fraction inspected.
    assert constant.found_at(0.1) == pytest.approx(0.1) and constant.found_at(0.2) == pytest.approx(0.2)
    assert "found in top 10%" in results_table({"perfect": perfect})
    assert results_to_dict({"perfect": perfect})["methods"]["perfect"]["found_in_top_20_percent"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="fraction_inspected"):
        perfect.found_at(1.5)
