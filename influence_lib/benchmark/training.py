"""Training procedures for the benchmark: how the model whose training data is audited gets trained."""
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from ..common.compiled import compiled_function


@dataclass
class TrainedModel:
    """A model trained on noisy labels, with what some methods need besides the final weights.

    Attributes
    ----------
    model
        The trained Keras model (softmax outputs).
    train_accuracy, test_accuracy
        Accuracy on the (noisy) training labels and on the clean test set.
    seed
        Seed of the run (methods with randomness, e.g. the random baseline, use it).
    checkpoint_directory
        Where the TracIn checkpoint callback saved its checkpoints (None when not asked).
    checkpoint_callback
        The :class:`~influence_lib.influence.tracin_checkpoint.TracInCheckpoint` used (None when not asked).
    loss_function
        The unreduced loss the model was trained with, for the methods' :class:`InfluenceModel`
        (None: categorical cross-entropy on softmax outputs, the library's default).
    independent_models
        Other models trained with the same procedure
        (:class:`~influence_lib.benchmark.retraining.IndependentModels`), for the methods that
        ensemble them (``trak_ensemble``); the benchmarks attach it (None: not available).
    """

    model: keras.Model
    train_accuracy: float
    test_accuracy: float
    seed: int
    checkpoint_directory: str | None = None
    checkpoint_callback: object | None = field(default=None, repr=False)
    loss_function: Callable | None = field(default=None, repr=False)
    independent_models: object | None = field(default=None, repr=False)


class TrainingProcedure(ABC):
    """How to train a model for the benchmark."""

    @abstractmethod
    def train(
        self,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray,
        y_test: np.ndarray,
        seed: int,
        checkpoint_directory: str | None = None,
    ) -> TrainedModel:
        """Train on ``(x_train, y_train)`` (one-hot labels) from seed ``seed``; evaluate on the test set.

        When ``checkpoint_directory`` is given, save TracIn checkpoints there (with
        :class:`~influence_lib.influence.tracin_checkpoint.TracInCheckpoint`).
        """

    def train_without(
        self, x_train: np.ndarray, y_train: np.ndarray, index: int, x_test: np.ndarray, y_test: np.ndarray, seed: int
    ) -> TrainedModel:
        """Train on every training sample but ``index``, from seed ``seed`` (leave-one-out retraining).

        The default trains on the arrays without that row. A procedure whose randomness depends on
        the number of samples (e.g. the batch order) should override it so that, with the same
        seed, everything but the removed sample stays the same as in ``train`` — otherwise the
        leave-one-out difference is drowned by the reshuffle.
        """
        return self.train(np.delete(x_train, index, axis=0), np.delete(y_train, index, axis=0), x_test, y_test, seed)


def _tracin_checkpoint_callback(directory: str, every_n_epochs: int):
    try:
        from ..influence.tracin_checkpoint import TracInCheckpoint
    except ImportError as error:
        raise ImportError(
            "Saving TracIn checkpoints needs influence_lib.influence.tracin_checkpoint, which this "
            "installation does not have."
        ) from error
    return TracInCheckpoint(directory, every_n_epochs=every_n_epochs)


@dataclass
class MLPTrainingProcedure(TrainingProcedure):
    """A multilayer perceptron ``Flatten → Dense(h, relu)… → Dense(classes, softmax)`` trained with Adam.

    Parameters
    ----------
    hidden_units
        Width of each hidden layer.
    epochs, batch_size, learning_rate
        Adam training settings (categorical cross-entropy on the softmax outputs).
    checkpoint_every_n_epochs
        Period of the TracIn checkpoints, when they are asked for (None: ``max(1, epochs // 6)``,
        about six checkpoints — every 5 epochs for 30 epochs).
    output_bias
        Whether the output layer has a bias. Off by default so that every method applies
        (RPS-LJE decomposes a last layer without bias).
    """

    hidden_units: Sequence[int] = (128,)
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    checkpoint_every_n_epochs: int | None = None
    output_bias: bool = False

    def build_model(self, input_shape: tuple[int, ...], nb_classes: int) -> keras.Model:
        """The untrained MLP for inputs of ``input_shape`` and ``nb_classes`` classes."""
        layers = [keras.Input(shape=input_shape), keras.layers.Flatten()]
        layers += [keras.layers.Dense(units, activation="relu") for units in self.hidden_units]
        layers.append(keras.layers.Dense(nb_classes, activation="softmax", use_bias=self.output_bias))
        return keras.Sequential(layers)

    def train(self, x_train, y_train, x_test, y_test, seed, checkpoint_directory=None) -> TrainedModel:
        keras.utils.set_random_seed(seed)
        model = self.build_model(tuple(x_train.shape[1:]), int(y_train.shape[1]))
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate), loss="categorical_crossentropy", metrics=["accuracy"]
        )
        callbacks, checkpoint_callback = [], None
        if checkpoint_directory is not None:
            os.makedirs(checkpoint_directory, exist_ok=True)
            period = self.checkpoint_every_n_epochs or max(1, self.epochs // 6)
            checkpoint_callback = _tracin_checkpoint_callback(checkpoint_directory, period)
            callbacks.append(checkpoint_callback)
        model.fit(
            x_train,
            y_train,
            batch_size=self.batch_size,
            epochs=self.epochs,
            verbose=0,
            shuffle=True,
            callbacks=callbacks,
        )
        train_accuracy = float(model.evaluate(x_train, y_train, batch_size=512, verbose=0)[1])
        test_accuracy = float(model.evaluate(x_test, y_test, batch_size=512, verbose=0)[1])
        return TrainedModel(model, train_accuracy, test_accuracy, seed, checkpoint_directory, checkpoint_callback)


@dataclass
class SGDTrainingProcedure(TrainingProcedure):
    """Logistic regression or an MLP with logits outputs, trained by SGD — dattri's MNIST-10 protocol.

    ``Flatten → [Dense(h, relu) → Dropout]… → Dense(classes)`` (logits), categorical cross-entropy
    on the logits. With no hidden layer it is multinomial logistic regression. dattri's settings
    (Deng et al., NeurIPS 2024 D&B): logistic regression with SGD, learning rate 0.01, 20 epochs;
    MLP 784-128-64-10 with dropout 0.1, SGD with momentum 0.9, learning rate 0.01, 50 epochs.

    Parameters
    ----------
    hidden_units
        Width of each hidden layer (empty: logistic regression).
    epochs, batch_size, learning_rate, momentum
        SGD settings.
    dropout
        Dropout rate after each hidden layer (inactive when the methods evaluate the model).
    weight_decay
        L2 penalty ``weight_decay · ‖W‖²`` on every kernel (0: none).
    output_bias
        Whether the output layer has a bias (RPS-LJE needs none).
    checkpoint_every_n_epochs
        Period of the TracIn checkpoints, when they are asked for (None: ``max(1, epochs // 5)``).
    """

    hidden_units: Sequence[int] = ()
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 0.01
    momentum: float = 0.0
    dropout: float = 0.0
    weight_decay: float = 0.0
    output_bias: bool = True
    checkpoint_every_n_epochs: int | None = None

    def loss_function(self) -> keras.losses.Loss:
        """The unreduced training loss: categorical cross-entropy on logits."""
        return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)

    def build_model(self, input_shape: tuple[int, ...], nb_classes: int) -> keras.Model:
        """The untrained model for inputs of ``input_shape`` and ``nb_classes`` classes."""
        regularizer = keras.regularizers.L2(self.weight_decay) if self.weight_decay > 0 else None
        layers = [keras.Input(shape=input_shape), keras.layers.Flatten()]
        for units in self.hidden_units:
            layers.append(keras.layers.Dense(units, activation="relu", kernel_regularizer=regularizer))
            if self.dropout > 0:
                layers.append(keras.layers.Dropout(self.dropout))
        layers.append(keras.layers.Dense(nb_classes, use_bias=self.output_bias, kernel_regularizer=regularizer))
        return keras.Sequential(layers)

    def batch_orders(self, nb_samples: int, seed: int, removed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Sample indices of every step ``(epochs, steps, batch_size)`` (a fresh permutation per epoch)
        and the mask of the samples used (the last batch of an epoch may be partial; sample
        ``removed``, if given, is masked out wherever it falls, leaving every other batch unchanged)."""
        rng = np.random.default_rng(seed)
        steps = -(-nb_samples // self.batch_size)
        padded = steps * self.batch_size
        orders = np.zeros((self.epochs, padded), dtype=np.int32)
        masks = np.zeros((self.epochs, padded), dtype=np.float32)
        for epoch in range(self.epochs):
            orders[epoch, :nb_samples] = rng.permutation(nb_samples)
            masks[epoch, :nb_samples] = 1.0
        if removed is not None:
            masks[orders == removed] = 0.0
        shape = (self.epochs, steps, self.batch_size)
        return orders.reshape(shape), masks.reshape(shape)

    def train_without(self, x_train, y_train, index, x_test, y_test, seed) -> TrainedModel:
        """Leave-one-out with common random numbers: the same initial weights, batches and dropout as
        ``train(x_train, y_train, …, seed)``, sample ``index`` masked out of the one batch per epoch
        that holds it."""
        if not 0 <= int(index) < len(x_train):
            raise ValueError(f"index must be a training-sample index in 0 … {len(x_train) - 1}, got {index!r}.")
        trained = self._fit(x_train, y_train, x_test, y_test, seed, None, int(index))
        keep = np.arange(len(x_train)) != int(index)
        trained.train_accuracy = _accuracy(trained.model, x_train[keep], y_train[keep])
        return trained

    def train(self, x_train, y_train, x_test, y_test, seed, checkpoint_directory=None) -> TrainedModel:
        """Train from seed ``seed`` (initial weights, batch order and dropout all follow from it).

        Each epoch runs as one compiled loop over its mini-batches (traced once per architecture,
        reused by every model of a ground-truth run); the update is Keras' SGD
        (``v ← μ v − η g``, ``w ← w + v``) on the mean loss of the batch plus the L2 penalty.
        """
        return self._fit(x_train, y_train, x_test, y_test, seed, checkpoint_directory, None)

    def _fit(self, x_train, y_train, x_test, y_test, seed, checkpoint_directory, removed) -> TrainedModel:
        keras.utils.set_random_seed(seed)
        model = self.build_model(tuple(x_train.shape[1:]), int(y_train.shape[1]))
        model.compile(optimizer=keras.optimizers.SGD(self.learning_rate, momentum=self.momentum))
        callback = None
        if checkpoint_directory is not None:
            os.makedirs(checkpoint_directory, exist_ok=True)
            period = self.checkpoint_every_n_epochs or max(1, self.epochs // 5)
            callback = _tracin_checkpoint_callback(checkpoint_directory, period)
            callback.set_model(model)
            callback.on_train_begin()
        x = tf.constant(np.asarray(x_train, np.float32).reshape(len(x_train), -1))
        y = tf.constant(np.asarray(y_train, np.float32))
        weights = [tf.constant(value) for value in model.get_weights()]
        velocities = [tf.zeros_like(value) for value in weights]
        orders, masks = self.batch_orders(len(x_train), seed, removed)
        settings = (len(self.hidden_units), self.output_bias, float(self.dropout))
        hyper = tf.constant([self.learning_rate, self.momentum, self.weight_decay], tf.float32)
        for epoch in range(self.epochs):
            weights, velocities = _sgd_epoch(
                weights, velocities, x, y, tf.constant(orders[epoch]), tf.constant(masks[epoch]), hyper,
                tf.constant([seed, epoch], tf.int64), *settings,
            )
            if callback is not None:
                model.set_weights([value.numpy() for value in weights])
                callback.on_epoch_end(epoch)
        model.set_weights([value.numpy() for value in weights])
        model.optimizer.iterations.assign(int(orders.shape[0] * orders.shape[1]))
        return TrainedModel(
            model, _accuracy(model, x_train, y_train), _accuracy(model, x_test, y_test), seed, checkpoint_directory,
            callback, self.loss_function(),
        )


def _logits(weights, inputs, nb_hidden: int, output_bias: bool, dropout: float, seed) -> tf.Tensor:
    """Forward pass of :meth:`SGDTrainingProcedure.build_model` on its weight list (dropout on with a ``seed``)."""
    hidden = inputs
    for layer in range(nb_hidden):
        hidden = tf.nn.relu(tf.matmul(hidden, weights[2 * layer]) + weights[2 * layer + 1])
        if seed is not None and dropout > 0:
            noise = tf.random.stateless_uniform(tf.shape(hidden), tf.random.experimental.stateless_fold_in(seed, layer))
            hidden = tf.where(noise >= dropout, hidden / (1.0 - dropout), tf.zeros_like(hidden))
    logits = tf.matmul(hidden, weights[2 * nb_hidden])
    return logits + weights[2 * nb_hidden + 1] if output_bias else logits


@compiled_function
def _sgd_epoch(weights, velocities, x, y, orders, masks, hyper, seed, nb_hidden, output_bias, dropout):
    """One epoch of mini-batch SGD with momentum: ``orders``/``masks`` ``(steps, batch)``; ``hyper`` = (η, μ, λ)."""
    learning_rate, momentum, weight_decay = hyper[0], hyper[1], hyper[2]
    kernels = [2 * layer for layer in range(nb_hidden + 1)]

    def body(step, weights, velocities):
        mask = masks[step]
        batch_x, batch_y = tf.gather(x, orders[step]), tf.gather(y, orders[step])
        with tf.GradientTape() as tape:
            tape.watch(weights)
            step_seed = tf.random.experimental.stateless_fold_in(seed, tf.cast(step, tf.int64))
            logits = _logits(weights, batch_x, nb_hidden, output_bias, dropout, step_seed)
            losses = tf.nn.softmax_cross_entropy_with_logits(batch_y, logits)
            loss = tf.reduce_sum(losses * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
            loss += weight_decay * tf.add_n([tf.reduce_sum(tf.square(weights[index])) for index in kernels])
        gradients = tape.gradient(loss, weights)
        velocities = [momentum * velocity - learning_rate * grad for velocity, grad in zip(velocities, gradients)]
        return step + 1, [weight + velocity for weight, velocity in zip(weights, velocities)], velocities

    _, weights, velocities = tf.while_loop(
        lambda step, *_: step < tf.shape(orders)[0], body, (tf.constant(0), list(weights), list(velocities))
    )
    return weights, velocities


def _accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 4096) -> float:
    """Fraction of samples whose highest output is the one-hot label's class (eager calls: no tracing)."""
    correct = 0
    for start in range(0, len(x), batch_size):
        outputs = np.asarray(model(x[start: start + batch_size], training=False))
        correct += int((outputs.argmax(axis=1) == y[start: start + batch_size].argmax(axis=1)).sum())
    return correct / len(x)


class InfluenciaeTrainingProcedure(TrainingProcedure):
    """An Influenciae-style training procedure used as a library one.

    Influenciae's ``BaseTrainingProcedure.train(training_dataset, test_dataset, train_batch_size,
    test_batch_size, log_path)`` takes unbatched datasets and returns ``(train accuracy, test
    accuracy, model, info)``. TracIn checkpoints are not available through it (train with a library
    procedure for TracIn).

    Parameters
    ----------
    procedure
        The Influenciae-style procedure.
    train_batch_size, test_batch_size
        Batch sizes handed to it.
    loss_function
        The unreduced loss its models are trained with (None: categorical cross-entropy on softmax
        outputs); pass ``CategoricalCrossentropy(from_logits=True, reduction=None)`` for logits models.
    """

    def __init__(self, procedure, train_batch_size: int = 128, test_batch_size: int = 128,
                 loss_function: Callable | None = None):
        if not callable(getattr(procedure, "train", None)):
            raise TypeError(f"procedure must have a train(...) method, got {type(procedure).__name__}.")
        self.procedure = procedure
        self.train_batch_size = train_batch_size
        self.test_batch_size = test_batch_size
        self.loss_function = loss_function

    def __repr__(self) -> str:
        return (f"InfluenciaeTrainingProcedure({self.procedure!r}, train_batch_size={self.train_batch_size}, "
                f"test_batch_size={self.test_batch_size})")

    def train(self, x_train, y_train, x_test, y_test, seed, checkpoint_directory=None) -> TrainedModel:
        if checkpoint_directory is not None:
            raise ValueError("An Influenciae-style training procedure cannot save TracIn checkpoints; use a library "
                             "TrainingProcedure (e.g. MLPTrainingProcedure) for TracIn.")
        keras.utils.set_random_seed(seed)
        train_accuracy, test_accuracy, model, _ = self.procedure.train(
            tf.data.Dataset.from_tensor_slices((x_train, y_train)),
            tf.data.Dataset.from_tensor_slices((x_test, y_test)),
            self.train_batch_size, self.test_batch_size, log_path=None,
        )
        return TrainedModel(model, float(train_accuracy), float(test_accuracy), seed, loss_function=self.loss_function)
