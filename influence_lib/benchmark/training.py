"""Training procedures for the benchmark: how the model whose training data is audited gets trained."""
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np


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
    """

    model: keras.Model
    train_accuracy: float
    test_accuracy: float
    seed: int
    checkpoint_directory: str | None = None
    checkpoint_callback: object | None = field(default=None, repr=False)
    loss_function: Callable | None = field(default=None, repr=False)


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

    def train(self, x_train, y_train, x_test, y_test, seed, checkpoint_directory=None) -> TrainedModel:
        keras.utils.set_random_seed(seed)
        model = self.build_model(tuple(x_train.shape[1:]), int(y_train.shape[1]))
        model.compile(
            optimizer=keras.optimizers.SGD(self.learning_rate, momentum=self.momentum),
            loss=keras.losses.CategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        callbacks, checkpoint_callback = [], None
        if checkpoint_directory is not None:
            os.makedirs(checkpoint_directory, exist_ok=True)
            period = self.checkpoint_every_n_epochs or max(1, self.epochs // 5)
            checkpoint_callback = _tracin_checkpoint_callback(checkpoint_directory, period)
            callbacks.append(checkpoint_callback)
        model.fit(
            x_train, y_train, batch_size=self.batch_size, epochs=self.epochs, verbose=0, shuffle=True,
            callbacks=callbacks,
        )
        return TrainedModel(
            model, _accuracy(model, x_train, y_train), _accuracy(model, x_test, y_test), seed, checkpoint_directory,
            checkpoint_callback, self.loss_function(),
        )


def _accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray, batch_size: int = 4096) -> float:
    """Fraction of samples whose highest output is the one-hot label's class (eager calls: no tracing)."""
    correct = 0
    for start in range(0, len(x), batch_size):
        outputs = np.asarray(model(x[start: start + batch_size], training=False))
        correct += int((outputs.argmax(axis=1) == y[start: start + batch_size].argmax(axis=1)).sum())
    return correct / len(x)
