"""The traker 0.3.2 side of ``trak_vs_traker.py`` (run with the PyTorch peers' interpreter).

Usage: ``python traker_side.py INPUT.npz OUTPUT.npz PROJ_DIM BATCH_SIZE``. ``INPUT.npz`` holds the
data and the Keras weights of the MLP (``kernel_i`` of shape (in, out), ``bias_i``); they are copied
into a torch MLP (``Linear.weight`` is (out, in): the kernels are transposed). Scores TRAK with
``BasicProjector`` (Rademacher, one block: the matrix is generated once and kept — its fastest
setting; regenerated once after ``finalize_features``, which frees it) on the CPU,
full precision, and writes ``scores`` (n_test, n_train) and ``seconds`` (featurize + finalize +
score, the model already built).
"""
import sys
import tempfile
import time

import numpy as np
import torch
from trak import TRAKer
from trak.projectors import BasicProjector, ProjectionType


def main(source: str, target: str, proj_dim: int, batch_size: int) -> None:
    data = np.load(source)
    nb_layers = sum(1 for key in data.files if key.startswith("kernel_"))
    layers = []
    for index in range(nb_layers):
        kernel, bias = data[f"kernel_{index}"], data[f"bias_{index}"]
        linear = torch.nn.Linear(*kernel.shape)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(kernel.T.copy()))
            linear.bias.copy_(torch.from_numpy(bias))
        layers += [linear, torch.nn.ReLU()] if index < nb_layers - 1 else [linear]
    model = torch.nn.Sequential(*layers).eval()
    x_train, y_train = torch.from_numpy(data["x_train"]), torch.from_numpy(data["y_train"]).long()
    x_test, y_test = torch.from_numpy(data["x_test"]), torch.from_numpy(data["y_test"]).long()
    nb_params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        projector = BasicProjector(nb_params, proj_dim, seed=0, proj_type=ProjectionType.rademacher,
                                   device="cpu", block_size=proj_dim)
        traker = TRAKer(model=model, task="image_classification", train_set_size=len(x_train), save_dir=directory,
                        device="cpu", projector=projector, proj_dim=proj_dim, use_half_precision=False,
                        logging_level=40)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for first in range(0, len(x_train), batch_size):
            batch = (x_train[first : first + batch_size], y_train[first : first + batch_size])
            traker.featurize(batch=batch, num_samples=len(batch[0]))
        traker.finalize_features()
        # finalize_features frees the one-block matrix and project() only regenerates it for a new
        # model id (traker 0.3.2): regenerate it, so that scoring uses the same matrix
        projector.generate_sketch_matrix(projector.generator_states[0])
        traker.start_scoring_checkpoint(exp_name="test", checkpoint=model.state_dict(), model_id=0,
                                        num_targets=len(x_test))
        for first in range(0, len(x_test), batch_size):
            batch = (x_test[first : first + batch_size], y_test[first : first + batch_size])
            traker.score(batch=batch, num_samples=len(batch[0]))
        scores = np.array(traker.finalize_scores(exp_name="test")).T
    np.savez(target, scores=scores, seconds=time.perf_counter() - start)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
