"""Edges a long run meets inside the solvers and operators: NaN inputs, a complex step that
underflows in the parameters' precision, and subnormals in the momentum. Each failed before its fix."""

from __future__ import annotations

import numpy
import pytest

from engine.curvature import HessianCS
from nets import mlp
from solvers import make_solver


def _problem(dtype=numpy.float64):
    model = mlp([6, 5, 6], ["relu", "linear"], "sigmoid_xent", weight_decay=1e-4, name="edge-ae")
    x = numpy.random.default_rng(0).random((12, 6)).astype(dtype)
    return model, x


@pytest.mark.parametrize("name", ["sgd", "adam", "kbfgs", "kfac", "newton_krylov"])
def test_a_nan_batch_is_refused_before_the_parameters_change(name):
    model, x = _problem()
    params = model.init(seed=1, xp=numpy)
    solver = make_solver(name, model)
    state = solver.init(params)
    if solver.needs_warm_start:
        state = solver.warm_start(params, state, [(x, x)])
    before = model.flatten(params).copy()
    bad = x.copy()
    bad[3, 2] = numpy.nan
    with pytest.raises(ValueError, match="holds 1 NaN or infinite value"):
        solver.step(params, state, bad, bad)
    numpy.testing.assert_array_equal(model.flatten(params), before)


@pytest.mark.parametrize("dtype, h", [(numpy.float32, 1e-40), (numpy.float32, 1e-46), (numpy.float64, 1e-320)])
def test_a_complex_step_that_underflows_is_refused(dtype, h):
    model, x = _problem(dtype)
    params = model.init(seed=1, dtype=dtype, xp=numpy)
    with pytest.raises(ValueError, match=f"underflows in {numpy.dtype(dtype).name}"):
        HessianCS(model, params, x, x, h=h)
    HessianCS(model, params, x, x, h=float(numpy.finfo(dtype).tiny) * 10)  # the smallest normal steps still work


@pytest.mark.parametrize("name", ["kbfgs", "kfac", "kbfgs_l"])
def test_subnormals_do_not_stay_in_the_momentum(name):
    """Entries of dead units decay by the momentum factor into the subnormal range (31 and 70 entries
    after 1,200 float32 steps of a small ReLU net, before the fix); they are flushed with the factors."""
    model, x = _problem(numpy.float32)
    params = model.init(seed=1, dtype=numpy.float32, xp=numpy)
    solver = make_solver(name, model)
    state = solver.warm_start(params, solver.init(params), [(x, x)])
    tiny = numpy.finfo(numpy.float32).tiny
    state["m"][:7] = tiny / 4  # as a decaying, dead entry would be
    grads = [numpy.zeros_like(p) for p in params]
    for k in (9, 10):
        state["k"] = k
        solver.momentum_(state, grads)
        if k == 9:
            assert numpy.count_nonzero((state["m"] != 0) & (numpy.abs(state["m"]) < tiny)) == 7
    assert not numpy.any((state["m"] != 0) & (numpy.abs(state["m"]) < tiny))
