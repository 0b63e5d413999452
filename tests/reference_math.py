"""Independent float64 NumPy references for the tests: closed-form gradients and Hessians of tiny models.

Flattening order matches InfluenceModel: each watched weight row-major, in layer order (kernel, bias).
"""
import keras
import numpy as np
import tensorflow as tf


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax_regression(n: int = 64, d: int = 4, c: int = 3, seed: int = 0, batch_size: int = 16):
    """A trained-ish Dense(c, softmax) on random inputs: model, dataset, x, y (one-hot)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    labels = rng.integers(0, c, size=n)
    y = np.eye(c, dtype=np.float32)[labels]
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(c, activation="softmax")])
    model.layers[-1].set_weights(
        [rng.normal(scale=0.5, size=(d, c)).astype(np.float32), rng.normal(scale=0.1, size=c).astype(np.float32)]
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return model, dataset, x, y


def softmax_gradients(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-sample gradients of cross-entropy w.r.t. [kernel (d, c) row-major, bias (c)], shape (n, d·c + c)."""
    x = x.astype(np.float64)
    delta = softmax(x @ kernel + bias) - y
    kernel_grads = np.einsum("nd,nc->ndc", x, delta).reshape(len(x), -1)
    return np.concatenate([kernel_grads, delta], axis=1)


def softmax_hessian(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Mean Hessian of cross-entropy w.r.t. [kernel, bias]: mean of (ã ãᵀ) ⊗ (diag p − p pᵀ), ã = [a; 1]."""
    x = x.astype(np.float64)
    p = softmax(x @ kernel + bias)
    d, c = kernel.shape
    hessian = np.zeros((d * c + c, d * c + c))
    for features, probs in zip(x, p):
        curvature = np.diag(probs) - np.outer(probs, probs)
        kernel_block = np.kron(np.outer(features, features), curvature)
        cross = np.kron(features[:, None], curvature)
        hessian[: d * c, : d * c] += kernel_block
        hessian[: d * c, d * c :] += cross
        hessian[d * c :, : d * c] += cross.T
        hessian[d * c :, d * c :] += curvature
    return hessian / len(x)


def pseudo_inverse(matrix: np.ndarray) -> np.ndarray:
    return np.linalg.pinv(matrix, rcond=1e-8, hermitian=True)


def linear_regression(n: int = 48, d: int = 5, outputs: int = 2, seed: int = 0, batch_size: int = 16):
    """Dense(outputs) with per-sample mean squared error: its Hessian is (2/outputs)·(ã ãᵀ) ⊗ I, positive definite."""
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) * np.linspace(0.5, 2.0, d)).astype(np.float32)
    y = rng.normal(size=(n, outputs)).astype(np.float32)
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(outputs)])
    model.layers[-1].set_weights(
        [rng.normal(size=(d, outputs)).astype(np.float32), rng.normal(size=outputs).astype(np.float32)]
    )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
    return model, dataset, x, y


def mse_gradients(x: np.ndarray, y: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-sample gradients of mean((x W + b − y)²) w.r.t. [kernel, bias]."""
    x = x.astype(np.float64)
    outputs = kernel.shape[1]
    residual = 2.0 / outputs * (x @ kernel + bias - y)
    kernel_grads = np.einsum("nd,no->ndo", x, residual).reshape(len(x), -1)
    return np.concatenate([kernel_grads, residual], axis=1)


def mse_hessian(x: np.ndarray, outputs: int) -> np.ndarray:
    """Mean Hessian of mean squared error for a Dense layer: (2/outputs) · mean(ã ãᵀ) ⊗ I, in [kernel, bias] order."""
    x = x.astype(np.float64)
    n, d = x.shape
    augmented = np.concatenate([x, np.ones((n, 1))], axis=1)
    return np.kron(augmented.T @ augmented / n, np.eye(outputs)) * 2.0 / outputs


def regularized_softmax_hessian_and_gradients(x, y, kernel, bias, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Mean Hessian (P, P) and per-sample gradients (n, P) of cross-entropy + (l2/2)‖θ‖², θ = [kernel, bias]."""
    kernel, bias = kernel.astype(np.float64), bias.astype(np.float64)
    theta = np.concatenate([kernel.reshape(-1), bias])
    hessian = softmax_hessian(x, kernel, bias) + l2 * np.eye(theta.size)
    return hessian, softmax_gradients(x, y, kernel, bias) + l2 * theta


SPREAD_FEATURE_SCALES = np.array([0.05, 0.2, 0.5, 1.0, 2.0, 5.0])


def spread_softmax_problem(n: int, l2: float, classes: int = 3, seed: int = 0):
    """L2-regularized softmax regression whose Hessian spectrum is widely spread (feature scales 0.05…5).

    Returns an InfluenceModel (loss = cross-entropy + (l2/2)‖θ‖²), inputs and one-hot labels.
    """
    from influence_lib import InfluenceModel

    scales = SPREAD_FEATURE_SCALES
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, scales.size)) * scales).astype(np.float32)
    y = np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)]
    model = keras.Sequential([keras.Input((scales.size,)), keras.layers.Dense(classes, activation="softmax")])
    model.layers[-1].kernel.assign(rng.normal(scale=0.3, size=(scales.size, classes)).astype(np.float32))
    model.layers[-1].bias.assign(rng.normal(scale=0.3, size=classes).astype(np.float32))
    cross_entropy = keras.losses.CategoricalCrossentropy(reduction=None)
    kernel, bias = model.layers[-1].kernel.value, model.layers[-1].bias.value

    def loss(y_true, y_pred):
        return cross_entropy(y_true, y_pred) + 0.5 * l2 * (tf.reduce_sum(kernel**2) + tf.reduce_sum(bias**2))

    return InfluenceModel(model, loss_function=loss), x, y


def regularized_logistic_model(theta: np.ndarray, l2: float):
    """InfluenceModel of a sigmoid Dense(1) with weights ``theta = [kernel, bias]`` and loss
    BCE + (l2/2)‖kernel‖² (the regularizer is part of each per-sample term)."""
    from influence_lib import InfluenceModel

    dim = theta.size - 1
    model = keras.Sequential([keras.Input((dim,)), keras.layers.Dense(1, activation="sigmoid")])
    model.layers[-1].kernel.assign(theta[:dim, None].astype(np.float32))
    model.layers[-1].bias.assign(theta[dim:].astype(np.float32))
    kernel = model.layers[-1].kernel.value
    cross_entropy = keras.losses.BinaryCrossentropy(reduction=None)

    def loss(y_true, y_pred):
        return cross_entropy(y_true, y_pred) + 0.5 * l2 * tf.reduce_sum(kernel**2)

    return InfluenceModel(model, loss_function=loss)


def one_sample_gradients(model, weights, inputs, targets) -> np.ndarray:
    """Per-sample gradients of categorical cross-entropy, one ``tape.gradient`` per sample (float64).

    Shares no code with InfluenceModel: the reference for its vectorized per-sample gradients.
    """
    cross_entropy = keras.losses.CategoricalCrossentropy(reduction=None)
    rows = []
    for i in range(len(targets)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(cross_entropy(targets[i : i + 1], model(inputs[i : i + 1], training=False)))
        grads = tape.gradient(loss, weights, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        rows.append(np.concatenate([np.reshape(tf.convert_to_tensor(g), [-1]) for g in grads]))
    return np.stack(rows).astype(np.float64)


def tanh_mlp_logit_jacobians(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample jacobians of the outputs ``z = W2ᵀ tanh(W1ᵀx + b1) + b2`` of a 2-layer tanh MLP
    w.r.t. [W1, b1, W2, b2] (row-major), shape (n, C, P), and the outputs (n, C); float64, analytic."""
    w1, b1, w2, b2 = [w.astype(np.float64) for w in model.get_weights()]
    x = x.astype(np.float64)
    hidden = np.tanh(x @ w1 + b1)
    slope = 1.0 - hidden**2
    n, classes = len(x), w2.shape[1]
    d_w1 = np.einsum("ni,jc,nj->ncij", x, w2, slope).reshape(n, classes, -1)
    d_b1 = np.einsum("jc,nj->ncj", w2, slope)
    d_w2 = np.einsum("nj,cd->ncjd", hidden, np.eye(classes)).reshape(n, classes, -1)
    d_b2 = np.broadcast_to(np.eye(classes), (n, classes, classes))
    return np.concatenate([d_w1, d_b1, d_w2, d_b2], axis=2), hidden @ w2 + b2



def margin_gradients(x: np.ndarray, labels: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-sample gradients of the margin ``z_y − logsumexp_{k≠y} z_k`` of a Dense layer w.r.t. [kernel, bias], float64."""
    logits = x.astype(np.float64) @ kernel + bias
    is_label = np.eye(kernel.shape[1], dtype=bool)[labels]
    others = np.where(is_label, -np.inf, logits)
    weights = np.exp(others - others.max(axis=1, keepdims=True))
    weights /= weights.sum(axis=1, keepdims=True)
    d_logits = is_label - weights
    return np.concatenate([np.einsum("nd,nc->ndc", x, d_logits).reshape(len(x), -1), d_logits], axis=1)
