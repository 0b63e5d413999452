"""Disk cache of training-side influence vectors: fingerprinted, written atomically, checked on read.

A cache is a :class:`~influence_lib.common.storage.ShardStore` directory: one ``.npz`` shard of
vectors per training batch (``batch_000000``, ...), each with its SHA-256, a manifest holding the
fingerprint of what produced the vectors (calculator and settings, weights, curvature, training
data, see :meth:`BaseInfluenceCalculator._disk_fingerprint`) and a completion record.

Guarantees:

* The directory is built beside ``path`` and swapped in only once every shard and the completion
  record are written (:func:`~influence_lib.common.storage.atomic_directory`): a process killed
  at any point leaves the previous complete cache or the new complete one, never a mix.
* Loading a cache made by another calculator, setting, model or training set is a ``ValueError``
  naming the fingerprint entries that differ.
* A missing, incomplete or corrupt cache (truncated or altered shard, broken manifest) is an
  ``OSError``/``ValueError`` naming the path and saying to delete it or recompute, never a raw
  decoding error.

The module needs NumPy only (no TensorFlow), like :mod:`~influence_lib.common.storage`: vectors
come in as anything ``np.asarray`` accepts (eager tensors included) and are read back as arrays.
"""
import json
import os
from collections.abc import Iterable, Iterator

import numpy as np

from .storage import ShardStore, atomic_directory, read_json, recover_directory

WHAT = "influence-vector cache"
_MANIFEST = "manifest.json"
_OLD_METADATA = "influence_lib_cache.json"
_HINTS = {
    "weights": "the model's weights changed",
    "state": "the fitted state (curvature, eigenvectors, ...) differs",
    "data": "another training set, order or batching, or one that reshuffles each iteration",
}


def _shard_name(index: int) -> str:
    return f"batch_{index:06d}"


def save_vectors(batches: Iterable, path: str, fingerprint: dict, dtype=None) -> None:
    """Stream ``(batch, D)`` vector batches into a new cache at ``path``, replacing any cache there
    only once the new one is complete. Vectors are stored in ``dtype`` (a NumPy or TensorFlow
    dtype; default: their own dtype).

    Raises
    ------
    OSError
        ``path`` cannot be written (names the path).
    ValueError
        ``path`` holds files that are not an influence_lib cache (saving would delete them).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"The {WHAT} path {path!r} is a file, not a directory: pass a directory path.")
    with atomic_directory(path, WHAT) as temporary:
        store = ShardStore(temporary, fingerprint, WHAT)
        sizes = []
        for index, vectors in enumerate(batches):
            array = np.asarray(vectors)
            if dtype is not None:
                array = array.astype(getattr(dtype, "as_numpy_dtype", dtype))
            store.write(_shard_name(index), vectors=array)
            sizes.append(int(array.shape[0]))
        store.mark_complete(num_samples=sum(sizes), batch_sizes=sizes)


def _differences(stored: dict, fingerprint: dict) -> str:
    keys = sorted(set(stored) | set(fingerprint))
    parts = []
    for key in keys:
        if stored.get(key) != fingerprint.get(key):
            hint = _HINTS.get(key, f"cached {stored.get(key)!r} vs now {fingerprint.get(key)!r}")
            parts.append(f"{key} ({hint})")
    return ", ".join(parts)


def open_vectors(path: str, fingerprint: dict) -> ShardStore:
    """Open the complete cache at ``path`` made with ``fingerprint``.

    Raises
    ------
    FileNotFoundError
        No cache at ``path``.
    ValueError
        The cache was made by a different setup (names what differs), or is incomplete or corrupt.
    """
    recover_directory(path)
    manifest = os.path.join(path, _MANIFEST)
    if os.path.exists(os.path.join(path, _OLD_METADATA)):
        raise ValueError(
            f"The {WHAT} at {path!r} was written by an older version of influence_lib (no checksums nor full "
            "fingerprint); delete it and recompute it."
        )
    if not os.path.isdir(path) or not os.path.exists(manifest):
        raise FileNotFoundError(
            f"No {WHAT} at {path!r}. Compute it first (save_influence_vector_path=...) or drop the load path."
        )
    stored = read_json(manifest, f"{WHAT} manifest").get("fingerprint")
    normalized = _normalized(fingerprint)
    if not isinstance(stored, dict):
        raise ValueError(f"The {WHAT} at {path!r} is corrupt (its manifest has no fingerprint); delete it or recompute.")
    if stored != normalized:
        raise ValueError(
            f"The {WHAT} at {path!r} was made by a different setup: {_differences(stored, normalized)}. "
            "Recompute it for this setup (save_influence_vector_path=...), or load the cache that matches."
        )
    store = ShardStore(path, fingerprint, WHAT)
    completion = store.completion()
    if completion is None or not isinstance(completion.get("batch_sizes"), list):
        raise ValueError(f"The {WHAT} at {path!r} is incomplete; delete it or recompute.")
    return store


def _normalized(fingerprint: dict) -> dict:
    """The fingerprint as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def read_vectors(store: ShardStore) -> Iterator[np.ndarray]:
    """Yield the vector batches of an opened cache in order, each checked against its checksum."""
    for index in range(len(store.completion()["batch_sizes"])):
        try:
            contents = store.read(_shard_name(index))
        except FileNotFoundError as error:
            raise ValueError(
                f"The {WHAT} at {store.path!r} is incomplete (shard {_shard_name(index)!r} is missing); "
                "delete it or recompute."
            ) from error
        if "vectors" not in contents:
            raise ValueError(
                f"The {WHAT} at {store.path!r} is corrupt (shard {_shard_name(index)!r} holds no vectors); "
                "delete it or recompute."
            )
        yield contents["vectors"]
