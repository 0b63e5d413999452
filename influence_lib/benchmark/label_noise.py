"""Planting label noise: flip an exact fraction of the labels, each to a different class."""
import numpy as np


def flip_labels(
    labels, nb_classes: int, mislabeling_ratio: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Flip exactly ``round(mislabeling_ratio · n)`` labels, each to another class drawn uniformly.

    Parameters
    ----------
    labels
        Integer class labels in ``[0, nb_classes)``, shape ``(n,)``. Not modified.
    nb_classes
        Number of classes (at least 2).
    mislabeling_ratio
        Fraction of the samples whose label is flipped, in ``[0, 1]``.
    seed
        Seed of the draw: the same seed gives the same flips.

    Returns
    -------
    noisy_labels, flipped_indices
        The new labels (a copy) and the sorted indices of the flipped samples. Every flipped
        sample gets a class different from its original one.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be a 1-D array of integer class labels, got dtype {labels.dtype} and shape {labels.shape} "
            "(for one-hot labels pass labels.argmax(axis=1))."
        )
    if isinstance(nb_classes, bool) or not isinstance(nb_classes, (int, np.integer)) or nb_classes < 2:
        raise ValueError(
            f"nb_classes must be an integer ≥ 2 (a label can only be flipped to another class), got {nb_classes!r}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= nb_classes):
        raise ValueError(f"labels must lie in [0, {nb_classes}), got values in [{labels.min()}, {labels.max()}].")
    if not 0.0 <= float(mislabeling_ratio) <= 1.0:
        raise ValueError(f"mislabeling_ratio must be in [0, 1], got {mislabeling_ratio!r}.")
    rng = np.random.default_rng(seed)
    nb_flipped = int(round(float(mislabeling_ratio) * labels.size))
    flipped_indices = np.sort(rng.choice(labels.size, size=nb_flipped, replace=False))
    shifts = rng.integers(1, nb_classes, size=nb_flipped)
    noisy_labels = labels.copy()
    noisy_labels[flipped_indices] = (labels[flipped_indices] + shifts) % nb_classes
    return noisy_labels, flipped_indices
