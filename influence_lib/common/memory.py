"""How much host memory an in-memory cache may take before the library keeps it on disk instead.

The budget is half of the memory the operating system reports as available when it is asked
(``MemAvailable`` of ``/proc/meminfo`` on Linux, free physical pages elsewhere), or the number of
bytes in the environment variable ``INFLUENCE_LIB_MEMORY_BUDGET`` when it is set. On a machine
running several workers (one process per device), each worker asks for itself.
"""
import os
import warnings

BUDGET_VARIABLE = "INFLUENCE_LIB_MEMORY_BUDGET"
AVAILABLE_FRACTION = 0.5


def available_memory_bytes() -> int | None:
    """Memory available to a new allocation without swapping, in bytes; None when it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def memory_budget_bytes() -> int | None:
    """Bytes an in-memory cache may take (None: no limit known).

    Raises
    ------
    ValueError
        If ``INFLUENCE_LIB_MEMORY_BUDGET`` is set to something other than a non-negative integer.
    """
    setting = os.environ.get(BUDGET_VARIABLE)
    if setting is not None:
        if not setting.strip().isdigit():
            raise ValueError(
                f"{BUDGET_VARIABLE} must be a number of bytes (a non-negative integer), got {setting!r}."
            )
        return int(setting)
    available = available_memory_bytes()
    return None if available is None else int(AVAILABLE_FRACTION * available)


def warn_over_budget(what: str, needed: int, budget: int, instead: str, stacklevel: int) -> None:
    """Warn (``RuntimeWarning``) that ``what`` needs ``needed`` bytes, over ``budget``, and what happens instead."""
    warnings.warn(
        f"{what} need up to about {describe_bytes(needed)}, more than the in-memory cache's budget of "
        f"{describe_bytes(budget)}: {instead}. Set {BUDGET_VARIABLE} (bytes) to change the budget.",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def describe_bytes(count: float) -> str:
    """``count`` bytes in the largest binary unit that keeps it ≥ 1 (``'1.5 GiB'``)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


class InsufficientMemoryError(ValueError, MemoryError):
    """A computation was refused because its estimated memory exceeds what the machine has available."""


def check_memory(required: float, what: str, alternatives: str, available: int | None = None) -> None:
    """Raise :class:`InsufficientMemoryError` before a computation whose estimated peak does not fit.

    Parameters
    ----------
    required
        Estimated peak bytes of the computation.
    what
        What would be allocated, for the message (e.g. ``"the dense 100180 × 100180 Hessian"``).
    alternatives
        What to use instead, for the message.
    available
        Bytes available; ``None`` asks the operating system (no check when it does not say).
    """
    available = available_memory_bytes() if available is None else available
    if available is not None and required > available:
        raise InsufficientMemoryError(
            f"{what} needs about {describe_bytes(required)} of memory but only {describe_bytes(available)} is "
            f"available. {alternatives}"
        )
