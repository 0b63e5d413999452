"""Helpers that Influenciae users import from ``deel.influenciae.utils``, each used by the library
itself: top-k search (:class:`LinearNearestNeighbors`, :class:`BatchSort`), linear solves
(:func:`conjugate_gradients_solve`), the Armijo line search of RPS-L2
(:class:`BacktrackingLineSearch`) and Keras / ``tf.data`` helpers."""
from ..common.enums import ORDER
from ..model.influence_model import default_process_batch
from .batch_sort import BatchSort
from .conjugate_gradients import conjugate_gradients_solve
from .line_search import BacktrackingLineSearch, LineSearchStep
from .nearest_neighbors import BaseNearestNeighbors, LinearNearestNeighbors
from .tf_operations import array_to_dataset, dataset_to_tensor, find_layer, is_dataset_batched, split_model

__all__ = [
    "ORDER",
    "BacktrackingLineSearch",
    "BaseNearestNeighbors",
    "BatchSort",
    "LineSearchStep",
    "LinearNearestNeighbors",
    "array_to_dataset",
    "conjugate_gradients_solve",
    "dataset_to_tensor",
    "default_process_batch",
    "find_layer",
    "is_dataset_batched",
    "split_model",
]
