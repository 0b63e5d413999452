"""A Keras callback that saves what TracIn needs during ``model.fit``: weights and learning rates."""
import os

import keras


class TracInCheckpoint(keras.callbacks.Callback):
    """Save the model's weights every N epochs (or steps) with the optimizer's current learning rate.

    After ``model.fit(..., callbacks=[checkpoint])``, ``TracIn.from_callback(checkpoint)`` builds
    TracIn over the saved checkpoints (Pruthi et al., NeurIPS 2020).

    The learning rate recorded with a checkpoint is the optimizer's current one when the weights
    are saved: for a ``keras.optimizers.schedules.LearningRateSchedule`` it is the schedule evaluated
    at ``optimizer.iterations`` (the number of steps taken so far), i.e. the rate of the next step.

    Parameters
    ----------
    directory
        Where the ``.weights.h5`` files are written (created if missing).
    every_n_epochs
        Save at the end of every ``every_n_epochs``-th epoch.
    every_n_steps
        If given, save after every ``every_n_steps``-th training step (counted over all ``fit``
        calls with ``optimizer.iterations``) instead of at epoch ends.

    Attributes
    ----------
    checkpoints
        ``(path, learning_rate)`` of every checkpoint saved, in training order.
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
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, f"checkpoint_{len(self.checkpoints):04d}_{label}.weights.h5")
        self.model.save_weights(path, overwrite=True)
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
