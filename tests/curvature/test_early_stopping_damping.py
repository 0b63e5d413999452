"""``early_stopping_damping``: the ridge that a finite run of (heavy-ball) gradient descent acts as.

Ground truth: gradient descent run in float64 NumPy on a least-squares problem with a spread
spectrum, against the ridge solutions ``(H + λI)⁻¹ b`` over a fine grid of ``λ``.
"""
import numpy as np
import pytest

import influence_lib as il


def _least_squares(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(200, 30)) * np.logspace(0, -2, 30)
    y = x @ rng.normal(size=30) + 0.1 * rng.normal(size=200)
    return x.T @ x / 200, x.T @ y / 200


def _gradient_descent(hessian, target, learning_rate, steps, momentum):
    """Keras' SGD (``v ← βv − ηg``, ``θ ← θ + v``) from zero on ``½θᵀHθ − bᵀθ``."""
    theta, velocity = np.zeros(len(target)), np.zeros(len(target))
    for _ in range(steps):
        velocity = momentum * velocity - learning_rate * (hessian @ theta - target)
        theta = theta + velocity
    return theta


@pytest.mark.parametrize("learning_rate, steps, momentum", [(0.1, 50, 0.0), (0.1, 500, 0.0), (0.02, 200, 0.9)])
def test_early_stopping_damping_is_the_ridge_closest_to_gradient_descent(learning_rate, steps, momentum):
    hessian, target = _least_squares()
    stopped = _gradient_descent(hessian, target, learning_rate, steps, momentum)
    grid = np.logspace(-6, 1, 300)
    distances = [np.linalg.norm(stopped - np.linalg.solve(hessian + value * np.eye(30), target)) for value in grid]
    closest = grid[int(np.argmin(distances))]
    damping = il.early_stopping_damping(learning_rate, steps, momentum)
    assert damping == pytest.approx((1 - momentum) / (learning_rate * steps))
    assert 0.5 < closest / damping < 2.0
    converged = np.linalg.solve(hessian, target)
    assert np.linalg.norm(stopped - converged) > 10 * min(distances)  # the stopped run is not the minimum


def test_early_stopping_damping_rejects_bad_arguments():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        il.early_stopping_damping(0.01, 0)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        il.early_stopping_damping(0.01, 12.5)
    with pytest.raises(ValueError, match="learning_rate must be a finite number > 0"):
        il.early_stopping_damping(-1.0, 10)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        il.early_stopping_damping(0.01, 10, momentum=1.0)
    with pytest.raises(TypeError, match="learning_rate must be a real number, got str"):
        il.early_stopping_damping("0.01", 10)
