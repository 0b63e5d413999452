"""The CIFAR-10 mislabel benchmark under Influenciae's names, reading CIFAR-10 from a local copy.

``Cifar10TrainingProcedure`` trains Influenciae's CIFAR model — a convolutional feature extractor,
``Flatten → Dense(128, L1L2) → Dropout(0.4) → LeakyReLU → Dense(10)`` (logits) — with Influenciae's
schedules: Adam 1e-3 halved at epochs 10, 20, …, 50, or, with ``force_overfit``, SGD 0.1 with
momentum 0.9 decayed geometrically to 1e-4 over 200 epochs; random flips and translations as
augmentation. ``Cifar10MislabelingDetectorEvaluator`` loads CIFAR-10 (pixels scaled to [−1, 1] as
in Influenciae) and wraps :class:`~influence_lib.benchmark.evaluator.MislabelingDetectorEvaluator`.

Feature extractors (``model_type``): ``'cnn'`` (three 3×3 conv blocks, 32-64-128 filters, fit for
a CPU), ``'resnet'`` (``keras.applications.ResNet50V2``; Influenciae used its own ResNet-18), ``'efficient_net'``
(EfficientNetB0), ``'vgg19'``, all with ``weights=None`` (offline), or a Keras model.
"""
import os
from dataclasses import dataclass, field

import keras
import numpy as np

from .datasets import load_cifar10
from .evaluator import MislabelingDetectorEvaluator
from .training import TrainedModel, TrainingProcedure, _accuracy, _tracin_checkpoint_callback

MODEL_TYPES = ("cnn", "resnet", "efficient_net", "vgg19")


def _feature_extractor(model_type) -> keras.Model:
    if isinstance(model_type, keras.Model):
        return model_type
    shape = (32, 32, 3)
    if model_type == "cnn":
        layers = [keras.Input(shape)]
        for filters in (32, 64, 128):
            layers += [keras.layers.Conv2D(filters, 3, padding="same", activation="relu"), keras.layers.MaxPooling2D()]
        return keras.Sequential(layers)
    applications = {
        "resnet": keras.applications.ResNet50V2,
        "efficient_net": keras.applications.EfficientNetB0,
        "vgg19": keras.applications.VGG19,
    }
    if model_type not in applications:
        raise ValueError(f"model_type must be one of {MODEL_TYPES} or a keras.Model, got {model_type!r}.")
    return applications[model_type](include_top=False, weights=None, input_shape=shape)


@dataclass
class Cifar10TrainingProcedure(TrainingProcedure):
    """Influenciae's CIFAR-10 training procedure (see the module docstring).

    Parameters
    ----------
    epochs
        Training epochs.
    model_type
        Feature extractor: ``'cnn'`` (default here), ``'resnet'``, ``'efficient_net'``, ``'vgg19'`` or a Keras model.
    use_regu
        L1L2(1e-4, 1e-4) regularization of the two Dense layers.
    use_bias
        Bias in the output layer (RPS-LJE needs none).
    force_overfit
        SGD schedule meant to memorize the training set (Influenciae's), instead of Adam.
    batch_size
        Training batch size.
    checkpoint_every_n_epochs
        Period of the TracIn checkpoints when the benchmark asks for them (Influenciae's
        ``epochs_to_save`` list; None: ``max(1, epochs // 6)``).
    verbose
        Print Keras' training progress.
    """

    epochs: int = 60
    model_type: object = "cnn"
    use_regu: bool = True
    use_bias: bool = True
    force_overfit: bool = False
    batch_size: int = 128
    checkpoint_every_n_epochs: int | None = None
    verbose: bool = False
    schedule: tuple = field(default=((10, 0.5), (20, 0.5), (30, 0.5), (40, 0.5), (50, 0.5)), repr=False)

    def __post_init__(self):
        if not isinstance(self.model_type, keras.Model) and self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {MODEL_TYPES} or a keras.Model, got {self.model_type!r}.")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, got {self.epochs!r}.")

    def loss_function(self) -> keras.losses.Loss:
        """The unreduced training loss: categorical cross-entropy on logits."""
        return keras.losses.CategoricalCrossentropy(from_logits=True, reduction=None)

    def build_model(self, nb_classes: int = 10) -> keras.Model:
        """The untrained model: feature extractor and Influenciae's classification head (logits)."""
        regularizer = keras.regularizers.L1L2(l1=1e-4, l2=1e-4) if self.use_regu else None
        return keras.Sequential([
            keras.Input((32, 32, 3)),
            _feature_extractor(self.model_type),
            keras.layers.Flatten(),
            keras.layers.Dense(128, kernel_regularizer=regularizer),
            keras.layers.Dropout(0.4),
            keras.layers.LeakyReLU(),
            keras.layers.Dense(nb_classes, kernel_regularizer=regularizer, kernel_initializer="he_normal",
                               use_bias=self.use_bias),
        ])

    def _learning_rate(self, epoch: int) -> float:
        if self.force_overfit:
            return 0.1 * (1e-4 / 0.1) ** (epoch / 200)
        rate = 1e-3
        for last_epoch, factor in self.schedule:
            if epoch < last_epoch:
                break
            rate *= factor
        return rate

    def train(self, x_train, y_train, x_test, y_test, seed, checkpoint_directory=None) -> TrainedModel:
        keras.utils.set_random_seed(seed)
        model = self.build_model(int(y_train.shape[1]))
        optimizer = keras.optimizers.SGD(0.1, momentum=0.9) if self.force_overfit else keras.optimizers.Adam(1e-3)
        model.compile(optimizer=optimizer, loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        augment = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=seed),
                                    keras.layers.RandomTranslation(0.1, 0.1, fill_mode="nearest", seed=seed)])
        callbacks = [keras.callbacks.LearningRateScheduler(self._learning_rate)]
        checkpoint_callback = None
        if checkpoint_directory is not None:
            os.makedirs(checkpoint_directory, exist_ok=True)
            period = self.checkpoint_every_n_epochs or max(1, self.epochs // 6)
            checkpoint_callback = _tracin_checkpoint_callback(checkpoint_directory, period)
            callbacks.append(checkpoint_callback)
        rng = np.random.default_rng(seed)

        def batches():
            while True:
                order = rng.permutation(len(x_train))
                for start in range(0, len(order), self.batch_size):
                    chosen = order[start: start + self.batch_size]
                    yield augment(x_train[chosen], training=True), y_train[chosen]

        steps = -(-len(x_train) // self.batch_size)
        model.fit(batches(), steps_per_epoch=steps, epochs=self.epochs, verbose=1 if self.verbose else 0, shuffle=False,
                  callbacks=callbacks)
        return TrainedModel(
            model, _accuracy(model, x_train, y_train), _accuracy(model, x_test, y_test), seed, checkpoint_directory,
            checkpoint_callback, self.loss_function(),
        )


class Cifar10MislabelingDetectorEvaluator(MislabelingDetectorEvaluator):
    """Influenciae's CIFAR-10 mislabel benchmark, on CIFAR-10 read from ``data_path``.

    Parameters
    ----------
    epochs, model_type, use_regu, use_bias, force_overfit
        The :class:`Cifar10TrainingProcedure` settings.
    mislabeling_ratio
        Fraction of the training labels flipped (Influenciae's default 0.0005 flips 25 of 50,000).
    train_batch_size, test_batch_size, influence_batch_size
        Training batch size (also the methods' batch size unless ``influence_batch_size`` is given);
        the test batch size is recorded in the config.
    epochs_to_save
        Ignored unless None: TracIn checkpoints are saved every ``checkpoint_every_n_epochs``.
    take_batch
        Use only the first ``take_batch`` training and test samples (Influenciae's name).
    data_path
        The extracted ``cifar-10-batches-py`` directory (None: ``keras.datasets``, online).
    checkpoint_every_n_epochs
        Period of the TracIn checkpoints.
    verbose_training, show_progress
        Keras' training output; the benchmark's progress bar.
    """

    def __init__(
        self,
        epochs: int = 60,
        model_type="cnn",
        mislabeling_ratio: float = 0.0005,
        use_regu: bool = True,
        use_bias: bool = True,
        force_overfit: bool = False,
        train_batch_size: int = 128,
        test_batch_size: int = 128,
        influence_batch_size: int | None = None,
        epochs_to_save=None,
        take_batch: int | None = None,
        data_path: str | None = None,
        checkpoint_every_n_epochs: int | None = None,
        verbose_training: bool = False,
        show_progress: bool = True,
    ):
        if epochs_to_save is not None:
            raise ValueError(
                "epochs_to_save is Influenciae's list of checkpoint epochs; here TracIn checkpoints are saved every "
                "checkpoint_every_n_epochs epochs: pass that instead."
            )
        data = load_cifar10(data_path)
        n = None if take_batch is None else int(take_batch)
        x_train, y_train = data.x_train[:n] * 2.0 - 1.0, data.y_train[:n]
        x_test, y_test = data.x_test[:n] * 2.0 - 1.0, data.y_test[:n]
        procedure = Cifar10TrainingProcedure(
            epochs, model_type, use_regu, use_bias, force_overfit, train_batch_size, checkpoint_every_n_epochs,
            verbose_training,
        )
        config = {
            "epochs": epochs,
            "model_type": model_type if isinstance(model_type, str) else type(model_type).__name__,
            "mislabeling_ratio": mislabeling_ratio,
            "use_regularization": use_regu,
            "use_bias": use_bias,
            "optimizer": "sgd" if force_overfit else "adam",
            "samples_to_take": -1 if take_batch is None else int(take_batch),
        }
        super().__init__(
            (x_train, y_train), (x_test, y_test), procedure, 10, mislabeling_ratio, train_batch_size, test_batch_size,
            influence_batch_size, config, show_progress,
        )
