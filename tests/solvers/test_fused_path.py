"""The fused path against the unfused NumPy path: the same float32 losses over 20 iterations.

On the device every hot elementwise chain of a step runs as one fused kernel (engine.fuse); on
NumPy the same formulas run op by op (and the numba kernels of engine.curvature.kernels take the
O(d^2) factor updates). Twenty float32 iterations of each solver the launch budgets cover
(tests/solvers/test_sync_budget.py) must give the NumPy run's losses to float32 rounding: on the
CuPy stand-in, where NumPy evaluates the traced kernels, they agree to within an ulp or two (the
numba kernels round a few products differently); on a GPU the tolerance allows the different
summation orders of the device's reductions and GEMMs.
"""

from __future__ import annotations

import numpy
import pytest

from engine.fuse import unfused
from nets import mlp
from solvers import make_solver
from tests.solvers.common import host_float

STEPS = 20
SOLVERS = {"kbfgs": {"lr": 0.3, "damping": 0.3}, "kbfgs_l": {"lr": 0.3, "damping": 0.3, "memory": 5},
           "kfac": {"lr": 0.2, "damping": 0.3, "inverse_freq": 3}, "adam": {"lr": 1e-2}, "sgd": {"lr": 0.1}}


def losses(name: str, xp) -> list[float]:
    # ReLU, sigmoid and linear units and the sigmoid cross-entropy: every fused activation and the loss
    model = mlp([16, 12, 6, 12, 16], ["relu", "sigmoid", "relu", "linear"], "sigmoid_xent", weight_decay=1e-4, name="fused-ae")
    rng = numpy.random.default_rng(11)
    batches = [xp.asarray(b) for b in rng.random((4, 40, 16), dtype=numpy.float32)]
    params = model.init(seed=3, dtype=numpy.float32, xp=xp)
    solver = make_solver(name, model, **SOLVERS[name])
    state = solver.init(params)
    if solver.needs_warm_start:
        state = solver.warm_start(params, state, [(b, b) for b in batches])
    out = []
    for k in range(STEPS):
        x = batches[k % len(batches)]
        params, state, info = solver.step(params, state, x, x)
        out.append(host_float(info["loss"]))
    return out


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_fused_path_gives_the_numpy_losses(name, cupy_only):
    fused_run = losses(name, cupy_only)
    with unfused():
        plain_device = losses(name, cupy_only)
    numpy_run = losses(name, numpy)
    assert all(numpy.isfinite(fused_run)) and fused_run[-1] < fused_run[0]
    eps = float(numpy.finfo(numpy.float32).eps)
    tol = 4 * eps if getattr(cupy_only, "_standin", False) else 100 * eps
    numpy.testing.assert_allclose(fused_run, numpy_run, rtol=tol, atol=0)
    numpy.testing.assert_allclose(plain_device, numpy_run, rtol=tol, atol=0)
