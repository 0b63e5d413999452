"""The most influential training images for a test image: proponents and opponents, with labels."""
from collections.abc import Sequence

import numpy as np

from ._backend import use_agg_without_display

use_agg_without_display()
import matplotlib.pyplot as plt


def _as_image(image) -> tuple[np.ndarray, str | None]:
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 1:
        side = int(round(np.sqrt(image.size)))
        if side * side != image.size:
            raise ValueError(f"Cannot show a flat vector of {image.size} values as a square image; reshape it first.")
        image = image.reshape(side, side)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3):
        raise ValueError(f"An image must be (height, width) or (height, width, channels), got shape {image.shape}.")
    return np.clip(image, 0.0, 1.0) if image.ndim == 3 else image, "gray" if image.ndim == 2 else None


def _label_text(label, class_names: Sequence[str] | None) -> str:
    label = np.asarray(label)
    index = int(label.argmax()) if label.ndim >= 1 and label.size > 1 else int(label)
    return class_names[index] if class_names is not None else str(index)


def plot_influential_images(
    test_image,
    test_label,
    proponents,
    proponent_labels,
    proponent_values,
    opponents=None,
    opponent_labels=None,
    opponent_values=None,
    class_names: Sequence[str] | None = None,
    predicted_label=None,
    title: str | None = None,
):
    """The test image, then its proponents (highest influence) and opponents (lowest) with labels and values.

    Parameters
    ----------
    test_image, test_label
        The image explained and its label (class index or one-hot).
    proponents, proponent_labels, proponent_values
        The ``k`` training images with the largest influence on the test image, their labels and
        influence values (e.g. from ``top_k(..., order=ORDER.DESCENDING)``).
    opponents, opponent_labels, opponent_values
        Optionally the ``k`` with the smallest influence (``order=ORDER.ASCENDING``).
    class_names
        Names shown instead of class indices.
    predicted_label
        The model's prediction for the test image, shown in its caption.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    rows = [("proponents", proponents, proponent_labels, proponent_values)]
    if opponents is not None:
        if opponent_labels is None or opponent_values is None:
            raise ValueError("Give opponent_labels and opponent_values along with opponents.")
        rows.append(("opponents", opponents, opponent_labels, opponent_values))
    k = max(len(row[1]) for row in rows)
    for name, images, labels, values in rows:
        if not len(images) == len(labels) == len(values):
            raise ValueError(f"{name}: images, labels and values must have the same length.")
    figure, axes = plt.subplots(len(rows), k + 1, figsize=(1.6 * (k + 1), 2.3 * len(rows)), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    image, cmap = _as_image(test_image)
    axes[0, 0].imshow(image, cmap=cmap)
    caption = f"test: {_label_text(test_label, class_names)}"
    if predicted_label is not None:
        caption += f"\npred: {_label_text(predicted_label, class_names)}"
    axes[0, 0].set_title(caption, fontsize=8)
    for row, (name, images, labels, values) in enumerate(rows):
        for column in range(len(images)):
            axis = axes[row, column + 1]
            image, cmap = _as_image(images[column])
            axis.imshow(image, cmap=cmap)
            axis.set_title(
                f"{name[:-1]} {column + 1}\n{_label_text(labels[column], class_names)} ({float(values[column]):.3g})",
                fontsize=7,
            )
    figure.suptitle(title or "Most influential training images", fontsize=10)
    figure.tight_layout()
    return figure
