"""Checks of scalar arguments shared by the calculators and solvers."""
import numpy as np


def positive_int(value, name: str) -> int:
    """``value`` as an ``int`` if it is a positive integer (Python or NumPy); a float such as ``2.7``
    or ``2.0`` is refused rather than truncated.

    Raises
    ------
    ValueError
        Naming the argument and the value received.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer (a count, e.g. 100), got {value!r}.")
    return int(value)
