"""The TRAK and gradient-similarity factories of the benchmark registry: attributions (test × train)
against float64 NumPy with the registry's sign (change of the measurement when a sample is included)."""
import numpy as np
import pytest
import tensorflow as tf
from reference_math import margin_gradients, softmax, softmax_gradients, softmax_regression

from influence_lib.benchmark.factories import METHODS, GradSimilarityFactory, TRAKFactory
from influence_lib.benchmark.training import TrainedModel


def _problem():
    model, train_set, x, y = softmax_regression(n=48, d=4, c=3)
    test_x, test_y = x[:7] + 0.1, y[:7]
    test_set = tf.data.Dataset.from_tensor_slices((test_x, test_y)).batch(4)
    kernel, bias = (w.astype(np.float64) for w in model.layers[-1].get_weights())
    return TrainedModel(model, 0.0, 0.0, seed=0), train_set, test_set, x, y, test_x, test_y, kernel, bias


@pytest.mark.parametrize("measurement", ["margin", "loss"])
def test_trak_attributions_are_the_predicted_change_of_the_measurement(measurement):
    trained, train_set, test_set, x, y, test_x, test_y, kernel, bias = _problem()
    scores = TRAKFactory(dimension=None, damping=0.1).attribute(trained, train_set, test_set, measurement)
    if measurement == "margin":
        train = margin_gradients(x, y.argmax(1), kernel, bias)
        test = margin_gradients(test_x, test_y.argmax(1), kernel, bias)
        weights = 1.0 - (softmax(x @ kernel + bias) * y).sum(1)
    else:
        train, test = softmax_gradients(x, y, kernel, bias), softmax_gradients(test_x, test_y, kernel, bias)
        weights = np.ones(len(x))
    tau = test @ np.linalg.solve(train.T @ train + 0.1 * np.eye(train.shape[1]), train.T) * weights
    expected = tau if measurement == "margin" else -tau
    np.testing.assert_allclose(scores, expected, rtol=1e-3, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("cosine", [False, True])
def test_grad_similarity_attributions(cosine):
    trained, train_set, test_set, x, y, test_x, test_y, kernel, bias = _problem()
    scores = GradSimilarityFactory(cosine=cosine).attribute(trained, train_set, test_set, "margin")
    train = softmax_gradients(x, y, kernel, bias)
    test = margin_gradients(test_x, test_y.argmax(1), kernel, bias)
    if cosine:
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
    np.testing.assert_allclose(scores, -test @ train.T, rtol=1e-3, atol=1e-5)


def test_registry_entries():
    assert METHODS["trak"].pairwise and not METHODS["trak"].needs_checkpoints
    assert METHODS["trak_checkpoints"].needs_checkpoints
    assert METHODS["grad_cos"].cosine and not METHODS["grad_dot"].cosine
    trained, train_set, *_ = _problem()
    with pytest.raises(ValueError, match="checkpoints of training"):
        METHODS["trak_checkpoints"].score(trained, train_set)
    self_influence = METHODS["trak"].score(trained, train_set)
    assert self_influence.shape == (48,) and np.all(self_influence >= 0)
