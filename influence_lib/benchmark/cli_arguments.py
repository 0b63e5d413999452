"""Argument types and checks of the benchmark command line, argparse style (exit code 2, the flag named).

Every argument is checked when it is parsed, and the output directories before any training, so
that a typo fails in a second rather than after an hour of benchmark.
"""
import argparse
import os
import tempfile


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    return _integer(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An integer ≥ 0."""
    return _integer(text, 0, "an integer ≥ 0")


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number ≥ 0."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number ≥ 0, got {text!r}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _number(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction strictly between 0 and 1, got {text!r}")
    return value


def unit_fraction(text: str) -> float:
    """A number in [0, 1)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def widths(text: str) -> tuple[int, ...]:
    """Comma-separated positive layer widths, e.g. ``128,64`` (empty: no hidden layer)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 128,64, got {text!r}"
        ) from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 128,64, got {text!r}")
    return values


def damping_grid(text: str) -> tuple[float, ...]:
    """Comma-separated damping values ≥ 0, e.g. ``1e-4,1e-3,1e-2``."""
    values = tuple(non_negative_float(part.strip()) for part in text.split(",") if part.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated damping values, got {text!r}")
    return values


def check_writable_directory(parser: argparse.ArgumentParser, path: str, flag: str) -> None:
    """Create ``path`` if needed and check that a file can be written in it; else exit with code 2 naming ``flag``."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
            pass
    except OSError as error:
        parser.error(
            f"argument {flag}: cannot write to {path!r} ({error.strerror or error}); choose a writable directory"
        )
