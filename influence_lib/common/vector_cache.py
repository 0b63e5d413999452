"""Disk cache of training-side influence vectors (``tf.data.Dataset.save``) with a checked fingerprint.

A cache directory holds the vectors batch by batch plus ``influence_lib_cache.json`` describing
what produced them; loading a cache made by another calculator, model or training set is an
error, never silently wrong data.
"""
import json
import os
from collections.abc import Iterable

import tensorflow as tf

from .datasets import size_of

_METADATA = "influence_lib_cache.json"


def save_vectors(batches: Iterable[tf.Tensor], path: str, fingerprint: dict, dtype: tf.DType = tf.float32) -> None:
    """Stream ``(batch, D)`` vector batches of ``dtype`` to ``path`` and write their fingerprint beside them."""
    counts: list[int] = []

    def generate():
        for vectors in batches:
            counts.append(size_of(vectors))
            yield vectors

    dataset = tf.data.Dataset.from_generator(generate, output_signature=tf.TensorSpec((None, None), dtype))
    tf.data.Dataset.save(dataset, path)
    with open(os.path.join(path, _METADATA), "w", encoding="utf-8") as handle:
        json.dump({**fingerprint, "num_samples": sum(counts), "batch_sizes": counts}, handle)


def load_vectors(path: str, fingerprint: dict, batch_sizes: list[int]) -> tf.data.Dataset:
    """Load vectors saved by :func:`save_vectors`; raise if missing, made by something else, or made
    for a training set batched differently than ``batch_sizes``."""
    metadata_path = os.path.join(path, _METADATA)
    if not os.path.isdir(path) or not os.path.exists(metadata_path):
        raise FileNotFoundError(
            f"No influence-vector cache at {path!r}. Compute it first (save_influence_vector_path=...) "
            "or drop the load path."
        )
    with open(metadata_path, encoding="utf-8") as handle:
        metadata = json.load(handle)
    mismatched = {key: (metadata.get(key), value) for key, value in fingerprint.items() if metadata.get(key) != value}
    if mismatched:
        details = ", ".join(f"{key}: cached {old!r} vs now {new!r}" for key, (old, new) in mismatched.items())
        raise ValueError(f"The influence-vector cache at {path!r} was made by a different setup ({details}).")
    if metadata["batch_sizes"] != batch_sizes:
        raise ValueError(
            f"The training set does not match the influence-vector cache at {path!r}: the cache holds "
            f"{metadata['num_samples']} vectors in {len(metadata['batch_sizes'])} batches, the training set "
            f"has {sum(batch_sizes)} samples in {len(batch_sizes)} batches. Recompute the cache for this "
            "training set (same samples, same batching, fixed order)."
        )
    return tf.data.Dataset.load(path)
