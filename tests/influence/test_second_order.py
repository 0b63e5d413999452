"""Second-order group influence against its float64 NumPy closed form and against actual retraining.

Model: L2-regularized binary logistic regression (convex, positive-definite Hessian) trained to
convergence by Newton's method in float64; groups are removed and the model retrained the same
way. Groups are coherent (the points most confidently on their side along the first feature)
so that the pairwise interaction term matters (Basu, You & Feizi 2020).
"""
import numpy as np
import pytest
import reference_math as rm
import tensorflow as tf

from influence_lib.curvature import CGDIHVPFactory, ExactIHVPFactory
from influence_lib.influence import FirstOrderInfluenceCalculator, SecondOrderInfluenceCalculator

L2 = 1e-2
# The closed forms and retraining are undamped: damping 0, not the default damping='auto'.
UNDAMPED = ExactIHVPFactory(damping=0.0, show_progress=False)
N, D = 200, 5


def _hessian_gradient(features, labels, theta):
    """Mean Hessian and mean gradient of mean BCE + (L2/2)‖kernel‖² (bias not regularized)."""
    probabilities = 1.0 / (1.0 + np.exp(-features @ theta))
    mask = np.r_[np.ones(D), 0.0]
    hessian = (features.T * (probabilities * (1 - probabilities))) @ features / len(labels) + L2 * np.diag(mask)
    gradient = features.T @ (probabilities - labels) / len(labels) + L2 * mask * theta
    return hessian, gradient


def _newton(features, labels, theta):
    theta = theta.copy()
    for _ in range(40):
        theta -= np.linalg.solve(*_hessian_gradient(features, labels, theta))
    return theta


def _per_sample(features, labels, theta):
    """Per-sample losses, gradients (n, P) and Hessians (n, P, P) of BCE + (L2/2)‖kernel‖²."""
    logits = features @ theta
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    mask = np.r_[np.ones(D), 0.0]
    losses = np.logaddexp(0, logits) - labels * logits + 0.5 * L2 * np.sum(theta[:D] ** 2)
    gradients = features * (probabilities - labels)[:, None] + L2 * mask * theta
    hessians = np.einsum("n,np,nq->npq", probabilities * (1 - probabilities), features, features) + L2 * np.diag(mask)
    return losses, gradients, hessians


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, D))
    direction = rng.normal(size=D)
    labels = (rng.random(N) < 1.0 / (1.0 + np.exp(-2.0 * x @ direction))).astype(np.float64)
    features = np.hstack([x, np.ones((N, 1))])
    theta = _newton(features, labels, np.zeros(D + 1))
    influence_model = rm.regularized_logistic_model(theta, L2)
    x32, y32 = x.astype(np.float32), labels.astype(np.float32)[:, None]
    train = tf.data.Dataset.from_tensor_slices((x32, y32)).batch(64)
    second = SecondOrderInfluenceCalculator(influence_model, train, ihvp_calculator=UNDAMPED, show_progress=False)
    first = FirstOrderInfluenceCalculator(influence_model, train, ihvp_calculator=UNDAMPED, show_progress=False)
    x_test = rng.normal(size=(60, D))
    y_test = (rng.random(60) < 1.0 / (1.0 + np.exp(-2.0 * x_test @ direction))).astype(np.float64)
    return {
        "first": first, "second": second, "features": features, "labels": labels, "theta": theta,
        "x": x32, "y": y32, "x_test": x_test, "y_test": y_test,
    }


def _dataset(x, y, batch_size):
    inputs, targets = np.asarray(x, np.float32), np.asarray(y, np.float32).reshape(-1, 1)
    return tf.data.Dataset.from_tensor_slices((inputs, targets)).batch(batch_size)


def _coherent_group(problem, fraction):
    """The fraction·n training points lying furthest on their own class side along feature 0."""
    margin = problem["features"][:, 0] * (2 * problem["labels"] - 1)
    return np.argsort(-margin)[: int(round(fraction * N))]


def test_matches_the_closed_form_of_basu_et_al(problem):
    group, evaluated = np.arange(0, 50, 2), np.arange(120, 131)
    _, gradients, hessians = _per_sample(problem["features"], problem["labels"], problem["theta"])
    hessian = hessians.mean(0)
    p = group.size / N
    summed = gradients[group].sum(0)
    first_term = np.linalg.solve(hessian, summed)
    interaction = np.linalg.solve(hessian, hessians[group].sum(0) @ first_term)
    expected = (1 - 2 * p) / (1 - p) ** 2 * first_term + interaction / ((1 - p) ** 2 * N)
    group_ds = _dataset(problem["x"][group], problem["y"][group], 7)
    vector = problem["second"].compute_influence_vector_group(group_ds).numpy()
    assert vector.shape == (1, D + 1)
    np.testing.assert_allclose(vector[0], expected, rtol=2e-3, atol=1e-3 * np.abs(expected).max())
    value = problem["second"].estimate_influence_values_group(
        group_ds, _dataset(problem["x"][evaluated], problem["y"][evaluated], 4)
    )
    assert value.shape == (1, 1)
    np.testing.assert_allclose(value.numpy()[0, 0], gradients[evaluated].sum(0) @ expected, rtol=2e-3)


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.4])
def test_second_order_is_closer_to_retraining_than_first_order(problem, fraction):
    """Both outputs are n × predicted changes; compare them with n × the actual changes after retraining."""
    group = _coherent_group(problem, fraction)
    keep = np.setdiff1d(np.arange(N), group)
    features, labels, theta = problem["features"], problem["labels"], problem["theta"]
    retrained = _newton(features[keep], labels[keep], theta)
    group_ds = _dataset(problem["x"][group], problem["y"][group], 16)

    actual_parameters = N * (retrained - theta)
    first_vector = problem["first"].compute_influence_vector_group(group_ds).numpy()[0]
    second_vector = problem["second"].compute_influence_vector_group(group_ds).numpy()[0]
    first_error = np.linalg.norm(first_vector - actual_parameters)
    second_error = np.linalg.norm(second_vector - actual_parameters)

    test_features = np.hstack([problem["x_test"], np.ones((len(problem["x_test"]), 1))])
    region = np.argsort(-(test_features[:, 0] * (2 * problem["y_test"] - 1)))[:15]
    for evaluated_features, evaluated_labels in [
        (features[group], labels[group]),
        (test_features[region], problem["y_test"][region]),
    ]:
        evaluated_ds = _dataset(evaluated_features[:, :D], evaluated_labels, 8)
        actual = N * (
            _per_sample(evaluated_features, evaluated_labels, retrained)[0].sum()
            - _per_sample(evaluated_features, evaluated_labels, theta)[0].sum()
        )
        first = float(problem["first"].estimate_influence_values_group(group_ds, evaluated_ds)[0, 0])
        second = float(problem["second"].estimate_influence_values_group(group_ds, evaluated_ds)[0, 0])
        assert actual > 0 and first > 0 and second > 0
        if fraction >= 0.2:
            assert abs(second - actual) < abs(first - actual)
        else:
            np.testing.assert_allclose(second, actual, rtol=0.1)
    if fraction >= 0.2:
        assert second_error < 0.7 * first_error
    else:
        assert second_error < 0.1 * np.linalg.norm(actual_parameters)


def test_singleton_group_is_on_the_first_order_scale(problem):
    group_ds = _dataset(problem["x"][[11]], problem["y"][[11]], 1)
    evaluated_ds = _dataset(problem["x"][20:40], problem["y"][20:40], 8)
    first = float(problem["first"].estimate_influence_values_group(group_ds, evaluated_ds)[0, 0])
    second = float(problem["second"].estimate_influence_values_group(group_ds, evaluated_ds)[0, 0])
    np.testing.assert_allclose(second, first, rtol=0.05)


def test_iterative_ihvp_gives_the_same_answer(problem):
    group = _coherent_group(problem, 0.2)
    group_ds = _dataset(problem["x"][group], problem["y"][group], 16)
    cgd = SecondOrderInfluenceCalculator(
        problem["second"].model, problem["second"].train_set, ihvp_calculator=CGDIHVPFactory(damping=0.0),
        show_progress=False,
    )
    exact = problem["second"].compute_influence_vector_group(group_ds).numpy()
    np.testing.assert_allclose(
        cgd.compute_influence_vector_group(group_ds).numpy(), exact, atol=1e-3 * np.abs(exact).max()
    )


def test_bad_inputs_raise(problem):
    second = problem["second"]
    with pytest.raises(ValueError, match="strict subset"):
        second.compute_influence_vector_group(_dataset(problem["x"], problem["y"], 64))
    with pytest.raises(ValueError, match="unbatched"):
        second.compute_influence_vector_group(tf.data.Dataset.from_tensor_slices((problem["x"], problem["y"])))
    with pytest.raises(TypeError, match="InfluenceModel"):
        SecondOrderInfluenceCalculator(second.model.model, second.train_set)
    with pytest.raises(ValueError, match="n_samples_for_hessian"):
        SecondOrderInfluenceCalculator(second.model, second.train_set, n_samples_for_hessian=0)
