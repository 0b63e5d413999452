"""What the side-by-side benchmark measures, shared by both sides (NumPy only, no TensorFlow).

Both interpreters — influence_lib on Keras 3 and Influenciae 0.3.0 on legacy Keras 2 — import
this module, read the same ``settings.json`` and the same ``model.npz`` (data, trained weights,
TracIn checkpoints) from the work directory, and write their results in the same layout, so the
orchestrator can compare times and numbers.

Workloads
---------
exact
    Exact first-order self-influence ``g_iᵀ H⁺ g_i`` of every training sample, last layer
    (P = 1290), Hessian averaged over the same training samples on both sides. Timed: building
    H⁺ and the N values.
cg
    Conjugate-gradient IHVP self-influence ``g_iᵀ (H⁻¹ g_i)``, same Hessian, same relative
    tolerance and iteration cap on both sides. Influenciae solves one right-hand side at a time,
    so it is timed on ``cg_subset`` samples and compared per sample.
tracin, tracin_all
    TracIn self-influence ``Σ_c η_c ‖g_i(θ_c)‖²`` over the checkpoints, last layer (P = 1290)
    or all layers (P = 9610).
arnoldi
    Arnoldi self-influence (Schioppa et al. 2022) with the same Krylov dimension and number of
    eigenvalues. Timing only: Influenciae keeps the k *smallest* eigenvalues, so values differ.
"""
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

WORKLOADS = ("exact", "cg", "tracin", "tracin_all", "arnoldi")
# Layers watched by TracIn: the last Dense layer, or both ("tracin_all", start 0 to 1 inclusive).
TRACIN_LAYERS = {"tracin": (-1, None), "tracin_all": (0, 1)}


@dataclass(frozen=True)
class Settings:
    """Sizes and solver settings of one benchmark run (identical on both sides).

    Every workload scores all ``n_samples`` training samples (Influenciae's CG: ``cg_subset``
    of them); the Hessian is averaged over the first ``hessian_samples`` of them on both sides
    (Influenciae's exact Hessian costs about 0.1 s per sample, so all 4096 would take ~10 min).
    Each workload is timed ``repeats`` times in a row on each side, and more (up to
    ``max_repeats``) while its warm runs have taken less than ``warm_budget_seconds`` in all:
    the first run is ``cold`` (it includes tracing), the median of the later runs is ``warm``. Fast
    workloads thus get several warm runs, slow ones (Influenciae's exact Hessian) one.
    CG uses the same relative tolerance on both sides; on this problem (condition number of
    about 10⁴) no right-hand side reaches it within ``cg_max_iterations``, so both sides do
    exactly that many iterations.
    """

    n_samples: int = 4096
    hessian_samples: int = 1024
    input_dim: int = 64
    hidden_units: int = 128
    n_classes: int = 10
    seed: int = 0
    train_epochs: int = 12
    train_batch_size: int = 64
    learning_rate: float = 0.05
    checkpoint_epochs: tuple[int, ...] = (4, 8, 12)
    influence_lib_batch_size: int = 1024
    influenciae_hessian_batch_size: int = 8
    influenciae_batch_size: int = 256
    cg_max_iterations: int = 20
    cg_tolerance: float = 1e-3
    cg_influence_lib_rhs_batch_size: int = 256
    cg_subset: int = 8
    arnoldi_subspace_dim: int = 50
    arnoldi_k: int = 20
    repeats: int = 2
    max_repeats: int = 6
    warm_budget_seconds: float = 3.0

    @classmethod
    def quick(cls) -> "Settings":
        """A smoke-test size that runs in seconds on both sides."""
        return cls(
            n_samples=128,
            hessian_samples=32,
            train_epochs=3,
            checkpoint_epochs=(1, 2, 3),
            influence_lib_batch_size=64,
            influenciae_batch_size=64,
            cg_max_iterations=5,
            cg_influence_lib_rhs_batch_size=64,
            cg_subset=2,
            arnoldi_subspace_dim=10,
            arnoldi_k=5,
            repeats=1,
            max_repeats=1,
        )

    @property
    def nb_params(self) -> int:
        """Parameters of the watched last Dense layer (kernel and bias)."""
        return (self.hidden_units + 1) * self.n_classes

    def save(self, path: Path) -> None:
        """Write the settings as JSON."""
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "Settings":
        """Read settings written by :meth:`save`."""
        raw = json.loads(Path(path).read_text())
        raw["checkpoint_epochs"] = tuple(raw["checkpoint_epochs"])
        return cls(**raw)


def make_data(settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian mixture: one mean per class, unit noise; returns inputs (N, d) and one-hot labels (N, C).

    The class means are close enough that the classes overlap, so the trained model keeps
    non-zero losses and the last-layer Hessian is well defined.
    """
    rng = np.random.default_rng(settings.seed)
    means = rng.normal(0.0, 0.35, size=(settings.n_classes, settings.input_dim))
    labels = rng.integers(0, settings.n_classes, size=settings.n_samples)
    inputs = means[labels] + rng.normal(0.0, 1.0, size=(settings.n_samples, settings.input_dim))
    one_hot = np.eye(settings.n_classes, dtype=np.float32)[labels]
    return inputs.astype(np.float32), one_hot


def load_model_file(workdir: Path) -> dict[str, np.ndarray]:
    """Data, final weights and checkpoint weights written by the preparation step."""
    with np.load(Path(workdir) / "model.npz") as archive:
        return {name: archive[name] for name in archive.files}


def weights_of(arrays: dict[str, np.ndarray], prefix: str = "final") -> list[np.ndarray]:
    """The four weight arrays (kernel, bias, kernel, bias) stored under ``prefix``."""
    return [arrays[f"{prefix}_{index}"] for index in range(4)]


def hessian_part(inputs: np.ndarray, labels: np.ndarray, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """The samples the Hessian is averaged over (the first ``hessian_samples``)."""
    return inputs[: settings.hessian_samples], labels[: settings.hessian_samples]


def checkpoint_prefixes(settings: Settings) -> list[str]:
    """Names under which the TracIn checkpoints are stored."""
    return [f"epoch{epoch}" for epoch in settings.checkpoint_epochs]


def timed(run: Callable[[], np.ndarray], settings: "Settings") -> tuple[np.ndarray, list[float]]:
    """Run ``run`` ``settings.repeats`` times, then again while the warm runs took less than
    ``settings.warm_budget_seconds`` in all (at most ``settings.max_repeats`` runs); return the last
    result and every wall-clock time (seconds).

    The first time includes tracing (``cold``); the later ones reuse the traced graphs (``warm``).
    """
    times = []
    result = None
    while len(times) < settings.repeats or (
        len(times) < settings.max_repeats and sum(times[1:]) < settings.warm_budget_seconds
    ):
        start = time.perf_counter()
        result = np.asarray(run(), dtype=np.float64).reshape(-1)
        times.append(time.perf_counter() - start)
    return result, times


def record(workdir: Path, side: str, workload: str, values: np.ndarray, times: list[float], **extra) -> dict:
    """Save ``values`` as ``<side>_<workload>.npy`` and return the JSON summary of that workload."""
    np.save(Path(workdir) / f"{side}_{workload}.npy", values)
    return {
        "side": side,
        "workload": workload,
        "n_values": int(values.size),
        "cold_seconds": times[0],
        "warm_seconds": float(np.median(times[1:])) if len(times) > 1 else times[0],
        "runs": len(times),
        "checksum": float(np.sum(values)),
        "finite": bool(np.isfinite(values).all()),
        **extra,
    }


def failure(side: str, workload: str, error: Exception) -> dict:
    """JSON summary of a workload that raised: the error type and the first line of its message."""
    message = str(error).strip().splitlines()
    return {"side": side, "workload": workload, "error": f"{type(error).__name__}: {message[0] if message else ''}"}


def agreement(reference: np.ndarray, other: np.ndarray) -> dict:
    """How closely ``other`` reproduces ``reference``.

    Pearson correlation, the largest difference relative to the largest reference value, and
    the median per-sample relative difference (near-zero values make the per-sample maximum
    meaningless, hence the median).
    """
    reference = np.asarray(reference, dtype=np.float64)
    other = np.asarray(other, dtype=np.float64)
    if reference.shape != other.shape or reference.size < 2:
        return {"pearson": float("nan"), "max_diff_over_max": float("nan"), "median_rel_diff": float("nan")}
    difference = np.abs(reference - other)
    return {
        "pearson": float(np.corrcoef(reference, other)[0, 1]),
        "max_diff_over_max": float(difference.max() / max(np.abs(reference).max(), 1e-30)),
        "median_rel_diff": float(np.median(difference / np.maximum(np.abs(reference), 1e-30))),
    }


def parse_workloads(text: str) -> list[str]:
    """Split ``"exact,cg"`` into known workload names, or raise ValueError."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in WORKLOADS]
    if unknown or not names:
        raise ValueError(f"Unknown workloads {unknown}; choose among {', '.join(WORKLOADS)}.")
    return names


def warm_up_tensorflow() -> None:
    """Pay TensorFlow's one-time start-up costs (first graph function, first gradient, first
    Grappler pass) before anything is timed, so that the first workload's ``cold`` time holds its
    own tracing only, like the later workloads'. Plain TensorFlow: the same on both sides."""
    import tensorflow as tf

    weights = tf.Variable(tf.ones((4, 3)))

    @tf.function
    def step(inputs):
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(tf.nn.softmax(inputs @ weights))
        return tape.gradient(loss, weights)

    step(tf.ones((2, 4))).numpy()


def run_all(side: str, runners: dict, names: list[str], settings: "Settings", workdir, skipped: dict | None = None):
    """Time each named workload of one side; yield its JSON summary as soon as it is done.

    ``skipped`` maps workload names that cannot run on this side to the reason. A workload that
    raises is reported as a failure and the others still run.
    """
    skipped = skipped or {}
    warm_up_tensorflow()
    for name in names:
        if name in skipped:
            yield {"side": side, "workload": name, "skipped": skipped[name]}
            continue
        try:
            values, times = timed(runners[name], settings)
        except Exception as error:  # reported by the orchestrator; the other workloads still run
            yield failure(side, name, error)
            continue
        yield record(workdir, side, name, values, times)
