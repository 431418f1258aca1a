"""The small runs the data-parallel tests compare: one builder for the MLP and the CNN cases,
imported by the test (single-process reference, in the pytest process) and by the worker that
``mpiexec`` starts (tests/distributed/worker.py), so both build exactly the same run."""

from __future__ import annotations

import numpy

import data
from engine.app.runs import make_trainer
from engine.parallel import DataParallel
from nets.mlp import autoencoder
from solvers import make_solver
from tests.solvers.test_conv_solvers import tiny_cnn, tiny_data

#: solvers whose trajectories must agree (issue 17) and their settings on these tiny problems
HYPER = {
    "sgd": {"lr": 0.5},
    "adam": {"lr": 1e-2},
    "kfac": {"lr": 0.3, "damping": 0.3, "inverse_freq": 3},
    "kbfgs": {"lr": 0.3, "damping": 0.3},
    "kbfgs_l": {"lr": 0.3, "damping": 0.3, "memory": 4},
}
#: further cases: a name of its own, the solver it runs and its settings
VARIANTS = {"kfac_device_rng": ("kfac", {**HYPER["kfac"], "target_rng": "device"})}
BATCH = 16
ITERATIONS = 20


def dataset(net: str):
    rng = numpy.random.default_rng(5)
    n = BATCH * ITERATIONS
    if net == "mlp":
        return data.Dataset("toy-ae", rng.random((n, 12)), rng.random((BATCH, 12)), description="uniform toy data")
    batches = tiny_data(n_batches=ITERATIONS + 1, n=BATCH, seed=5)  # the conv tests' three classes of images
    x, labels = numpy.concatenate([b[0] for b in batches]), numpy.concatenate([b[1] for b in batches])
    return data.Dataset("toy-img", x[:n], x[n:], labels[:n], labels[n:], description="toy images", n_classes=3)


def model(net: str):
    return autoencoder([12, 6, 3], "sigmoid_xent", weight_decay=1e-4, name="tiny-ae") if net == "mlp" else tiny_cnn()


def trainer(net: str, solver: str, batch: int = BATCH, comm=None, fraction=None, **extra):
    """A float64 trainer of ``solver`` on the ``net`` case (``comm``: the data-parallel communicator,
    ``fraction``: KAISA's grad-worker fraction)."""
    m = model(net)
    if comm is not None:
        m.parallel = DataParallel(comm, grad_worker_fraction=fraction)
    name, hyper = VARIANTS.get(solver, (solver, HYPER.get(solver)))
    s = make_solver(name, m, **{**hyper, **extra})
    return make_trainer(m, s, dataset(net), batch_size=batch, seed=3, dtype=numpy.float64, eval_chunk=BATCH, xp=numpy)
