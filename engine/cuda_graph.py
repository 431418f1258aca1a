"""CUDA graphs for a solver's steady-state step (``cstep train --cuda-graph``; docs/gpu.md).

A K-BFGS / K-BFGS(L) step is a fixed sequence of about 400 kernel launches with no host sync and,
between its periodic flushes, the same Python control flow every iteration: it can be captured
once into a CUDA graph (``cupy.cuda.Stream.begin_capture`` / ``end_capture``) and replayed with
one launch. What makes the replay equal the step:

* **fixed addresses**: the batch is copied into static input buffers before each replay, and the
  step must update the parameters and every state array in place (checked at capture: an entry
  replaced by a new array refuses the graph, naming it);
* **one graph per control flow**: :func:`graph_slot` says which graph iteration ``k`` uses: none at
  k = 0 (the first step inverts A, and may start from the first batch's statistics), "flush"
  where ``k % period == 0`` (the subnormal flush and re-symmetrisation), "steady" otherwise;
* **warm before capture**: a slot's first iteration runs eagerly (it compiles the fused kernels
  and sets up cuBLAS), its second is captured, then replayed from then on;
* **private memory**: each graph's temporaries come from its own memory pool, kept as long as the
  graph, so no allocation outside the graph reuses an address the replay writes.

The step's info scalars are the captured 0-d arrays, rewritten by each replay (the trainer reads
them once per iteration, before the next replay). A batch of another shape runs eagerly.
"""

from __future__ import annotations

import numpy

from .backend import array_module

__all__ = ["graph_slot", "GraphedStep", "CudaGraphUnavailable"]

STEADY, FLUSH = "steady", "flush"


class CudaGraphUnavailable(ValueError):
    """--cuda-graph asked for where it cannot work (NumPy, a solver without a graph period, data parallel)."""


def graph_slot(k: int, period: int) -> str | None:
    """The graph iteration ``k`` (the step counter before the step) replays: None (eager) at k = 0,
    :data:`FLUSH` where ``k % period == 0``, :data:`STEADY` otherwise."""
    if k < 0 or period < 1:
        raise ValueError(f"graph_slot needs k >= 0 and period >= 1, got k={k}, period={period}")
    if k == 0:
        return None
    return FLUSH if k % period == 0 else STEADY


def check_graphable(solver, xp) -> int:
    """The solver's graph period, or :class:`CudaGraphUnavailable` saying why not."""
    if xp is numpy or getattr(xp, "_standin", False) or not hasattr(getattr(xp, "cuda", None), "Stream"):
        raise CudaGraphUnavailable("--cuda-graph needs CuPy on a CUDA device (the arrays here are NumPy's or the "
                                   "stand-in's): drop the option")
    period = getattr(solver, "graph_period", None)
    if period is None:
        raise CudaGraphUnavailable(f"--cuda-graph: the {solver.name} step is not capturable (only K-BFGS and K-BFGS(L) "
                                   "update their state in place with a fixed control flow)")
    if solver.model.parallel.active:
        raise CudaGraphUnavailable("--cuda-graph: data-parallel steps (collectives) are not captured")
    return int(period)


def _addresses(params, state) -> dict:
    out = {f"params[{j}]": p.data.ptr for j, p in enumerate(params)}
    out.update({key: v.data.ptr for key, v in state.items() if hasattr(v, "data") and hasattr(v.data, "ptr")})
    return out


class GraphedStep:
    """``solver.step`` with graph replay of its steady-state and flush iterations (module docstring)."""

    def __init__(self, solver, xp=None):
        self.solver = solver
        self.xp = xp
        self.period = None
        self.graphs: dict = {}     # slot -> (graph, memory pool, captured params, state, info)
        self.seen: set = set()     # slots that ran eagerly once (warm)
        self.inputs = None         # static (x, y) buffers
        self.replays = 0
        self.refused: dict = {}    # slot -> why its step could not be captured (it runs eagerly)

    def __call__(self, params, state, x, y):
        xp = self.xp or array_module(*params)
        if self.period is None:
            self.period = check_graphable(self.solver, xp)
        k = int(state["k"])
        slot = graph_slot(k, self.period)
        if slot is None or not self._fits(x, y):
            return self.solver.step(params, state, x, y)
        if slot not in self.seen:
            self.seen.add(slot)
            return self.solver.step(params, state, x, y)
        if self.inputs is None:  # an autoencoder's target is its input: one buffer, as eagerly
            xb = xp.empty_like(x)
            self.inputs = (xb, xb if y is x else xp.empty_like(y))
        self.inputs[0][...] = x
        if self.inputs[1] is not self.inputs[0]:
            self.inputs[1][...] = y
        if slot not in self.graphs:
            self.graphs[slot] = self._capture(xp, params, state, k)
        if self.graphs[slot] is None:  # not capturable (see self.refused): eager
            return self.solver.step(params, state, x, y)
        graph, _, params_c, state_c, info = self.graphs[slot]
        graph.launch(stream=xp.cuda.get_current_stream())
        self.replays += 1
        state["k"] = k + 1
        return params, state, info

    def _fits(self, x, y) -> bool:
        if self.inputs is None:
            return True
        same = (y is x) == (self.inputs[1] is self.inputs[0])
        return same and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(self.inputs, (x, y)))

    def _capture(self, xp, params, state, k: int):
        """The slot's (graph, pool, params, state, info), or None when the step replaced a state array
        (then the state is restored: the capture ran the step's Python side only)."""
        before, saved = _addresses(params, state), dict(state)
        pool = xp.cuda.MemoryPool()
        stream = xp.cuda.Stream(non_blocking=True)
        stream.wait_event(xp.cuda.get_current_stream().record())
        with xp.cuda.using_allocator(pool.malloc), stream:
            stream.begin_capture()
            try:
                params_c, state_c, info = self.solver.step(params, state, *self.inputs)
            finally:
                graph = stream.end_capture()
        state["k"] = k  # the capture ran the Python side of the step, not its kernels
        after = _addresses(params_c, state_c)
        moved = sorted(name for name, ptr in before.items() if after.get(name) != ptr)
        if moved or params_c is not params or state_c is not state:
            state.clear()
            state.update(saved)
            self.refused[graph_slot(k, self.period)] = f"the step replaced {', '.join(moved) or 'its outputs'}"
            return None
        return graph, pool, params_c, state_c, info
