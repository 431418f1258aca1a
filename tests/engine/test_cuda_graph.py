"""engine.cuda_graph (``--cuda-graph``): which graph an iteration replays, the refusals, the in-place
state a replay needs, and (on a real CUDA device only) the replayed run against the eager one."""

import contextlib
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


# --- the bookkeeping of GraphedStep, on a fake device whose "graph" records the captured step -----------
class _Ptr:
    def __init__(self, ptr):
        self.ptr = ptr


class _Array:
    """Just what GraphedStep touches: shape, dtype, an address, ``[...] =``."""
    _next = [1]

    def __init__(self, shape=(2,), dtype=numpy.float32):
        self.shape, self.dtype = shape, numpy.dtype(dtype)
        self.data = _Ptr(self._next[0])
        self._next[0] += 1
        self.value = None

    def __setitem__(self, key, value):
        self.value = value


def _fake_device(log):
    class Graph:
        def __init__(self, replay):
            self.replay = replay

        def launch(self, stream=None):
            log.append("launch")
            self.replay()

    class Stream:
        def __init__(self, non_blocking=False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def wait_event(self, event):
            pass

        def record(self):
            return None

        def begin_capture(self):
            log.append("capture")
            device.capturing = []

        def end_capture(self):
            steps, device.capturing = device.capturing, None
            return Graph(lambda: [f() for f in steps])

    cuda = types.SimpleNamespace(Stream=Stream, MemoryPool=lambda: types.SimpleNamespace(malloc=None),
                                 using_allocator=lambda malloc: contextlib.nullcontext(),
                                 get_current_stream=lambda: Stream())
    device = types.SimpleNamespace(cuda=cuda, capturing=None, empty_like=lambda a: _Array(a.shape, a.dtype))
    return device


class _FakeSolver:
    """A step whose device work is one recorded "kernel" (counting the steps the device ran); with
    ``replace`` it swaps in a new state array on flush steps, as K-BFGS's flush once did."""
    name, graph_period = "fake", 10
    model = types.SimpleNamespace(parallel=types.SimpleNamespace(active=False))

    def __init__(self, device, log, replace=False):
        self.device, self.log, self.replace, self.ran = device, log, replace, []

    def step(self, params, state, x, y):
        k = int(state["k"])
        work = lambda: self.ran.append(k)  # noqa: E731 (the kernel: k baked in, as a graph bakes its scalars)
        if self.device.capturing is not None:
            self.device.capturing.append(work)
        else:
            self.log.append(f"eager {k}")
            work()
        if self.replace and k % 10 == 0:
            state["H"] = _Array()
        state["k"] = k + 1
        return params, state, {"loss": k}


@pytest.mark.parametrize("replace", [False, True], ids=["in-place", "flush-replaces-an-array"])
def test_graphed_step_bookkeeping(replace):
    log = []
    device = _fake_device(log)
    solver = _FakeSolver(device, log, replace)
    step = GraphedStep(solver, device)
    params, state, x = [_Array()], {"k": 0, "H": _Array()}, _Array((4, 3))
    H = state["H"]
    for _ in range(23):
        params, state, _ = step(params, state, x, x)
    assert state["k"] == 23
    # eager at k = 0 and at each slot's first use (1, 10), captured at its second (2, 20), replayed after
    assert log[:4] == ["eager 0", "eager 1", "capture", "launch"]
    assert log.count("capture") == 2
    if not replace:
        assert log.count("launch") == 23 - 3 and step.replays == 20 and not step.refused
        assert solver.ran == [0, 1] + [2] * 8 + [10] + [2] * 9 + [20] * 1 + [2] * 2  # what the device ran
    else:  # the flush graph is refused (state restored, eager); the steady one still replays
        assert step.refused == {FLUSH: "the step replaced H"} and "eager 20" in log
        assert state["H"] is not H and step.replays == 8 + 9 + 2
