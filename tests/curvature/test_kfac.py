"""K-FAC / EK-FAC against float64 NumPy: factors, corrected eigenvalues, IHVPs and the Gauss–Newton matrix."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import influence_lib as il

KRON_DAMPING = 1e-3


def _kron_dense(factors) -> np.ndarray:
    """The dense layer curvature ``(Q_A ⊗ Q_S) diag(Λ) (Q_A ⊗ Q_S)ᵀ`` in the (kernel rows, bias row) layout."""
    basis = np.kron(factors.a_eigenvectors, factors.s_eigenvectors)
    return basis @ np.diag(factors.eigenvalues.reshape(-1)) @ basis.T


def _one_output_regression(n=40, d=4, seed=0):
    """Linear Dense(1) under MSE with residuals ±1/√2: δ² = 2 = the output Hessian, so the empirical
    Fisher is exactly the Gauss–Newton (= exact) Hessian ``2·E[ā āᵀ]``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(1)])
    kernel, bias = rng.normal(size=(d, 1)).astype(np.float32), np.array([0.3], np.float32)
    model.layers[0].set_weights([kernel, bias])
    signs = rng.choice([-1.0, 1.0], size=(n, 1))
    y = (x @ kernel + bias + signs / np.sqrt(2.0)).astype(np.float32)
    loss = keras.losses.MeanSquaredError(reduction=None)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    augmented = np.concatenate([x, np.ones((n, 1))], axis=1).astype(np.float64)
    return il.InfluenceModel(model, loss_function=loss), dataset, 2.0 * augmented.T @ augmented / n


def test_kfac_equals_gauss_newton_on_one_output_dense_and_ihvp_equals_numpy():
    model, dataset, gauss_newton = _one_output_regression()
    kfac = il.KFACIHVP(model, dataset, damping=KRON_DAMPING, show_progress=False)
    np.testing.assert_allclose(_kron_dense(kfac.factors[0]), gauss_newton, rtol=1e-4, atol=1e-5)
    vectors = np.random.default_rng(1).normal(size=(3, model.nb_params))
    expected = np.linalg.solve(gauss_newton + KRON_DAMPING * np.eye(model.nb_params), vectors.T).T
    np.testing.assert_allclose(kfac.ihvp(vectors.astype(np.float32)).numpy(), expected, rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(kfac.hvp(expected.astype(np.float32)).numpy(), vectors, rtol=1e-3, atol=1e-4)


def test_kfac_equals_empirical_fisher_with_identical_inputs_per_class():
    """All samples share one input: ``E[g gᵀ] = ā āᵀ ⊗ E[δ δᵀ]`` exactly, for any number of outputs."""
    rng = np.random.default_rng(2)
    n, d, c = 30, 3, 4
    x = np.repeat(rng.normal(size=(1, d)), n, axis=0).astype(np.float32)
    y = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(c, activation="softmax")])
    influence_model = il.InfluenceModel(model)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    kernel, bias = (w.numpy().astype(np.float64) for w in influence_model.weights)
    logits = x @ kernel + bias
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    delta = probabilities - y
    augmented = np.concatenate([x, np.ones((n, 1))], axis=1)
    gradients = np.einsum("ni,no->nio", augmented, delta).reshape(n, -1)
    fisher = gradients.T @ gradients / n
    kfac = il.KFACIHVP(influence_model, dataset, damping=0.01, show_progress=False)
    np.testing.assert_allclose(_kron_dense(kfac.factors[0]), fisher, atol=1e-6)
    expected = np.linalg.solve(fisher + 0.01 * np.eye(len(fisher)), gradients[:4].T).T
    np.testing.assert_allclose(kfac.ihvp(gradients[:4].astype(np.float32)).numpy(), expected, rtol=2e-3, atol=2e-4)


def test_true_fisher_matches_gauss_newton_of_mse_in_expectation_and_is_seeded():
    """Labels sampled from N(f, d/2): E[δ δᵀ] is the MSE output Hessian (2/d)·I."""
    rng = np.random.default_rng(3)
    n, d, c = 50, 3, 2
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = rng.normal(size=(n, c)).astype(np.float32)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(c)])
    influence_model = il.InfluenceModel(model, loss_function=keras.losses.MeanSquaredError(reduction=None))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).repeat(40).batch(100)
    fit = lambda seed: il.KFACIHVP(influence_model, dataset, fisher="true", seed=seed, show_progress=False)
    first, again, other = fit(0), fit(0), fit(1)
    np.testing.assert_allclose(first.factors[0].s_covariance, (2.0 / c) * np.eye(c), atol=0.05)
    np.testing.assert_array_equal(first.factors[0].s_covariance, again.factors[0].s_covariance)
    assert not np.array_equal(first.factors[0].s_covariance, other.factors[0].s_covariance)
    empirical = il.KFACIHVP(influence_model, dataset, show_progress=False)
    assert np.abs(empirical.factors[0].s_covariance - (2.0 / c) * np.eye(c)).max() > 0.1


def _mlp(seed=0, n=24, d=4, h=5, c=3):
    rng = np.random.default_rng(seed)
    model = keras.Sequential([
        keras.Input((d,)), keras.layers.Dense(h, activation="tanh"), keras.layers.Dense(c, activation="softmax")
    ])
    model.set_weights([rng.normal(scale=0.8, size=w.shape).astype(np.float32) for w in model.get_weights()])
    x = rng.normal(size=(n, d)).astype(np.float32)
    return model, x, [w.astype(np.float64) for w in model.get_weights()]


def _mlp_forward(x, weights):
    w1, b1, w2, b2 = weights
    hidden = np.tanh(x @ w1 + b1)
    logits = hidden @ w2 + b2
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    return hidden, probabilities / probabilities.sum(1, keepdims=True)


def _augment(a):
    return np.concatenate([a, np.ones((len(a), 1))], axis=1)


def test_ekfac_corrected_eigenvalues_equal_numpy_from_per_sample_gradients():
    model, x, weights = _mlp()
    rng = np.random.default_rng(4)
    y = np.eye(3, dtype=np.float32)[rng.integers(0, 3, len(x))]
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=1)
    ekfac = il.EKFACIHVP(influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(10), show_progress=False)
    hidden, probabilities = _mlp_forward(x.astype(np.float64), weights)
    delta2 = probabilities - y
    delta1 = (delta2 @ weights[2].T) * (1 - hidden**2)
    for factors, inputs, delta in zip(ekfac.factors, [_augment(x), _augment(hidden)], [delta1, delta2]):
        a, s = inputs.T @ inputs / len(x), delta.T @ delta / len(x)
        np.testing.assert_allclose(factors.a_covariance, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(factors.s_covariance, s, rtol=1e-5, atol=1e-7)
        q_a, q_s = np.linalg.eigh(a)[1], np.linalg.eigh(s)[1]
        gradients = np.einsum("ni,no->nio", inputs, delta)
        expected = np.mean(np.einsum("ia,nio,os->nas", q_a, gradients, q_s) ** 2, axis=0)
        np.testing.assert_allclose(factors.eigenvalues, expected, rtol=1e-3, atol=1e-6 * expected.max())


def _mlp_jacobian(x, weights):
    """Per-sample jacobian of the logits w.r.t. [W1, b1, W2, b2] (row-major), shape (n, c, P)."""
    w1, _, w2, _ = weights
    hidden, _ = _mlp_forward(x, weights)
    n, (d, h), c = len(x), w1.shape, w2.shape[1]
    slope = 1 - hidden**2
    d_w1 = np.einsum("ni,nj,jc->ncij", x, slope, w2).reshape(n, c, -1)
    d_b1 = np.einsum("nj,jc->ncj", slope, w2)
    d_w2 = np.einsum("nj,ck->nckj", hidden, np.eye(c)).transpose(0, 1, 3, 2).reshape(n, c, -1)
    d_b2 = np.broadcast_to(np.eye(c), (n, c, c))
    return np.concatenate([d_w1, d_b1, d_w2, d_b2], axis=2)


def test_ekfac_damped_ihvp_is_closer_to_exact_gauss_newton_inverse_than_kfac():
    """Each input appears once per class with weight √p_c: the dataset's empirical Fisher is exactly
    ``GN / C`` (``GN = E_x[Jᵀ (diag p − p pᵀ) J]``), the reference both methods approximate."""
    model, x, weights = _mlp(seed=5, n=40)
    n, c = len(x), 3
    _, probabilities = _mlp_forward(x.astype(np.float64), weights)
    inputs = np.repeat(x, c, axis=0)
    targets = np.tile(np.eye(c, dtype=np.float32), (n, 1))
    sample_weight = np.sqrt(probabilities.reshape(-1)).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, targets, sample_weight)).batch(30)
    jacobian = _mlp_jacobian(x.astype(np.float64), weights)
    output_hessian = np.einsum("nc,ck->nck", probabilities, np.eye(c)) - np.einsum("nc,nk->nck", probabilities, probabilities)
    gauss_newton = np.einsum("ncp,nck,nkq->pq", jacobian, output_hessian, jacobian) / n / c
    influence_model = il.InfluenceModel(model, start_layer=0, last_layer=1)
    damping = 1e-2
    vectors = np.random.default_rng(6).normal(size=(5, influence_model.nb_params))
    exact = np.linalg.solve(gauss_newton + damping * np.eye(len(gauss_newton)), vectors.T).T
    errors = {}
    for kind in (il.KFACIHVP, il.EKFACIHVP):
        ihvp = kind(influence_model, dataset, damping=damping, show_progress=False)
        approx = ihvp.ihvp(vectors.astype(np.float32)).numpy()
        errors[kind.__name__] = np.linalg.norm(approx - exact) / np.linalg.norm(exact)
    assert errors["EKFACIHVP"] < errors["KFACIHVP"] < 1.0, errors


def _numpy_patches(x, kernel_size, stride, padding):
    """(n, positions, k_h·k_w·c_in) patches of a channels_last image batch."""
    if padding == "same":
        x = np.pad(x, [(0, 0), (1, 1), (1, 1), (0, 0)])
    n, rows, columns, _ = x.shape
    out_rows, out_columns = (rows - kernel_size) // stride + 1, (columns - kernel_size) // stride + 1
    patches = [
        x[:, r * stride : r * stride + kernel_size, s * stride : s * stride + kernel_size, :].reshape(n, -1)
        for r in range(out_rows)
        for s in range(out_columns)
    ]
    return np.stack(patches, axis=1)


@pytest.mark.parametrize("stride,padding", [(1, "same"), (2, "valid")])
def test_conv_factors_and_corrected_eigenvalues_equal_numpy_patches(stride, padding):
    rng = np.random.default_rng(7)
    n, c_in, c_out, classes = 12, 2, 3, 3
    x = rng.normal(size=(n, 5, 5, c_in)).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]
    model = keras.Sequential([
        keras.Input((5, 5, c_in)),
        keras.layers.Conv2D(c_out, 3, strides=stride, padding=padding),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(classes, activation="softmax"),
    ])
    influence_model = il.InfluenceModel(model, start_layer=0)
    ekfac = il.EKFACIHVP(influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(5), show_progress=False)
    kernel, bias, dense_kernel, dense_bias = (w.astype(np.float64) for w in model.get_weights())
    patches = _numpy_patches(x.astype(np.float64), 3, stride, padding)
    positions = patches.shape[1]
    outputs = patches @ kernel.reshape(-1, c_out) + bias
    logits = outputs.mean(axis=1) @ dense_kernel + dense_bias
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    delta = np.repeat(((probabilities - y) @ dense_kernel.T)[:, None] / positions, positions, axis=1)
    inputs = np.concatenate([patches, np.ones((n, positions, 1))], axis=2)
    a = np.einsum("nti,ntj->ij", inputs, inputs) / n
    s = np.einsum("nto,ntp->op", delta, delta) / n / positions
    factors = ekfac.factors[0]
    np.testing.assert_allclose(factors.a_covariance, a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(factors.s_covariance, s, rtol=1e-4, atol=1e-9)
    gradients = np.einsum("nti,nto->nio", inputs, delta)
    q_a, q_s = factors.a_eigenvectors, factors.s_eigenvectors
    expected = np.mean(np.einsum("ia,nio,os->nas", q_a, gradients, q_s) ** 2, axis=0)
    np.testing.assert_allclose(factors.eigenvalues, expected, rtol=1e-3, atol=1e-6 * expected.max())
    library_gradients = influence_model.batch_jacobian_tensor((x, y)).numpy()
    np.testing.assert_allclose(library_gradients, gradients.reshape(n, -1), rtol=1e-4, atol=1e-6)


def test_embedding_diagonal_factor_and_corrected_eigenvalues_equal_numpy():
    rng = np.random.default_rng(8)
    n, steps, vocabulary, dim = 10, 4, 6, 3
    ids = rng.integers(0, vocabulary, size=(n, steps)).astype(np.int32)
    y = rng.normal(size=(n, 1)).astype(np.float32)
    model = keras.Sequential([
        keras.Input((steps,), dtype="int32"),
        keras.layers.Embedding(vocabulary, dim),
        keras.layers.Flatten(),
        keras.layers.Dense(1),
    ])
    influence_model = il.InfluenceModel(model, start_layer=0, loss_function=keras.losses.MeanSquaredError(reduction=None))
    ekfac = il.EKFACIHVP(influence_model, tf.data.Dataset.from_tensor_slices((ids, y)).batch(4), show_progress=False)
    table, kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    prediction = table[ids].reshape(n, -1) @ kernel + bias
    delta = (2 * (prediction - y) * kernel[:, 0].reshape(1, steps, dim).transpose(1, 0, 2)).transpose(1, 0, 2)
    counts = np.stack([np.bincount(row, minlength=vocabulary) for row in ids]).mean(axis=0)
    factors = ekfac.factors[0]
    np.testing.assert_allclose(factors.a_covariance, counts, rtol=1e-6)
    np.testing.assert_allclose(factors.s_covariance, np.einsum("nto,ntp->op", delta, delta) / n / steps, rtol=1e-4)
    gradients = np.zeros((n, vocabulary, dim))
    for sample in range(n):
        np.add.at(gradients[sample], ids[sample], delta[sample])
    expected = np.mean(np.einsum("nvo,os->nvs", gradients, factors.s_eigenvectors) ** 2, axis=0)
    np.testing.assert_allclose(factors.eigenvalues, expected, rtol=1e-3, atol=1e-6 * expected.max())


def test_einsum_dense_matmul_has_the_factors_of_the_equivalent_dense_layer():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(8, 3, 4)).astype(np.float32)
    y = rng.normal(size=(8, 3, 2)).astype(np.float32)
    einsum = keras.Sequential([keras.Input((3, 4)), keras.layers.EinsumDense("abc,cd->abd", (3, 2), bias_axes="d")])
    dense = keras.Sequential([keras.Input((3, 4)), keras.layers.Dense(2)])
    dense.set_weights(einsum.get_weights())
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    loss = keras.losses.MeanSquaredError(reduction=None)
    fits = [
        il.EKFACIHVP(il.InfluenceModel(m, loss_function=loss), dataset, show_progress=False).factors[0]
        for m in (einsum, dense)
    ]
    for name in ("a_covariance", "s_covariance", "eigenvalues"):
        np.testing.assert_allclose(getattr(fits[0], name), getattr(fits[1], name), rtol=1e-5, atol=1e-7)


def test_first_order_calculator_accepts_kfac_names_and_matches_exact_where_kfac_is_exact():
    model, dataset, _ = _one_output_regression()
    exact = il.FirstOrderInfluenceCalculator(
        model, dataset, il.ExactIHVP(model, dataset, damping=KRON_DAMPING, show_progress=False), show_progress=False
    )
    kfac = il.FirstOrderInfluenceCalculator(
        model, dataset, il.KFACIHVPFactory(damping=KRON_DAMPING, show_progress=False), show_progress=False
    )
    np.testing.assert_allclose(
        il.extract_only_values(kfac.compute_influence_values(dataset)).numpy(),
        il.extract_only_values(exact.compute_influence_values(dataset)).numpy(),
        rtol=2e-3,
    )
    by_name = il.FirstOrderInfluenceCalculator(model, dataset, "ekfac", show_progress=False)
    assert isinstance(by_name.ihvp_calculator, il.EKFACIHVP) and by_name.ihvp_calculator.damping == "heuristic"


def test_heuristic_damping_is_a_tenth_of_the_mean_eigenvalue():
    model, dataset, _ = _one_output_regression()
    kfac = il.KFACIHVP(model, dataset, show_progress=False)
    assert kfac.layer_damping[0] == pytest.approx(0.1 * kfac.factors[0].eigenvalues.mean())


def test_bad_settings_and_unsupported_layers_raise_clear_errors():
    model, dataset, _ = _one_output_regression()
    with pytest.raises(ValueError, match="damping must be a number ≥ 0 or 'heuristic'"):
        il.KFACIHVP(model, dataset, damping="auto")
    with pytest.raises(ValueError, match="damping must be a finite number ≥ 0"):
        il.KFACIHVP(model, dataset, damping=-1.0)
    with pytest.raises(ValueError, match="fisher must be one of"):
        il.KFACIHVP(model, dataset, fisher="exact")
    absolute = il.InfluenceModel(model.model, loss_function=keras.losses.MeanAbsoluteError(reduction=None))
    with pytest.raises(ValueError, match="fisher='true'.*MeanAbsoluteError.*fisher='empirical'"):
        il.KFACIHVP(absolute, dataset, fisher="true")
    normalized = keras.Sequential([keras.Input((4,)), keras.layers.LayerNormalization(), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="cannot factor the watched layer .*LayerNormalization"):
        il.KFACIHVP(il.InfluenceModel(normalized, start_layer=0, last_layer=1, loss_function=absolute.loss_function), dataset)
    with pytest.raises(ValueError, match="Unknown IHVP calculator.*'ekfac'"):
        il.IHVPCalculator.from_string("kfac2")


def _mlp_fit_setup():
    model, x, _ = _mlp(seed=10)
    y = np.eye(3, dtype=np.float32)[np.random.default_rng(10).integers(0, 3, len(x))]
    return il.InfluenceModel(model, start_layer=0, last_layer=1), tf.data.Dataset.from_tensor_slices((x, y)).batch(10), x, y


def test_saved_and_reloaded_factors_give_identical_scores_without_a_data_pass(tmp_path, monkeypatch):
    influence_model, dataset, x, y = _mlp_fit_setup()
    path = str(tmp_path / "factors")
    fitted = il.EKFACIHVP(influence_model, dataset, factors_path=path, show_progress=False)
    gradients = influence_model.batch_jacobian_tensor((x, y))
    expected = fitted.ihvp(gradients).numpy()

    def no_data_pass(*_):
        raise AssertionError("the factors should have been read back")

    monkeypatch.setattr(il.EKFACIHVP, "fit_covariances", no_data_pass)
    monkeypatch.setattr(il.EKFACIHVP, "fit_eigenvalues", no_data_pass)
    reloaded = il.EKFACIHVP(influence_model, dataset, factors_path=path, show_progress=False)
    np.testing.assert_array_equal(reloaded.ihvp(gradients).numpy(), expected)
    for mine, theirs in zip(reloaded.factors, fitted.factors):
        np.testing.assert_array_equal(mine.eigenvalues, theirs.eigenvalues)


def test_interrupted_fit_resumes_from_the_stored_first_pass(tmp_path, monkeypatch):
    influence_model, dataset, x, y = _mlp_fit_setup()
    uninterrupted = il.EKFACIHVP(influence_model, dataset, show_progress=False)
    path = str(tmp_path / "factors")
    original = il.EKFACIHVP.fit_eigenvalues

    def killed(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(il.EKFACIHVP, "fit_eigenvalues", killed)
    with pytest.raises(KeyboardInterrupt):
        il.EKFACIHVP(influence_model, dataset, factors_path=path, show_progress=False)
    monkeypatch.setattr(il.EKFACIHVP, "fit_eigenvalues", original)
    monkeypatch.setattr(il.EKFACIHVP, "fit_covariances", killed)
    resumed = il.EKFACIHVP(influence_model, dataset, factors_path=path, show_progress=False)
    for mine, theirs in zip(resumed.factors, uninterrupted.factors):
        np.testing.assert_allclose(mine.eigenvalues, theirs.eigenvalues, rtol=1e-12)


def test_factors_of_another_model_or_setting_are_refused(tmp_path):
    influence_model, dataset, _, _ = _mlp_fit_setup()
    path = str(tmp_path / "factors")
    il.KFACIHVP(influence_model, dataset, factors_path=path, show_progress=False)
    with pytest.raises(ValueError, match="different setup.*settings"):
        il.EKFACIHVP(influence_model, dataset, factors_path=path, show_progress=False)
    weights = influence_model.model.get_weights()
    influence_model.model.set_weights([w + 1.0 for w in weights])
    try:
        with pytest.raises(ValueError, match="different setup.*model_weights"):
            il.KFACIHVP(influence_model, dataset, factors_path=path, show_progress=False)
        refit = il.KFACIHVP(influence_model, dataset, factors_path=path, overwrite=True, show_progress=False)
        direct = il.KFACIHVP(influence_model, dataset, show_progress=False)
        np.testing.assert_allclose(refit.factors[0].a_covariance, direct.factors[0].a_covariance)
    finally:
        influence_model.model.set_weights(weights)


def test_watching_only_the_kernel_drops_the_bias_row():
    """``weights_to_watch=[kernel]``: ``ā`` has no appended 1 and EK-FAC's Λ matches NumPy on the kernel gradients."""
    rng = np.random.default_rng(11)
    n, d, c = 24, 3, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = np.eye(c, dtype=np.float32)[rng.integers(0, c, n)]
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(c, activation="softmax")])
    influence_model = il.InfluenceModel(model, weights_to_watch=[model.layers[0].kernel])
    ekfac = il.EKFACIHVP(influence_model, tf.data.Dataset.from_tensor_slices((x, y)).batch(8), damping=0.01,
                         show_progress=False)
    kernel, bias = (w.astype(np.float64) for w in model.get_weights())
    logits = x @ kernel + bias
    delta = np.exp(logits) / np.exp(logits).sum(1, keepdims=True) - y
    factors = ekfac.factors[0]
    np.testing.assert_allclose(factors.a_covariance, x.T.astype(np.float64) @ x / n, rtol=1e-5)
    gradients = np.einsum("ni,no->nio", x, delta)
    expected = np.mean(np.einsum("ia,nio,os->nas", factors.a_eigenvectors, gradients, factors.s_eigenvectors) ** 2, 0)
    np.testing.assert_allclose(factors.eigenvalues, expected, rtol=1e-3, atol=1e-6 * expected.max())
    vectors = gradients[:3].reshape(3, -1).astype(np.float32)
    np.testing.assert_allclose(ekfac.hvp(ekfac.ihvp(vectors)).numpy(), vectors, rtol=1e-3, atol=1e-5)
