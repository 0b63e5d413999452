"""Plumbing shared by every method: enums, dataset checks, errors, progress, top-k, caching."""
from .distribute import DataParallel, RowShards, padded_shards, using_strategy
from .enums import CACHE, ORDER
from .errors import NonFiniteError, SingularHessianError
from .memory import InsufficientMemoryError
from .top_k import StreamingTopK, TopK

__all__ = [
    "CACHE",
    "ORDER",
    "DataParallel",
    "InsufficientMemoryError",
    "NonFiniteError",
    "RowShards",
    "SingularHessianError",
    "StreamingTopK",
    "TopK",
    "padded_shards",
    "using_strategy",
]
