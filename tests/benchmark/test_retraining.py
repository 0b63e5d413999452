"""Retraining ground truth: measurements against NumPy, the SGD procedure against a NumPy SGD, and the
store: resumes after SIGKILL, reuses a finished run, refuses another setup."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from influence_lib.benchmark.retraining import (
    RetrainingData,
    SubsetRetraining,
    measure,
    retrain_leave_one_out,
    retrain_on_subsets,
    subset_masks,
)
from influence_lib.benchmark.training import SGDTrainingProcedure

# A fast deterministic "training": ridge regression of the one-hot labels, as a logits model. It
# sleeps LDS_TEST_DELAY seconds and appends one line to its log per model, so tests can count.
PROCEDURE_SOURCE = textwrap.dedent('''
    import os, time
    from dataclasses import dataclass
    import keras, numpy as np
    from influence_lib.benchmark.training import TrainedModel, TrainingProcedure

    @dataclass
    class RidgeProcedure(TrainingProcedure):
        log_path: str
        ridge: float = 1.0

        def train(self, x_train, y_train, x_test, y_test, seed, checkpoint_directory=None):
            time.sleep(float(os.environ.get("LDS_TEST_DELAY", "0")))
            with open(self.log_path, "a") as log:
                log.write(f"{seed}\\n")
            features = np.hstack([x_train, np.ones((len(x_train), 1))]).astype(np.float64)
            gram = features.T @ features + self.ridge * np.eye(features.shape[1])
            solution = np.linalg.solve(gram, features.T @ y_train)
            model = keras.Sequential([keras.Input((x_train.shape[1],)), keras.layers.Dense(y_train.shape[1])])
            model.layers[-1].set_weights([solution[:-1].astype(np.float32), solution[-1].astype(np.float32)])
            loss = keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)
            return TrainedModel(model, 0.0, 0.0, seed, loss_function=loss)

    def make_data():
        from influence_lib.benchmark.retraining import RetrainingData
        rng = np.random.default_rng(0)
        x = rng.normal(size=(60, 5)).astype(np.float32)
        labels = (x[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int) + (x[:, 1] > 1)
        eye = np.eye(3, dtype=np.float32)
        return RetrainingData(x[:40], eye[labels[:40]], x[40:], eye[labels[40:]])
''')


def load_helpers():
    namespace = {}
    exec(PROCEDURE_SOURCE, namespace)
    return namespace["RidgeProcedure"], namespace["make_data"]


def ridge_logits(x_train, y_train, x_test, ridge=1.0):
    features = np.hstack([x_train, np.ones((len(x_train), 1))]).astype(np.float64)
    solution = np.linalg.solve(features.T @ features + ridge * np.eye(features.shape[1]), features.T @ y_train)
    return np.hstack([x_test, np.ones((len(x_test), 1))]) @ solution


def numpy_margin(logits, labels):
    correct = logits[np.arange(len(labels)), labels]
    others = np.where(np.eye(logits.shape[1], dtype=bool)[labels], -np.inf, logits)
    return correct - np.log(np.exp(others).sum(axis=1))


def log_lines(path):
    return open(path).read().split() if os.path.exists(path) else []


def test_measure_margin_and_loss_match_numpy(tmp_path):
    RidgeProcedure, make_data = load_helpers()
    data = make_data()
    trained = RidgeProcedure(str(tmp_path / "log")).train(data.x_train, data.y_train, data.x_test, data.y_test, 0)
    logits = ridge_logits(data.x_train, data.y_train, data.x_test)
    labels = data.y_test.argmax(axis=1)
    margins = measure(trained, data.x_test, data.y_test, "margin")
    np.testing.assert_allclose(margins, numpy_margin(logits, labels), atol=1e-4)
    shifted = logits - logits.max(axis=1, keepdims=True)
    loss = -(shifted[np.arange(len(labels)), labels] - np.log(np.exp(shifted).sum(axis=1)))
    np.testing.assert_allclose(measure(trained, data.x_test, data.y_test, "loss"), loss, atol=1e-4)
    with pytest.raises(ValueError, match="measurement must be one of"):
        measure(trained, data.x_test, data.y_test, "accuracy")


def test_subset_masks_have_exact_sizes_and_are_reproducible():
    masks = subset_masks(40, 0.5, 7, seed=3)
    assert masks.shape == (7, 40) and (masks.sum(axis=1) == 20).all()
    np.testing.assert_array_equal(masks, subset_masks(40, 0.5, 7, seed=3))
    assert not np.array_equal(masks, subset_masks(40, 0.5, 7, seed=4))
    with pytest.raises(ValueError, match="alpha"):
        subset_masks(3, 0.1, 5, 0)


def test_subset_ground_truth_matches_retraining_by_hand(tmp_path):
    RidgeProcedure, make_data = load_helpers()
    data = make_data()
    procedure = RidgeProcedure(str(tmp_path / "log"))
    truth = retrain_on_subsets(procedure, data, SubsetRetraining(nb_subsets=4), show_progress=False)
    labels = data.y_test.argmax(axis=1)
    for mask, row in zip(truth.masks, truth.measurements):
        expected = numpy_margin(ridge_logits(data.x_train[mask], data.y_train[mask], data.x_test), labels)
        np.testing.assert_allclose(row, expected, atol=1e-4)


def test_leave_one_out_changes_match_numpy(tmp_path):
    RidgeProcedure, make_data = load_helpers()
    data = make_data()
    removed = np.array([2, 5, 11])
    truth = retrain_leave_one_out(RidgeProcedure(str(tmp_path / "log")), data, removed, path=str(tmp_path / "loo"),
                                  show_progress=False)
    labels = data.y_test.argmax(axis=1)
    full = numpy_margin(ridge_logits(data.x_train, data.y_train, data.x_test), labels)
    for index, row in zip(removed, truth.changes):
        keep = np.arange(40) != index
        expected = numpy_margin(ridge_logits(data.x_train[keep], data.y_train[keep], data.x_test), labels) - full
        np.testing.assert_allclose(row, expected, atol=2e-4)
    with pytest.raises(ValueError, match="distinct indices"):
        retrain_leave_one_out(RidgeProcedure(str(tmp_path / "log")), data, np.array([1, 1]), show_progress=False)


def test_store_resumes_after_sigkill_and_refuses_another_setup(tmp_path):
    RidgeProcedure, make_data = load_helpers()
    store, log = tmp_path / "store", tmp_path / "log"
    script = tmp_path / "writer.py"
    script.write_text(PROCEDURE_SOURCE + textwrap.dedent(f'''
        from influence_lib.benchmark.retraining import SubsetRetraining, retrain_on_subsets
        retrain_on_subsets(RidgeProcedure({str(log)!r}), make_data(), SubsetRetraining(nb_subsets=8), {str(store)!r},
                           show_progress=False)
    '''))
    environment = {**os.environ, "LDS_TEST_DELAY": "0.25", "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "3"}
    writer = subprocess.Popen([sys.executable, str(script)], env=environment)
    deadline = time.time() + 180
    while len(log_lines(log)) < 4 and time.time() < deadline and writer.poll() is None:
        time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    trained_before = len(log_lines(log))
    assert 4 <= trained_before < 8, "the writer should be killed half-way"
    # Completely written shards: a kill between a shard and its checksum leaves one the store will redo.
    stored = len([
        name for name in os.listdir(store) if name.endswith(".npz") and os.path.exists(store / f"{name}.sha256")
    ])
    assert stored in (trained_before - 1, trained_before)  # the model in flight may not be stored

    procedure = RidgeProcedure(str(log))
    resumed = retrain_on_subsets(
        procedure, make_data(), SubsetRetraining(nb_subsets=8), str(store), show_progress=False
    )
    assert len(log_lines(log)) - trained_before == 8 - stored  # only the missing models were trained
    fresh = retrain_on_subsets(RidgeProcedure(str(tmp_path / "other_log")), make_data(), SubsetRetraining(nb_subsets=8),
                               show_progress=False)
    np.testing.assert_array_equal(resumed.masks, fresh.masks)
    np.testing.assert_allclose(resumed.measurements, fresh.measurements, atol=1e-6)

    count = len(log_lines(log))
    again = retrain_on_subsets(procedure, make_data(), SubsetRetraining(nb_subsets=8), str(store), show_progress=False)
    assert len(log_lines(log)) == count  # a finished run is reused
    np.testing.assert_array_equal(again.measurements, resumed.measurements)

    with pytest.raises(ValueError, match="different setup.*alpha"):
        retrain_on_subsets(procedure, make_data(), SubsetRetraining(alpha=0.4, nb_subsets=8), str(store))
    with pytest.raises(ValueError, match="different setup.*procedure"):
        retrain_on_subsets(RidgeProcedure(str(log), ridge=2.0), make_data(), SubsetRetraining(nb_subsets=8), str(store))
    other = make_data()
    other.x_test[0, 0] += 1.0
    with pytest.raises(ValueError, match="different setup.*data"):
        retrain_on_subsets(procedure, other, SubsetRetraining(nb_subsets=8), str(store))


def numpy_sgd(procedure, weights, x, y, seed, removed=None):
    """Mini-batch SGD with momentum on softmax regression, float64, the procedure's batch orders
    (sample ``removed`` dropped from the batch that holds it)."""
    kernel, bias = (np.asarray(w, np.float64) for w in weights)
    velocity_kernel, velocity_bias = np.zeros_like(kernel), np.zeros_like(bias)
    orders, _ = procedure.batch_orders(len(x), seed)
    masks = np.ones(orders.shape)
    positions = np.arange(orders.shape[0] * orders.shape[1] * orders.shape[2]).reshape(orders.shape)
    masks[positions % (orders.shape[1] * orders.shape[2]) >= len(x)] = 0.0  # padding of the last batch
    if removed is not None:
        masks[orders == removed] = 0.0
    for order, mask in zip(orders.reshape(-1, procedure.batch_size), masks.reshape(-1, procedure.batch_size)):
        batch_x, batch_y = x[order].astype(np.float64), y[order]
        logits = batch_x @ kernel + bias
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        delta = (probabilities - batch_y) * mask[:, None] / mask.sum()
        gradient_kernel = batch_x.T @ delta + 2 * procedure.weight_decay * kernel
        velocity_kernel = procedure.momentum * velocity_kernel - procedure.learning_rate * gradient_kernel
        velocity_bias = procedure.momentum * velocity_bias - procedure.learning_rate * delta.sum(axis=0)
        kernel, bias = kernel + velocity_kernel, bias + velocity_bias
    return kernel, bias


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 1e-3)])
def test_sgd_procedure_matches_numpy_sgd(momentum, weight_decay):
    import keras

    rng = np.random.default_rng(0)
    x = rng.normal(size=(70, 6)).astype(np.float32)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, size=70)]
    procedure = SGDTrainingProcedure(epochs=3, batch_size=16, learning_rate=0.1, momentum=momentum,
                                     weight_decay=weight_decay)
    trained = procedure.train(x, y, x[:5], y[:5], seed=4)
    keras.utils.set_random_seed(4)
    initial = procedure.build_model((6,), 3).get_weights()
    kernel, bias = numpy_sgd(procedure, initial, x, y, seed=4)
    np.testing.assert_allclose(trained.model.layers[-1].kernel.numpy(), kernel, atol=1e-5)
    np.testing.assert_allclose(trained.model.layers[-1].bias.numpy(), bias, atol=1e-5)
    predicted = (x @ kernel + bias).argmax(axis=1)
    assert trained.train_accuracy == pytest.approx(np.mean(predicted == y.argmax(axis=1)))
    again = procedure.train(x, y, x[:5], y[:5], seed=4)
    np.testing.assert_array_equal(again.model.get_weights()[0], trained.model.get_weights()[0])
    # Leave-one-out keeps the initialization and every batch, minus the one sample.
    without = procedure.train_without(x, y, 11, x[:5], y[:5], seed=4)
    kernel, bias = numpy_sgd(procedure, initial, x, y, seed=4, removed=11)
    np.testing.assert_allclose(without.model.layers[-1].kernel.numpy(), kernel, atol=1e-5)
    np.testing.assert_allclose(without.model.layers[-1].bias.numpy(), bias, atol=1e-5)
    with pytest.raises(ValueError, match="index must be"):
        procedure.train_without(x, y, 70, x[:5], y[:5], seed=4)


def test_sgd_procedure_saves_tracin_checkpoints(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 4)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, size=40)]
    procedure = SGDTrainingProcedure(hidden_units=(5,), epochs=4, batch_size=8, dropout=0.2, momentum=0.5,
                                     checkpoint_every_n_epochs=2)
    trained = procedure.train(x, y, x, y, seed=0, checkpoint_directory=str(tmp_path / "checkpoints"))
    assert len(trained.checkpoint_callback.checkpoints) == 2
    assert all(rate == pytest.approx(0.01) for _, rate in trained.checkpoint_callback.checkpoints)
    assert trained.loss_function is not None and trained.model.layers[-1].use_bias
