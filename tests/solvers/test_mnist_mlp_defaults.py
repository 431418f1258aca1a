"""The goal of the five baselines (Shampoo, SOAP, Muon, AdaHessian, Sophia-H): ``cstep train --net mnist-mlp``
reaches >= 97% test accuracy in 2 epochs with each solver's documented defaults. The full runs (60000
images, batch 1000, 120 iterations, seeds 9999, 1, 2) are ``benchmarks/mnist_mlp_goal.sh``, which exits 1
if any run ends below 97%, and their figures are in the README. This is the same test on a subset that
the suite can afford, for every one of the five, with the same number of iterations (120): two epochs
over 6000 training images at batch 100, float32, seed 9999's initial weights, one BLAS thread as cstep
trains; accuracy on the first 2000 test images.

What the subset can assert was measured (docs/muon-adahessian-sophia.md section 7): shampoo 0.9140,
soap 0.9255, muon 0.8970, adahessian 0.9130, sophia 0.9055, and Adam with its defaults 0.8955. Muon
reaches 97.5% on the full data and Adam 96.2%, yet they score alike here: at this size the subset cannot
tell a 97% solver from a 96% one, so THRESHOLD is a floor that every default must clear, and the 97%
itself is checked on the full data by the benchmark. Broken defaults fail the floor (measured: Sophia-H
at lr 0.03 0.7760, AdaHessian at lr 1.2 0.1380, Muon at lr 0.1 0.8050, Shampoo at lr 0.05 0.2720, SOAP at lr 0.03 0.8780);
Sophia-H's previous defaults (beta1 0.965, lr 2e-3; 96.30% on the full data) pass it (0.8940).
The floor was 0.88 until Sophia-H's own spread was measured: rounding-level changes of its exact
Hessian-vector products (the three-real-GEMM products and first-order elementwise forms of the
complex-step pass, which move its locked float64 trajectory by 1e-16) took its subset accuracy from
0.9055 to 0.8875 and 0.8775, and other data orders give 0.9035, 0.9035 and 0.8920: its 120-iteration
result spreads by about +-0.015. A floor inside that band would fail by chance, so it is 0.87. Every
broken default above still fails it except SOAP at a tenfold lr (0.8780), which only the full-data
benchmark catches.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy
import pytest
from threadpoolctl import threadpool_limits

import data
import nets
from solvers import make_solver

NAMES = ["shampoo", "soap", "muon", "adahessian", "sophia"]
THRESHOLD = 0.87
MNIST_FILES = [f"mnist/{n}-idx{d}-ubyte.gz" for n, d in
               (("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1))]


def mnist_subset(n_train=6000, n_test=2000):
    base = os.environ.get("CSTEP_DATA_DIR")
    if not base or not all((Path(base) / f).is_file() for f in MNIST_FILES):
        message = "CSTEP_DATA_DIR does not hold MNIST; point it at the shared data folder (e.g. ../shared/data)"
        if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
            pytest.fail(f"CI=true requires the real data: {message}", pytrace=False)
        pytest.skip(message)
    return data.load("mnist-classify", data_dir=base, n_train=n_train, n_test=n_test)


def subset_accuracy(name: str, **hyper) -> float:
    ds = mnist_subset()
    model = nets.build("mnist-mlp")
    solver = make_solver(name, model, **hyper)
    params = model.init(seed=9999, dtype=numpy.float32, xp=numpy)
    state = solver.init(params)
    rng = numpy.random.default_rng(0)
    with threadpool_limits(1):  # as cstep trains (engine/app/options.py DEFAULT_THREADS); faster on a shared machine
        for _ in range(2):
            order = rng.permutation(len(ds.x_train))
            for i in range(0, len(order), 100):
                batch = order[i:i + 100]
                params, state, info = solver.step(params, state, ds.x_train[batch], ds.y_train[batch])
        return float(numpy.mean(model.predict(params, ds.x_test).argmax(axis=1) == ds.y_test))


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_trains_mnist_mlp_with_its_defaults(name):
    accuracy = subset_accuracy(name)
    print(f"\n[mnist-mlp subset, 2 epochs of 6000 images] {name}: test accuracy {accuracy:.4f}")
    assert accuracy >= THRESHOLD, f"{name}: test accuracy {accuracy:.4f} < {THRESHOLD} after 2 epochs of 6000 examples"


if __name__ == "__main__":  # pragma: no cover - the calibration: python -m tests.solvers.test_mnist_mlp_defaults
    import sys
    for arg in sys.argv[1:] or NAMES + ["adam"]:
        solver, _, rest = arg.partition(":")
        hyper = {k: (v if v.isalpha() else float(v)) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
        print(f"{arg}: {subset_accuracy(solver, **hyper):.4f}", flush=True)
