"""A Keras callback that saves what TracIn needs during ``model.fit``: weights and learning rates;
loading and checking checkpoints for TracIn."""
import os
import time
import uuid
from collections.abc import Sequence

import keras

from ..model.influence_model import InfluenceModel
from ._fingerprint import describe_callable


def load_checkpoint(model: keras.Model, path: str) -> keras.Model:
    """Load the weights saved at ``path`` into ``model`` (a copy made for this checkpoint) and return it.

    Raises
    ------
    FileNotFoundError
        No file at ``path``.
    ValueError
        The file is corrupt, not a Keras weights file, or was saved from another architecture
        (the message names the path and Keras's reason).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The TracIn checkpoint {path!r} does not exist (or is not a file): pass the weight "
                                "files saved during training (.weights.h5).")
    try:
        model.load_weights(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(
            f"Cannot load the TracIn checkpoint {path!r} into the model: {reason}. The file is corrupt or "
            "truncated, or was saved from another architecture; pass the weight files saved from this model "
            "(.weights.h5)."
        ) from error
    return model


def check_compatible_checkpoints(models: Sequence[InfluenceModel]) -> None:
    """Raise unless every checkpoint watches weights of the same shapes, in the same layers, with the same loss.

    TracIn sums gradient dot products over checkpoints of ONE training run: checkpoints of other
    architectures (other widths, other watched layers) or another loss would add unrelated terms.
    """
    reference = models[0]
    for index, model in enumerate(models[1:], start=1):
        if model.weight_shapes != reference.weight_shapes:
            raise ValueError(
                f"Checkpoint {index} watches weights of shapes {model.weight_shapes} but checkpoint 0 watches "
                f"{reference.weight_shapes}: TracIn needs checkpoints of one training run (same architecture, "
                "same watched layers, start_layer/last_layer)."
            )
        if describe_callable(model.loss_function) != describe_callable(reference.loss_function):
            raise ValueError(
                f"Checkpoint {index} uses the loss {describe_callable(model.loss_function)} but checkpoint 0 uses "
                f"{describe_callable(reference.loss_function)}: give every checkpoint the same loss_function."
            )


class TracInCheckpoint(keras.callbacks.Callback):
    """Save the model's weights every N epochs (or steps) with the optimizer's current learning rate.

    After ``model.fit(..., callbacks=[checkpoint])``, ``TracIn.from_callback(checkpoint)`` builds
    TracIn over the saved checkpoints (Pruthi et al., NeurIPS 2020).

    The learning rate recorded with a checkpoint is the optimizer's current one when the weights
    are saved: for a ``keras.optimizers.schedules.LearningRateSchedule`` it is the schedule evaluated
    at ``optimizer.iterations`` (the number of steps taken so far), i.e. the rate of the next step.

    Each callback (one training run) writes into its own new subdirectory ``directory/run-<time>-<id>``,
    so runs sharing ``directory`` never overwrite each other's files. Each file is written under a
    temporary name and renamed into place when complete.

    Parameters
    ----------
    directory
        Where the runs' subdirectories of ``.weights.h5`` files are written (created if missing).
    every_n_epochs
        Save at the end of every ``every_n_epochs``-th epoch.
    every_n_steps
        If given, save after every ``every_n_steps``-th training step (counted over all ``fit``
        calls with ``optimizer.iterations``) instead of at epoch ends.

    Attributes
    ----------
    checkpoints
        ``(path, learning_rate)`` of every checkpoint saved, in training order.
    run_directory
        This run's own subdirectory of ``directory``.

    Raises
    ------
    OSError
        ``directory`` is a file or cannot be created (at construction, not after the first epoch).
    """

    def __init__(self, directory: str, every_n_epochs: int | None = 1, every_n_steps: int | None = None):
        super().__init__()
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"directory must be a path, got {type(directory).__name__}.")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("Give every_n_epochs or every_n_steps: with neither, no checkpoint would be saved.")
        self.directory = os.fspath(directory)
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise NotADirectoryError(
                f"The TracInCheckpoint directory {self.directory!r} is a file: pass a directory path (created if missing)."
            )
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as error:
            raise OSError(
                f"Cannot create the TracInCheckpoint directory {self.directory!r}: {error.strerror or error}. "
                "Choose a writable location."
            ) from error
        self.run_directory = os.path.join(
            self.directory, f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        )
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.checkpoints: list[tuple[str, float]] = []

    @property
    def paths(self) -> list[str]:
        """The saved weight files, in training order."""
        return [path for path, _ in self.checkpoints]

    @property
    def learning_rates(self) -> list[float]:
        """The learning rate recorded with each checkpoint."""
        return [rate for _, rate in self.checkpoints]

    def _current_learning_rate(self) -> float:
        optimizer = self.model.optimizer
        if optimizer is None:
            raise ValueError("TracInCheckpoint needs a compiled model with an optimizer.")
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))

    def _save(self, label: str) -> None:
        name = f"checkpoint_{len(self.checkpoints):04d}_{label}.weights.h5"
        path = os.path.join(self.run_directory, name)
        temporary = os.path.join(self.run_directory, f".tmp-{uuid.uuid4().hex}-{name}")
        try:
            os.makedirs(self.run_directory, exist_ok=True)
            self.model.save_weights(temporary, overwrite=True)
            os.replace(temporary, path)
        except OSError as error:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise OSError(f"Cannot write the TracIn checkpoint {path!r}: {error.strerror or error}.") from error
        self.checkpoints.append((path, self._current_learning_rate()))

    def on_train_batch_end(self, batch, logs=None):
        if self.every_n_steps is None:
            return
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if step % self.every_n_steps == 0:
            self._save(f"step{step}")

    def on_epoch_end(self, epoch, logs=None):
        if self.every_n_steps is None and (epoch + 1) % self.every_n_epochs == 0:
            self._save(f"epoch{epoch + 1}")
