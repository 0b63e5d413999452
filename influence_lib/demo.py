"""``make demo``: a short mislabel-detection benchmark on the offline digits dataset.

10% of the training labels of scikit-learn's digits are flipped, an MLP (64 → 128 → 10) is
trained on them, and a few fast methods rank the training samples by how suspicious they are.
Prints the results table and writes JSON and PNG files to ``./demo_output/``. About a minute
on two CPU cores.
"""
import sys

from .benchmark.__main__ import main

DEMO_ARGUMENTS = [
    "--dataset", "digits",
    "--noise", "0.1",
    "--methods", "first_order_exact,tracin,first_order_arnoldi,loss,gradient_norm,random",
    "--seeds", "2",
    "--epochs", "30",
    "--out", "demo_output",
]

if __name__ == "__main__":
    sys.exit(main(DEMO_ARGUMENTS + sys.argv[1:]))
