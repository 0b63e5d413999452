"""Refuse, before starting, work whose memory would not fit: estimate, compare, explain."""
import os
from collections.abc import Iterable

import tensorflow as tf


class InsufficientMemoryError(ValueError, MemoryError):
    """A computation was refused because its estimated memory exceeds what the machine has available."""


def format_bytes(size: float) -> str:
    """``size`` in the largest binary unit that keeps it ≥ 1 (e.g. ``'3.2 GiB'``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def available_memory() -> int | None:
    """Bytes available to a new allocation without swapping, or ``None`` when the system does not say.

    Linux's ``MemAvailable`` (free memory plus reclaimable caches), else the physical memory size.
    """
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def check_memory(required: float, what: str, alternatives: str, available: int | None = None) -> None:
    """Raise :class:`InsufficientMemoryError` if ``required`` bytes exceed the available memory.

    Parameters
    ----------
    required
        Estimated peak bytes of the computation.
    what
        What would be allocated, for the message (e.g. ``"the dense 100180 × 100180 Hessian"``).
    alternatives
        What to use instead, for the message.
    available
        Bytes available; ``None`` asks the operating system.
    """
    available = available_memory() if available is None else available
    if available is not None and required > available:
        raise InsufficientMemoryError(
            f"{what} needs about {format_bytes(required)} of memory but only {format_bytes(available)} is available. "
            f"{alternatives}"
        )


def collect_in_memory(batches: Iterable[tf.Tensor], nb_batches: int | None, what: str, alternatives: str) -> list:
    """``list(batches)``, refusing after the first batch if all ``nb_batches`` would not fit in memory.

    The estimate is the first batch's size times ``nb_batches`` (no check when it is unknown).
    """
    collected = []
    for batch in batches:
        if not collected and nb_batches is not None:
            check_memory(float(batch.numpy().nbytes) * nb_batches, what, alternatives)
        collected.append(batch)
    return collected
