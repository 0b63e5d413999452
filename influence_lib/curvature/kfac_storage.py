"""Save, reload and resume K-FAC / EK-FAC factors through :class:`~influence_lib.common.storage.ShardStore`.

The store at ``factors_path`` is fingerprinted by every weight of the Keras model (the factors
depend on all of them through the layer inputs and output gradients), the watched layers, the
training data (:func:`~influence_lib.common.storage.fingerprint_dataset`: structure, size and the
first batches) and the settings (method, Fisher, seed); another setup raises a ``ValueError``
naming what differs. Each stage writes one shard per layer as soon as it is done:

* ``covariance_LLL`` — ``A`` and ``S`` (first data pass);
* ``eigenbasis_LLL`` — ``Q_A``, ``Q_S`` and K-FAC's eigenvalues ``a sᵀ`` (float64 eigh);
* ``corrected_LLL`` — EK-FAC's eigenvalues (second data pass).

A fit interrupted after a stage resumes from it: completed stages are read back instead of
recomputed. A data pass is the unit of work: an interrupted pass restarts.
"""
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..common.storage import ShardStore, fingerprint_dataset, fingerprint_variables

if TYPE_CHECKING:
    from .kfac import KFACIHVP


@dataclass
class LayerFactors:
    """The Kronecker factors of one layer (float64).

    Attributes
    ----------
    a_covariance
        ``A``, ``(d_a, d_a)``; for an Embedding its diagonal ``(d_a,)`` (mean token counts).
    s_covariance
        ``S``, ``(d_s, d_s)``.
    a_eigenvectors
        ``Q_A`` (``None`` for a diagonal ``A``: the identity).
    s_eigenvectors
        ``Q_S``.
    eigenvalues
        ``Λ``, ``(d_a, d_s)``: ``a sᵀ`` for K-FAC, the corrected eigenvalues for EK-FAC.
    """

    a_covariance: np.ndarray
    s_covariance: np.ndarray
    a_eigenvectors: np.ndarray | None
    s_eigenvectors: np.ndarray
    eigenvalues: np.ndarray


def factors_fingerprint(ihvp: "KFACIHVP") -> dict:
    """What determines the factors: the model's weights, the watched layers, the data and the settings."""
    return {
        "model_weights": fingerprint_variables(ihvp.model.model.weights),
        "watched_layers": [block.layer.name for block in ihvp.blocks],
        "data": fingerprint_dataset(ihvp.train_set),
        "settings": ihvp.settings(),
    }


def _names(stage: str, count: int) -> list[str]:
    return [f"{stage}_{index:03d}" for index in range(count)]


def fit_with_store(ihvp: "KFACIHVP", path: str, overwrite: bool = False) -> list[LayerFactors]:
    """The factors of ``ihvp``, read from the store at ``path`` where present, else computed and written."""
    store = ShardStore(path, factors_fingerprint(ihvp), what=f"{ihvp.method.upper()} factors", overwrite=overwrite)
    count = len(ihvp.blocks)
    covariance_names = _names("covariance", count)
    if all(store.has(name) for name in covariance_names):
        covariances = [(shard["a"], shard["s"]) for shard in map(store.read, covariance_names)]
    else:
        covariances = ihvp.fit_covariances()
        for name, (a, s) in zip(covariance_names, covariances):
            store.write(name, a=a, s=s)
    factors = []
    for block, name, (a, s) in zip(ihvp.blocks, _names("eigenbasis", count), covariances):
        if store.has(name):
            shard = store.read(name)
            a_vectors = None if block.diagonal_input else shard["a_eigenvectors"]
            factors.append(LayerFactors(a, s, a_vectors, shard["s_eigenvectors"], shard["eigenvalues"]))
            continue
        layer_factors = ihvp.decompose(block, a, s)
        a_vectors = np.zeros((0, 0)) if layer_factors.a_eigenvectors is None else layer_factors.a_eigenvectors
        store.write(
            name, a_eigenvectors=a_vectors, s_eigenvectors=layer_factors.s_eigenvectors,
            eigenvalues=layer_factors.eigenvalues,
        )
        factors.append(layer_factors)
    if ihvp.corrected_eigenvalues:
        corrected_names = _names("corrected", count)
        if all(store.has(name) for name in corrected_names):
            corrected = [store.read(name)["eigenvalues"] for name in corrected_names]
        else:
            corrected = ihvp.fit_eigenvalues(factors)
            for name, eigenvalues in zip(corrected_names, corrected):
                store.write(name, eigenvalues=eigenvalues)
        for layer_factors, eigenvalues in zip(factors, corrected):
            layer_factors.eigenvalues = eigenvalues
    store.mark_complete(layers=[block.layer.name for block in ihvp.blocks])
    return factors
