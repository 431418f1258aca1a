"""engine.cuda_graph (``--cuda-graph``): which graph an iteration replays, the refusals, the in-place
state a replay needs, and (on a real CUDA device only) the replayed run against the eager one."""

import types

import numpy
import pytest

from engine.cuda_graph import FLUSH, STEADY, CudaGraphUnavailable, GraphedStep, check_graphable, graph_slot
from solvers import make_solver
from tests.solvers import test_solvers as mlp_case


def test_graph_slot_of_each_iteration():
    # k = 0 eager (A inverted, first batch's statistics), the flushes k = 10, 20, ... their own graph
    expected = [None] + [FLUSH if k in (10, 20) else STEADY for k in range(1, 25)]
    assert [graph_slot(k, 10) for k in range(25)] == expected
    assert [graph_slot(k, 1) for k in range(4)] == [None, FLUSH, FLUSH, FLUSH]
    with pytest.raises(ValueError):
        graph_slot(-1, 10)
    with pytest.raises(ValueError):
        graph_slot(3, 0)


def test_refused_on_numpy_on_the_standin_and_for_other_solvers():
    model, _, solver, _, _ = mlp_case.start("kbfgs")
    with pytest.raises(CudaGraphUnavailable, match="needs CuPy on a CUDA device"):
        check_graphable(solver, numpy)
    with pytest.raises(CudaGraphUnavailable, match="stand-in"):
        check_graphable(solver, types.SimpleNamespace(_standin=True, cuda=types.SimpleNamespace(Stream=object)))
    device = types.SimpleNamespace(cuda=types.SimpleNamespace(Stream=object))
    assert check_graphable(solver, device) == 10
    assert check_graphable(make_solver("kbfgs_l", model), device) == 10
    with pytest.raises(CudaGraphUnavailable, match="adam step is not capturable"):
        check_graphable(make_solver("adam", model), device)


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_l"])
def test_steps_past_the_first_update_every_state_array_in_place(name, xp):
    """What a replay relies on: from k = 1 on (steady and flush steps alike) every array of the state
    and the parameters stay the same objects (a replaced one would be read stale by the graph)."""
    model, data, solver, params, state = mlp_case.start(name, xp=xp)
    params, state, _ = solver.step(params, state, *data[0])  # k = 0: eager in graph mode
    arrays = {key: v for key, v in state.items() if hasattr(v, "shape")}
    ids = {key: id(v) for key, v in arrays.items()}
    param_ids = [id(p) for p in params]
    for k in range(1, 22):  # includes the flushes at k = 10 and 20
        params, state, _ = solver.step(params, state, *data[k % len(data)])
        assert [id(p) for p in params] == param_ids
        replaced = [key for key in ids if id(state[key]) != ids[key]]
        assert not replaced, f"k={k}: {replaced}"


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_l"])
def test_replayed_run_equals_the_eager_run(name, cupy_only):
    """Real CUDA device only: 25 iterations with graph replay (steady and flush graphs) give the eager run's losses."""
    xp = cupy_only
    if getattr(xp, "_standin", False):
        pytest.skip("CUDA graphs need a real device (the stand-in cannot capture)")
    runs = []
    for graphed in (False, True):
        model, data, solver, params, state = mlp_case.start(name, dtype=numpy.float32, xp=xp)
        step = GraphedStep(solver, xp) if graphed else solver.step
        losses = []
        for k in range(25):
            params, state, info = step(params, state, *data[k % len(data)])
            losses.append(float(info["loss"]))
        runs.append(losses)
        if graphed:
            assert step.replays >= 20 and not step.refused, step.refused
    numpy.testing.assert_allclose(runs[1], runs[0], rtol=1e-6)
