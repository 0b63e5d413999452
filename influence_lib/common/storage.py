"""Fingerprinted, crash-safe storage: the one mechanism every on-disk artefact of the library uses.

Caches of influence vectors, curvature factors, projected features and retraining ground truth
are all expensive to produce and silently wrong if reused for another model, data set or setting.
This module gives them three guarantees:

* **Fingerprinted.** What produced the data — watched weights (:func:`fingerprint_variables`),
  the data (:func:`fingerprint_dataset`), the settings (:func:`digest`) — is stored beside it and
  checked on every open; a mismatch is a ``ValueError`` naming the keys that differ.
* **Atomic.** Every file is written under a temporary name and renamed into place
  (:func:`atomic_write_bytes`); a whole directory is replaced by :func:`atomic_directory`, which
  keeps the old one until the new one is complete. A process killed at any point leaves either
  the old complete artefact or the new complete one, never a mix.
* **Resumable and checked.** A :class:`ShardStore` holds named shards, each with its SHA-256
  recorded when written; work interrupted half-way resumes by skipping the shards already
  present, and a truncated or bit-flipped shard is reported as corrupt (``ValueError`` naming the
  path), never a raw decoding error.
"""
import contextlib
import functools
import glob
import hashlib
import io
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence

import numpy as np

_MANIFEST = "manifest.json"
_COMPLETE = "complete.json"
_CHECKSUM_SUFFIX = ".sha256"
DIRECTORY_MARKER = ".influence_lib_directory"
# What directories written by version 0.2.0 (before the marker) hold: a ShardStore's manifest (influence-vector
# caches) or the marker of saved influence values and top-k results.
_WRITTEN_BY_0_2 = (_MANIFEST, ".influence_lib_result")


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def digest(value) -> str:
    """SHA-256 (hex) of a JSON-able value, e.g. a settings dict; independent of key order."""
    return hashlib.sha256(_canonical(value).encode("utf-8")).hexdigest()


def _hash_array(hasher, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    hasher.update(f"{array.dtype.str}{array.shape}".encode())
    hasher.update(array.tobytes())


def fingerprint_variables(variables: Sequence) -> str:
    """SHA-256 (hex) over the shapes, dtypes and values of variables (tf or Keras) or arrays, in order."""
    hasher = hashlib.sha256()
    for variable in variables:
        value = variable.numpy() if hasattr(variable, "numpy") else np.asarray(variable)
        _hash_array(hasher, np.asarray(value))
    return hasher.hexdigest()


@functools.cache
def library_fingerprint() -> str:
    """SHA-256 (hex) of the source of the installed ``influence_lib`` (every ``.py`` file, by relative path).

    Results computed by the library (e.g. the faithfulness benchmark's cached attributions) are keyed
    by it, so that a change of code or of a default never silently reuses results of another version.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    hasher = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        hasher.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as handle:
            hasher.update(hashlib.sha256(handle.read()).digest())
    return hasher.hexdigest()


def fingerprint_dataset(dataset: "tf.data.Dataset", batches: int = 2) -> dict:
    """A cheap fingerprint of a batched dataset: its structure, cardinality and its first batches.

    Reads at most ``batches`` batches (never the whole dataset). Two data sets with the same
    structure, size and leading contents but different later samples are not told apart: combine
    with the per-batch sizes a consumer checks while streaming.

    Returns
    -------
    dict
        ``{'element_spec', 'cardinality', 'head_sizes', 'head'}``: the element spec as text, the
        number of batches (``-2`` unknown), the sizes of the first batches and the SHA-256 of their
        contents.
    """
    import tensorflow as tf  # imported here so that writers of plain files need not load TensorFlow

    hasher = hashlib.sha256()
    sizes = []
    for element in dataset.take(batches):
        leaves = tf.nest.flatten(element)
        sizes.append(int(leaves[0].shape[0]) if leaves and leaves[0].shape.rank else 1)
        for leaf in leaves:
            _hash_array(hasher, leaf.numpy())
    return {
        "element_spec": str(dataset.element_spec),
        "cardinality": int(dataset.cardinality()),
        "head_sizes": sizes,
        "head": hasher.hexdigest(),
    }


def _fsync_directory(directory: str) -> None:
    with contextlib.suppress(OSError):
        handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    _fsync_directory(directory)


def atomic_write_json(path: str, value) -> None:
    """Write ``value`` as JSON to ``path`` atomically."""
    atomic_write_bytes(path, json.dumps(value, sort_keys=True, indent=1, default=str).encode("utf-8"))


def read_json(path: str, what: str = "file") -> dict:
    """Read a JSON object written by :func:`atomic_write_json`; a broken file is a clear ``ValueError``."""
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"The {what} at {path!r} is corrupt ({error}); delete it or recompute.") from error
    if not isinstance(value, dict):
        raise ValueError(f"The {what} at {path!r} is corrupt (not a JSON object); delete it or recompute.")
    return value


def recover_directory(path: str) -> None:
    """Finish or roll back a directory swap interrupted by a crash (see :func:`atomic_directory`).

    If ``path`` is missing but a complete previous version (``PATH.old-*``) exists, it is put back;
    left-over temporary directories (``PATH.tmp-*``) of interrupted writes are removed.
    """
    path = os.path.abspath(path)
    if not os.path.exists(path):
        previous = sorted(glob.glob(f"{glob.escape(path)}.old-*"), key=os.path.getmtime)
        if previous:
            os.rename(previous[-1], path)
    for stale in glob.glob(f"{glob.escape(path)}.tmp-*") + glob.glob(f"{glob.escape(path)}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)


def _check_replaceable(path: str, what: str) -> None:
    """Raise unless ``path`` is missing, empty, or a directory influence_lib wrote (its marker, or a 0.2.0 layout)."""
    entries = sorted(os.listdir(path)) if os.path.isdir(path) else []
    if not entries or any(name in entries for name in (DIRECTORY_MARKER, *_WRITTEN_BY_0_2)):
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise ValueError(
        f"{path!r} exists and holds files that are not influence_lib's ({shown}): writing the {what} there would "
        "delete them. Choose a new or empty directory."
    )


@contextlib.contextmanager
def atomic_directory(path: str, what: str = "directory") -> Iterator[str]:
    """Build a directory in a temporary place and swap it in at ``path`` only when complete.

    Yields a fresh temporary directory beside ``path``. On normal exit a marker file
    (:data:`DIRECTORY_MARKER`) is added to it, the old ``path`` (if any) is renamed aside, the new one
    renamed into place, then the old one deleted; on an exception the temporary directory is removed
    and ``path`` is untouched. A kill between the two renames leaves the old version at
    ``PATH.old-*``, which :func:`recover_directory` (called on entry here and by :class:`ShardStore`)
    restores.

    An existing non-empty ``path`` is replaced only if this function wrote it (it holds the marker)
    or version 0.2.0 of the library did (a ``manifest.json`` or a ``.influence_lib_result`` marker):
    a directory of other files is never deleted.

    Parameters
    ----------
    path
        The directory to write.
    what
        What is written, for messages (``"influence-vector cache"``, ...).

    Raises
    ------
    ValueError
        If ``path`` holds files influence_lib did not write (names the path and some of the files).
    OSError
        If ``path`` is a file, or the parent directory cannot be created or written, naming the path.
    """
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"Cannot write to {path!r}: it is a file, not a directory. Choose a directory path.")
    try:
        os.makedirs(parent, exist_ok=True)
        recover_directory(path)
        _check_replaceable(path, what)
        token = uuid.uuid4().hex
        temporary = f"{path}.tmp-{token}"
        os.makedirs(temporary)
    except OSError as error:
        raise OSError(f"Cannot write to {path!r}: {error.strerror or error}. Choose a writable location.") from error
    try:
        yield temporary
        open(os.path.join(temporary, DIRECTORY_MARKER), "w", encoding="utf-8").close()
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    _fsync_directory(temporary)
    old = f"{path}.old-{token}"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(temporary, path)
    _fsync_directory(parent)
    shutil.rmtree(old, ignore_errors=True)


def _file_sha256(path: str) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


class ShardStore:
    """A directory of named ``.npz`` shards with a fingerprint, written atomically and checked on read.

    Parameters
    ----------
    path
        The store's directory (created if missing).
    fingerprint
        JSON-able description of what produces the shards (weights hash, data fingerprint,
        settings). Stored in ``manifest.json`` on creation and compared on every later open.
    what
        What the store holds, for messages (``"influence-vector cache"``, ``"EK-FAC factors"``...).
    overwrite
        Clear an existing store whose fingerprint differs instead of raising.

    Raises
    ------
    ValueError
        The existing store was made by a different setup (names the keys that differ), or its
        manifest is corrupt.
    OSError
        ``path`` is a file, or cannot be created or written.
    """

    def __init__(self, path: str, fingerprint: dict, what: str = "cache", overwrite: bool = False):
        self.path = os.path.abspath(path)
        self.what = what
        self.fingerprint = json.loads(_canonical(fingerprint))
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise OSError(f"The {what} path {self.path!r} is a file, not a directory: pass a directory path.")
        recover_directory(self.path)
        manifest = os.path.join(self.path, _MANIFEST)
        if os.path.exists(manifest):
            stored = read_json(manifest, f"{what} manifest").get("fingerprint")
            if stored != self.fingerprint:
                if not overwrite:
                    raise ValueError(f"The {what} at {self.path!r} was made by a different setup ({self._diff(stored)}). "
                                     "Delete it, choose another path, or pass overwrite=True.")
                shutil.rmtree(self.path)
        elif os.path.isdir(self.path) and os.listdir(self.path):
            raise ValueError(
                f"{self.path!r} exists and is not a {what} (no {_MANIFEST}): choose an empty or new directory."
            )
        try:
            os.makedirs(self.path, exist_ok=True)
            if not os.path.exists(manifest):
                atomic_write_json(manifest, {"fingerprint": self.fingerprint})
        except OSError as error:
            raise OSError(f"Cannot write the {what} at {self.path!r}: {error.strerror or error}.") from error

    def _diff(self, stored) -> str:
        if not isinstance(stored, dict):
            return "unreadable fingerprint"
        keys = sorted(set(stored) | set(self.fingerprint))
        differing = [key for key in keys if stored.get(key) != self.fingerprint.get(key)]
        return "differs in " + ", ".join(
            f"{key}: stored {_short(stored.get(key))} vs now {_short(self.fingerprint.get(key))}" for key in differing
        )

    def _shard(self, name: str) -> str:
        if not name or os.sep in name or name.startswith("."):
            raise ValueError(f"Invalid shard name {name!r}: use a plain file name.")
        return os.path.join(self.path, f"{name}.npz")

    def write(self, name: str, **arrays) -> None:
        """Store ``arrays`` under ``name`` (replacing an existing shard), atomically, with its checksum."""
        buffer = io.BytesIO()
        np.savez(buffer, **{key: np.asarray(value) for key, value in arrays.items()})
        data = buffer.getvalue()
        shard = self._shard(name)
        try:
            atomic_write_bytes(shard, data)
            atomic_write_bytes(shard + _CHECKSUM_SUFFIX, hashlib.sha256(data).hexdigest().encode())
        except OSError as error:
            raise OSError(f"Cannot write the {self.what} shard {shard!r}: {error.strerror or error}.") from error

    def has(self, name: str) -> bool:
        """Whether shard ``name`` was written completely (its checksum is recorded)."""
        shard = self._shard(name)
        return os.path.exists(shard) and os.path.exists(shard + _CHECKSUM_SUFFIX)

    def names(self) -> list[str]:
        """Names of the completely written shards, sorted."""
        return sorted(
            entry[: -len(".npz")]
            for entry in os.listdir(self.path)
            if entry.endswith(".npz") and not entry.startswith(".") and self.has(entry[: -len(".npz")])
        )

    def read(self, name: str) -> dict[str, np.ndarray]:
        """The arrays of shard ``name``; a missing, truncated or altered shard is a clear error."""
        shard = self._shard(name)
        if not self.has(name):
            raise FileNotFoundError(f"The {self.what} at {self.path!r} has no complete shard {name!r}; recompute it.")
        with open(shard + _CHECKSUM_SUFFIX, encoding="utf-8", errors="replace") as handle:
            expected = handle.read().strip()
        if _file_sha256(shard) != expected:
            raise ValueError(
                f"The {self.what} shard {shard!r} is corrupt (checksum mismatch); delete the {self.what} at "
                f"{self.path!r} or recompute."
            )
        try:
            with np.load(shard, allow_pickle=False) as contents:
                return {key: contents[key] for key in contents.files}
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(f"The {self.what} shard {shard!r} is corrupt ({error}); delete it or recompute.") from error

    def mark_complete(self, **info) -> None:
        """Record that every shard is written (with optional JSON-able ``info``)."""
        atomic_write_json(os.path.join(self.path, _COMPLETE), info)

    def completion(self) -> dict | None:
        """The ``info`` given to :meth:`mark_complete`, or ``None`` while the store is incomplete."""
        path = os.path.join(self.path, _COMPLETE)
        return read_json(path, f"{self.what} completion record") if os.path.exists(path) else None

    def clear(self) -> None:
        """Delete every shard and the completion record (keeps the manifest)."""
        for entry in os.listdir(self.path):
            if entry != _MANIFEST:
                full = os.path.join(self.path, entry)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
