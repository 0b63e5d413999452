"""Random projections of gradients: JL bound, reproducibility, structured = Kronecker projection,
and the inner-product statistics of the structured and dense projections against their theory."""
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from influence_lib.model.influence_model import InfluenceModel
from influence_lib.model.projection import (
    CHUNK_ROWS,
    GradientProjector,
    Projection,
    dense_matrix,
    project_dense,
)


def _jl_epsilon(k: int, nb_vectors: int, failure: float) -> float:
    """Smallest ε with 2 n² · 2 exp(−k(ε²/2 − ε³/3)/2) ≤ failure: every ‖R(x ± y)‖² within (1 ± ε)
    (Dasgupta & Gupta 2003; Achlioptas 2003 for ±1 entries), hence |⟨Rx, Ry⟩ − ⟨x, y⟩| ≤ ε for unit
    x, y."""
    for epsilon in np.linspace(0.001, 0.999, 999):
        if 4 * nb_vectors**2 * math.exp(-k * (epsilon**2 / 2 - epsilon**3 / 3) / 2) <= failure:
            return float(epsilon)
    raise AssertionError("no ε found")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_dense_projection_preserves_inner_products_within_the_jl_bound(kind):
    rng = np.random.default_rng(0)
    rows, k, n = 2 * CHUNK_ROWS + 301, 1024, 16  # two full chunks and a tail
    vectors = rng.normal(size=(n, rows))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    projected = project_dense(tf.constant(vectors, tf.float32), Projection(k, seed=5, kind=kind, structured=False))
    errors = projected.numpy().astype(np.float64) @ projected.numpy().T - vectors @ vectors.T
    assert np.abs(errors).max() <= _jl_epsilon(k, n, 1e-3)
    # and the spread is that of a variance-1/k estimate (nearly orthogonal unit vectors): a wrong scale fails
    off_diagonal = errors[~np.eye(n, dtype=bool)]
    assert 0.6 / k < np.mean(off_diagonal**2) < 1.5 / k


def test_projection_is_reproducible_from_its_seed_and_independent_of_the_chunking():
    gradients = tf.constant(np.random.default_rng(1).normal(size=(3, CHUNK_ROWS + 77)), tf.float32)
    projection = Projection(32, seed=7, structured=False)
    eager = project_dense(gradients, projection).numpy()
    compiled = tf.function(lambda g: project_dense(g, projection))(gradients).numpy()
    materialized = gradients.numpy() @ dense_matrix(projection, 0, CHUNK_ROWS + 77).numpy()
    np.testing.assert_allclose(eager, compiled, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(eager, materialized, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(project_dense(gradients, projection).numpy(), eager)
    assert not np.allclose(project_dense(gradients, projection.with_seed(8)).numpy(), eager)
    matrix = dense_matrix(Projection(16, kind="rademacher", structured=False), 0, 50).numpy()
    np.testing.assert_allclose(np.abs(matrix), 0.25)  # ±1/√k


def test_projection_settings_are_checked():
    with pytest.raises(ValueError, match="positive integer"):
        Projection(0)
    with pytest.raises(ValueError, match="kind"):
        Projection(16, kind="sparse")
    with pytest.raises(ValueError, match="seed"):
        Projection(16, seed=-1)
    with pytest.raises(TypeError, match="InfluenceModel"):
        GradientProjector(keras.Sequential([keras.layers.Dense(2)]), Projection(4))


def _models():
    sequence = keras.Sequential([
        keras.Input((3, 5)), keras.layers.Dense(4, activation="tanh"), keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    conv2d = keras.Sequential([
        keras.Input((7, 7, 2)), keras.layers.Conv2D(3, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Conv2D(2, 2, dilation_rate=2, use_bias=False), keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    conv1d = keras.Sequential([
        keras.Input((9, 2)), keras.layers.Conv1D(3, 3, padding="causal", activation="relu"), keras.layers.Flatten(),
        keras.layers.Dense(3, activation="softmax"),
    ])
    return {"sequence": sequence, "conv2d": conv2d, "conv1d": conv1d}


@pytest.mark.parametrize("name", ["sequence", "conv2d", "conv1d"])
@pytest.mark.parametrize("structured", [True, False])
def test_projected_gradients_equal_the_materialized_gradients_times_the_projection_matrix(name, structured):
    model = _models()[name]
    inputs = np.random.normal(size=(6, *model.inputs[0].shape[1:])).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[np.random.randint(3, size=6)]
    wrapped = InfluenceModel(model, start_layer=0, last_layer=len(model.layers) - 1)
    projector = GradientProjector(wrapped, Projection(16, seed=3, structured=structured))
    projected = projector.project_tensor((inputs, targets)).numpy()
    expected = 0.0
    for index, block in enumerate(wrapped.batch_jacobian_blocks((inputs, targets))):
        matrix = projector.layer_matrix(index).numpy()
        if structured:
            input_factor, output_factor, offset = projector.factors(index)
            kron = np.kron(input_factor.numpy(), output_factor.numpy())
            np.testing.assert_array_equal(np.roll(matrix, -offset, axis=1)[:, : kron.shape[1]], kron)
        else:
            np.testing.assert_array_equal(matrix, dense_matrix(projector.projection, index, block.shape[1]).numpy())
        expected = expected + block.numpy().astype(np.float64) @ matrix
    np.testing.assert_allclose(projected, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_jacobian_fallback_uses_the_dense_projection():
    model = _models()["sequence"]
    inputs = np.random.normal(size=(4, 3, 5)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    wrapped = InfluenceModel(model, start_layer=0, last_layer=2, per_sample_gradients="jacobian")
    projection = Projection(16, seed=2)
    projected = GradientProjector(wrapped, projection).project_tensor((inputs, targets)).numpy()
    expected = sum(
        block.numpy() @ dense_matrix(projection, index, block.shape[1]).numpy()
        for index, block in enumerate(wrapped.batch_jacobian_blocks((inputs, targets)))
    )
    np.testing.assert_allclose(projected, expected, rtol=1e-4, atol=1e-5)


def test_structured_and_dense_projections_of_a_dense_layer_have_the_inner_product_statistics_of_their_theory():
    """Both estimators of ⟨g, g'⟩ are unbiased; the dense one has the Gaussian JL variance
    (⟨g,g'⟩² + ‖g‖²‖g'‖²)/k, the structured one that of a product of two independent such
    estimates of ⟨ã, ã'⟩ (k_a) and ⟨δ, δ'⟩ (k_δ)."""
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(10, activation="softmax")])
    inputs = np.random.normal(size=(2, 20)).astype(np.float32)
    targets = np.eye(10, dtype=np.float32)[[1, 4]]
    wrapped = InfluenceModel(model)
    gradients = wrapped.batch_jacobian_tensor((inputs, targets)).numpy().astype(np.float64)
    augmented = np.concatenate([inputs, np.ones((2, 1))], axis=1).astype(np.float64)
    delta = gradients[:, -10:]  # ∂ℓ/∂b = δ
    k, seeds = 64, 500
    true = gradients[0] @ gradients[1]
    dense, structured = [], []
    for seed in range(seeds):
        projection = Projection(k, seed=seed, kind="gaussian")
        matrix = dense_matrix(projection, 0, gradients.shape[1]).numpy()
        dense.append((gradients[0] @ matrix) @ (gradients[1] @ matrix))
        input_factor, output_factor, _ = GradientProjector(wrapped, projection).factors(0)
        k_a, k_out = input_factor.shape[1], output_factor.shape[1]
        kron = np.kron(input_factor.numpy(), output_factor.numpy())
        structured.append((gradients[0] @ kron) @ (gradients[1] @ kron))
    dense, structured = np.array(dense), np.array(structured)

    def moments(x, y, dims):
        mean = x @ y
        return mean, (mean**2 + (x @ x) * (y @ y)) / dims

    mean_a, var_a = moments(augmented[0], augmented[1], k_a)
    mean_d, var_d = moments(delta[0], delta[1], k_out)
    np.testing.assert_allclose(mean_a * mean_d, true, rtol=1e-4)
    theory_structured = (var_a + mean_a**2) * (var_d + mean_d**2) - (mean_a * mean_d) ** 2
    theory_dense = moments(gradients[0], gradients[1], k)[1]
    for values, theory in ((dense, theory_dense), (structured, theory_structured)):
        assert abs(values.mean() - true) < 4 * math.sqrt(theory / seeds)
        assert 0.7 * theory < values.var() < 1.3 * theory
    assert (k_a, k_out) == (8, 8)  # 21 × 10 inputs: both sides compressed
    assert theory_structured > theory_dense


def test_small_layers_are_embedded_exactly_and_the_structured_projection_is_then_an_isometry():
    """Layers whose sizes add up to at most k keep every inner product exactly (signed coordinates)."""
    model = keras.Sequential([
        keras.Input((6,)), keras.layers.Dense(5, activation="tanh"), keras.layers.Dense(3, activation="softmax"),
    ])
    wrapped = InfluenceModel(model, start_layer=0, last_layer=1)
    inputs = np.random.normal(size=(7, 6)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[np.random.randint(3, size=7)]
    gradients = wrapped.batch_jacobian_tensor((inputs, targets)).numpy()  # 35 + 18 = 53 parameters
    projected = GradientProjector(wrapped, Projection(64, seed=1)).project_tensor((inputs, targets)).numpy()
    np.testing.assert_allclose(projected @ projected.T, gradients @ gradients.T, rtol=1e-4, atol=1e-6)
    # a last layer of 10 classes: δ kept exact, only the input side compressed
    head = keras.Sequential([keras.Input((300,)), keras.layers.Dense(10, activation="softmax")])
    input_factor, output_factor, _ = GradientProjector(InfluenceModel(head), Projection(1024)).factors(0)
    assert input_factor.shape == (301, 102) and output_factor.shape == (10, 10)
    np.testing.assert_array_equal(np.abs(output_factor.numpy()), np.eye(10))
