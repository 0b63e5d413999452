"""kronfluence side of ``kfac_vs_kronfluence.py``: EK-FAC factors and pairwise scores in PyTorch.

Run by the orchestrator with the kronfluence interpreter::

    /work/torchpeers/bin/python benchmarks/kronfluence_side.py WORKDIR WORKLOAD

Reads ``WORKDIR/WORKLOAD.npz`` (data and the Keras weights), builds the same network in PyTorch
(kernels transposed: Keras Dense kernels are ``(in, out)``, torch Linear weights ``(out, in)``;
Keras Conv2D kernels ``(k_h, k_w, c_in, c_out)``, torch ``(c_out, c_in, k_h, k_w)``; activations
permuted to channels-last before flattening so the Dense weights line up), fits EK-FAC with the
empirical Fisher and computes the pairwise scores of the queries against the training set (with
``query_rank``: the exact truncated SVD, ``use_full_svd=True``, as influence_lib; kronfluence's
default is the randomized ``torch.svd_lowrank``). Prints
one JSON line with the timings and writes the scores to ``WORKDIR/WORKLOAD.kronfluence.npy``.
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.task import Task
from torch import nn
from torch.utils.data import TensorDataset


class ChannelsLastFlatten(nn.Module):
    """NCHW → NHWC → flat, the order Keras's Flatten uses on channels_last tensors."""

    def forward(self, inputs):
        return inputs.permute(0, 2, 3, 1).flatten(1)


class Classification(Task):
    """Summed softmax cross-entropy; labels sampled from the model only for the true Fisher."""

    def compute_train_loss(self, batch, model, sample=False):
        inputs, labels = batch
        logits = model(inputs)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(torch.softmax(logits, dim=-1), 1).flatten()
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        inputs, labels = batch
        return F.cross_entropy(model(inputs), labels, reduction="sum")


def build(workload: str, weights: list[np.ndarray]) -> nn.Module:
    """The torch twin of the Keras network of ``kfac_vs_kronfluence.py`` with the Keras weights."""
    if workload == "mlp":
        hidden = weights[0].shape[1]
        model = nn.Sequential(
            nn.Linear(weights[0].shape[0], hidden), nn.ReLU(),
            nn.Linear(hidden, weights[2].shape[1]), nn.ReLU(),
            nn.Linear(weights[2].shape[1], weights[4].shape[1]),
        )
        linears = [model[0], model[2], model[4]]
        for layer, (kernel, bias) in zip(linears, zip(weights[0::2], weights[1::2])):
            layer.weight.data = torch.tensor(kernel.T.copy())
            layer.bias.data = torch.tensor(bias)
        return model
    conv1, conv2 = weights[0], weights[2]
    model = nn.Sequential(
        nn.Conv2d(conv1.shape[2], conv1.shape[3], conv1.shape[0], padding=conv1.shape[0] // 2), nn.ReLU(),
        nn.Conv2d(conv2.shape[2], conv2.shape[3], conv2.shape[0], stride=2), nn.ReLU(),
        ChannelsLastFlatten(),
        nn.Linear(weights[4].shape[0], weights[4].shape[1]),
    )
    for layer, (kernel, bias) in zip([model[0], model[2]], [(weights[0], weights[1]), (weights[2], weights[3])]):
        layer.weight.data = torch.tensor(kernel.transpose(3, 2, 0, 1).copy())
        layer.bias.data = torch.tensor(bias)
    model[5].weight.data = torch.tensor(weights[4].T.copy())
    model[5].bias.data = torch.tensor(weights[5])
    return model


def main() -> None:
    workdir, workload = Path(sys.argv[1]), sys.argv[2]
    data = np.load(workdir / f"{workload}.npz")
    settings = json.loads(str(data["settings"]))
    torch.set_num_threads(settings["threads"])
    weights = [data[f"weight_{index}"] for index in range(int(data["nb_weights"]))]
    to_torch = (lambda x: torch.tensor(x.transpose(0, 3, 1, 2).copy())) if workload == "cnn" else torch.tensor
    train = TensorDataset(to_torch(data["x_train"]), torch.tensor(data["y_train"], dtype=torch.long))
    queries = TensorDataset(to_torch(data["x_query"]), torch.tensor(data["y_query"], dtype=torch.long))
    task = Classification()
    model = prepare_model(build(workload, weights), task)
    analyzer = Analyzer(
        f"{workload}", model, task, cpu=True, disable_tqdm=True, output_dir=str(workdir / "kronfluence_results")
    )
    damping = None if settings["damping"] == "heuristic" else float(settings["damping"])
    start = time.perf_counter()
    analyzer.fit_all_factors(
        "ekfac", train, per_device_batch_size=settings["batch_size"], overwrite_output_dir=True,
        factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
    )
    fitted = time.perf_counter()
    analyzer.compute_pairwise_scores(
        "pairwise", "ekfac", queries, train, per_device_query_batch_size=len(queries),
        per_device_train_batch_size=settings["batch_size"], overwrite_output_dir=True,
        score_args=ScoreArguments(
            damping_factor=damping, query_gradient_low_rank=settings.get("query_rank"), use_full_svd=True
        ),
    )
    scored = time.perf_counter()
    scores = analyzer.load_pairwise_scores("pairwise")["all_modules"].numpy()
    np.save(workdir / f"{workload}.kronfluence.npy", scores)
    print(json.dumps({"side": "kronfluence", "workload": workload, "fit_s": fitted - start, "score_s": scored - fitted}))


if __name__ == "__main__":
    main()
