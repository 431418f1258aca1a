"""solvers.kronecker_solver: the base K-FAC, K-BFGS and K-BFGS(L) share (DESIGN.md convention 5).

The state keys come from one function; the step is the block operator's solve of the momentum
(through :class:`engine.curvature.KroneckerBlockOperator`), -alpha m outside Kronecker layers.
"""

from __future__ import annotations

import numpy
import pytest

from engine.curvature import KroneckerBlockOperator
from solvers.kronecker_solver import KroneckerSolver, layer_key
from tests.solvers import test_conv_solvers as conv
from tests.solvers import test_solvers as mlp_case
from tests.solvers.common import copy_state, to_np, twin

KRONECKER = ["kbfgs", "kbfgs_l", "kfac"]
STARTS = {"mlp": mlp_case.start, "cnn": lambda name, xp: conv.start(name, xp=xp)}


def test_layer_key_is_the_one_key_format():
    assert layer_key(3, "H_g") == "layer3/H_g"
    assert layer_key(12, "lbfgs/") + "S" == "layer12/lbfgs/S"


@pytest.mark.parametrize("net", sorted(STARTS))
@pytest.mark.parametrize("name", KRONECKER)
def test_per_layer_state_is_keyed_by_layer_key(name, net):
    model, data, solver, params, state = STARTS[net](name, xp=numpy)
    assert isinstance(solver, KroneckerSolver)
    params, state, _ = solver.step(params, state, *data[0])
    per_layer = {key for key in state if key.startswith("layer")}
    names = {key.split("/", 1)[1] for key in per_layer}
    assert per_layer == {layer_key(i, n) for i in solver.kron for n in names}
    assert set(state) - per_layer == ({"k", "warm_started", "m", "rng"} if name == "kfac" else {"k", "warm_started", "m"})
    assert solver.spatial == {i for i in solver.kron if model.layers[i].spatial}


def kfac_step_run(xp, net):
    """A K-FAC step is theta - alpha solve(m) with the step operator of the state it leaves."""
    model, data, solver, params, state = STARTS[net]("kfac", xp=xp)
    before = to_np(model.flatten(params))
    params, state, info = solver.step(params, state, *data[0])
    op = solver.step_operator(copy_state(state))
    assert isinstance(op, KroneckerBlockOperator) and op.inverse and op.order == "left_first"
    direction = to_np(op.solve(state["m"]))
    numpy.testing.assert_allclose(before - to_np(model.flatten(params)), solver.lr * direction, rtol=1e-12, atol=1e-15)
    numpy.testing.assert_allclose(float(to_np(info["step_norm"])), solver.lr * numpy.linalg.norm(direction), rtol=1e-12)
    return {"params": model.flatten(params), "step_norm": info["step_norm"]}


@pytest.mark.parametrize("net", sorted(STARTS))
def test_kfac_step_is_the_block_solve_of_the_momentum(net, xp):
    twin(xp, kfac_step_run, net)
