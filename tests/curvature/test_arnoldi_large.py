"""Arnoldi at P ≥ 10⁶ on a positive semi-definite problem: the cut-off must not grow with P.

A Dense 500→2000 layer under mean squared error (P = 1,002,000) on 64 samples: its Hessian is
``M ⊗ I_2000`` with ``M = (2/C)·ÃᵀÃ/n`` (501 × 501, rank 64), so its eigenvalues are those of
``M``, each 2,000 times, and zero — the float64 NumPy ground truth. The old cut-off ``10·P·ε₃₂·max|λ|`` exceeded ``max|λ|``
here: "loss is flat" with δ = 0 and "negative curvature" with δ > 0 on a PSD matrix.
"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.curvature import ArnoldiIHVP
from influence_lib.model import InfluenceModel

N, D, C, M = 64, 500, 2000, 20


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(N, D)) * 0.97 ** np.arange(D)).astype(np.float32)
    y = rng.normal(size=(N, C)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(C)])
    influence_model = InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    augmented = np.concatenate([x, np.ones((N, 1))], axis=1).astype(np.float64)
    small = 2.0 / C * augmented.T @ augmented / N
    return influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(N), np.linalg.eigvalsh(small)[::-1]


@pytest.mark.parametrize("damping, curvature", [(0.0, "hessian"), (1e-2, "auto")])
def test_large_psd_problem_keeps_the_right_eigenpairs(problem, damping, curvature):
    influence_model, dataset, expected = problem
    assert influence_model.nb_params >= 10**6
    arnoldi = ArnoldiIHVP(
        influence_model, dataset, subspace_dim=M, damping=damping, curvature=curvature, show_progress=False
    )
    eigenvalues = arnoldi.eigenvalues.numpy()
    # The random start vector has a component in the null space: one Ritz value is ~0 (rounding noise, ~1e-5·λ_max),
    # dropped only when δ = 0; every other Ritz value is a kept positive eigenvalue.
    assert len(eigenvalues) == (M - 1 if damping == 0 else M)
    assert eigenvalues[: M - 1].min() > 1e-3 * expected[0] and eigenvalues.min() > -1e-4 * expected[0]
    np.testing.assert_allclose(eigenvalues[0], expected[0], rtol=1e-3)
    assert eigenvalues.max() <= expected[0] * (1 + 1e-3)
    # Converged Ritz pairs are eigenpairs of H: each lies next to an eigenvalue of the small equivalent M.
    distance = np.abs(eigenvalues[:5, None] - expected[None, :]).min(axis=1)
    assert distance.max() < 2e-3 * expected[0]
    top = arnoldi.eigenvectors[:1]
    np.testing.assert_allclose(
        arnoldi.ihvp(top).numpy(), top.numpy() / (eigenvalues[0] + damping), atol=1e-3 * np.abs(top).max() / expected[0]
    )
