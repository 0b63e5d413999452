"""Enumerations shared by every calculator: where influence vectors are cached, and sort order."""
from enum import Enum


class CACHE(Enum):
    """Where the training-side influence vectors are kept between passes.

    MEMORY keeps them in RAM (fastest, memory O(N·D)); DISK writes them with
    ``tf.data.Dataset.save`` and streams them back; NO_CACHE recomputes them for every
    batch of samples to evaluate (memory O(batch), slowest).
    """

    MEMORY = 0
    DISK = 1
    NO_CACHE = 2


class ORDER(Enum):
    """Which end of the ranking a top-k keeps: DESCENDING keeps the largest values."""

    ASCENDING = 1
    DESCENDING = 2
