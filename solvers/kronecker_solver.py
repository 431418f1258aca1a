"""The Kronecker-factored solvers' shared base: K-FAC, K-BFGS and K-BFGS(L) (DESIGN.md convention 5).

What the three share, as the K-BFGS reference code runs them (docs/kbfgs.md sections 4.2, 4.7 and 6):

* the Kronecker layers (:class:`engine.layers.KroneckerLayer`: Dense, Conv2d), which of them are
  ``spatial`` (Conv2d: one row per example and location), and the parameters outside them;
* the state record: ``k``, ``warm_started``, the flat momentum ``m`` and per Kronecker layer the
  factor arrays, under keys built by :func:`layer_key` alone (``layer{i}/{name}``);
* the warm start: per-layer statistics of one pass over the data at the initial weights,
  averaged over the batches (A for K-BFGS; A and G for K-FAC), subnormals flushed (docs/kbfgs.md pitfall 19);
* the EMA momentum m <- rho m + (1 - rho) g, no bias correction (section 4.7);
* the step through the curvature-operator interface: the subclass builds, from its state, the
  :class:`engine.curvature.KroneckerBlockOperator` of its inverse factors (:meth:`step_factors`,
  in its floating-point ``block_order``), whose :meth:`~engine.curvature.KroneckerBlockOperator.
  solve_blocks` gives per layer P = C_l^{-1} M^ of the momentum M^ = [m_W | m_b]; then
  W~ <- W~ - alpha P, and theta <- theta - alpha m for the parameters of no Kronecker layer.

The factor statistics, their EMAs and the convolution scaling live with the factors in
:mod:`engine.curvature.kronecker`; nothing is kept on the solver object between steps.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy

from engine.backend import array_module
from engine import host_kernels
from engine.fuse import fused
from engine.curvature.kronecker import KroneckerBlockOperator, flush_subnormals_
from engine.layers import KroneckerLayer

from .base import Solver
from .kaisa import KaisaPlan

__all__ = ["KroneckerSolver", "layer_key", "kron_layers", "check_real_params"]


def layer_key(layer: int, name: str) -> str:
    """The state key of a per-layer entry, ``layer{i}/{name}``: the one place such keys are built.

    ``layer_key(3, "H_g") == "layer3/H_g"``; a name ending in "/" gives a prefix (K-BFGS(L)'s
    ``layer{i}/lbfgs/`` fields).
    """
    return f"layer{layer}/{name}"


def check_real_params(name: str, params) -> None:
    if not params or params[0].dtype.kind != "f":
        kind = params[0].dtype if params else "no parameters"
        raise TypeError(f"{name} trains real float32/float64 parameters, got {kind}; complex parameters are for curvature passes")


def kron_layers(name: str, model) -> list[int]:
    """Indices of the model's Kronecker layers, each a :class:`engine.layers.KroneckerLayer` (Dense, Conv2d).

    Every such layer exposes the same Kronecker view (``d_in``, ``d_out``, ``kron_rows``,
    ``to_matrix``, ``from_matrix``), so factors are sized (d_in + 1)^2 and d_out^2 for any: for
    Conv2d d_in = C_in kh kw (a patch) and d_out = C_out, with one row per (example, location)
    (KFC, Grosse & Martens 2016; :class:`engine.conv.Conv2d`).
    """
    layers = model.kron_layers
    if not layers:
        raise ValueError(f"{name} needs a model with Dense layers or Conv2d layers; {model.name} has none")
    other = [i for i in layers if not isinstance(model.layers[i], KroneckerLayer)]
    if other:
        raise ValueError(f"{name} has Kronecker factors for KroneckerLayer kinds, i.e. Dense and Conv2d layers only; layer {other[0]} "
                         f"({model.layers[other[0]]!r}) claims a Kronecker view without that contract; use a solver without "
                         "Kronecker factors for it")
    return layers


#: Subnormal entries of the EMA'd factors and of the momentum are flushed, and the inverse factors
#: re-symmetrised, every this many iterations (docs/kbfgs.md pitfalls 19 and 16): an entry decaying by 0.9
#: per step spends at most this many steps subnormal, and a pass over all of them every step would
#: cost ~1.5% of an MNIST iteration.
FLUSH_EVERY = 10


class KroneckerSolver(Solver):
    """Base of K-FAC, K-BFGS and K-BFGS(L); subclasses give the per-layer factors and the step.

    Subclass hooks: :meth:`init_layer` (the per-layer state entries), :meth:`batch_statistics`
    (one warm-start batch), :meth:`step_factors` (the inverse-factor pair of a block) and
    ``block_order``. Hyper-parameters every subclass declares: ``lr``, ``damping``,
    ``momentum``, ``flush_subnormals``.
    """

    needs_warm_start = True
    reference_draws_per_batch = 1
    #: the floating-point order of the step's block products (KroneckerBlockOperator ``order``)
    block_order: ClassVar[str] = "left_first"

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        self.kron = kron_layers(self.name, model)
        self.spatial = {i for i in self.kron if model.layers[i].spatial}
        self.sqrt_damping = math.sqrt(self.damping)
        kron_params = {model.layer_param_index[i] + j for i in self.kron for j in range(len(model.layers[i].param_shapes()))}
        self.other_params = [k for k in range(len(model.shapes)) if k not in kron_params]
        self._plan = None  # KAISA's factor-work plan, made on first use in a data-parallel run (solvers/kaisa.py)

    # --- hooks --------------------------------------------------------------------------------
    def init_layer(self, layer, xp, dtype) -> dict:
        """The initial per-layer state entries ``{name: array}`` of a Kronecker layer."""
        raise NotImplementedError

    def global_state(self) -> dict:
        """State entries beside ``k``, ``warm_started`` and ``m`` (none by default)."""
        return {}

    def batch_statistics(self, params, x) -> list[dict]:
        """Per Kronecker layer, ``{state name: statistic}`` of one warm-start batch."""
        raise NotImplementedError

    def step_factors(self, state, i) -> tuple:
        """(left, right) inverse factors of layer ``i``'s block: the step is left M^ right."""
        raise NotImplementedError

    def factor_cost(self, i) -> float:
        """KAISA's load-balance weight of layer ``i``'s factor work: the factors' sizes."""
        layer = self.model.layers[i]
        return float((layer.d_in + 1) ** 2 + layer.d_out ** 2)

    def step_keys(self, state, i) -> list:
        """The state keys of layer ``i`` that the step's preconditioner reads."""
        raise NotImplementedError

    # --- KAISA (solvers/kaisa.py) ---------------------------------------------------------------
    def factor_plan(self) -> KaisaPlan | None:
        """The KAISA plan of a data-parallel run with a grad-worker fraction (``model.parallel.
        grad_worker_fraction``); None when every rank does all the factor work itself."""
        parallel = self.model.parallel
        fraction = getattr(parallel, "grad_worker_fraction", None)
        if not parallel.active or fraction is None:
            return None
        if self._plan is None or self._plan.comm is not parallel.comm or self._plan.fraction != fraction:
            self._plan = KaisaPlan(parallel.comm, {i: self.factor_cost(i) for i in self.kron}, fraction)
        return self._plan

    def gather_state(self, state) -> dict:
        """Every layer's state entries from the rank that owns its factor work, on every rank: what a
        checkpoint needs (collective; a no-op unless KAISA spreads the work)."""
        plan = self.factor_plan()
        if plan is not None:
            plan.gather(state, lambda i: [k for k in state if k.startswith(layer_key(i, ""))])
        return state

    # --- contract -----------------------------------------------------------------------------
    def init(self, params) -> dict:
        check_real_params(self.name, params)
        xp = array_module(*params)
        dtype = params[0].dtype
        state = {"k": 0, "warm_started": False, "m": xp.zeros(self.model.n_params, dtype=dtype), **self.global_state()}
        for i in self.kron:
            for name, value in self.init_layer(self.model.layers[i], xp, dtype).items():
                state[layer_key(i, name)] = value
        return state

    def warm_start(self, params, state, batches) -> dict:
        """Per-layer statistics averaged over one pass over the data at the initial weights (docs/kbfgs.md
        section 4.2; section 6 for K-FAC). ``batches`` yields (x, y) pairs covering one epoch."""
        return self.average_statistics(params, state, batches, self.batch_statistics)

    def average_statistics(self, params, state, batches, statistics) -> dict:
        """state[layer i / name] <- mean over ``batches`` of ``statistics(params, x)``, flushed."""
        sums, count = None, 0
        for x, _ in batches:
            stats = self.model.parallel.mean_tree(statistics(params, x))  # the global batch's (data parallel)
            if sums is None:
                sums = stats
            else:
                for acc, new in zip(sums, stats):
                    for name in acc:
                        acc[name] += new[name]
            count += 1
        if count == 0:
            raise ValueError(f"{self.name}.warm_start got no batches; pass one epoch of (x, y) minibatches")
        for i, acc in zip(self.kron, sums):
            for name, F in acc.items():
                F /= count
                if self.flush_subnormals:
                    flush_subnormals_(F)
                key = layer_key(i, name)
                state[key] = F.astype(state[key].dtype, copy=False)
        state["warm_started"] = True
        return state

    # --- the shared pieces of a step ------------------------------------------------------------
    def momentum_(self, state, grads):
        """m <- rho m + (1 - rho) g in place, one fused pass over the flat vectors (with the periodic
        subnormal flush); returns (parameter-shaped views of m, ||g||^2 as a 0-d array)."""
        m = state["m"]
        xp = array_module(m)
        g = self.model.as_flat(grads)
        flush = self.flush_subnormals and int(state["k"]) % FLUSH_EVERY == 0
        # entries of dead units decay into the subnormal range, as the factors' do
        tiny = float(numpy.finfo(m.dtype).tiny) if flush else 0.0
        if not host_kernels.momentum_(m, g, self.momentum, 1 - self.momentum, tiny):  # one pass on NumPy
            _momentum_(m, g, self.momentum, 1 - self.momentum, tiny)
        return self.model.unflatten(m), xp.dot(g, g)

    def step_operator(self, state) -> KroneckerBlockOperator:
        """The block operator whose ``solve`` is the step's preconditioner: per Kronecker layer the
        pair :meth:`step_factors` as inverse factors, in ``block_order``; other parameters pass."""
        plan = self.factor_plan()
        blocks = {i: self.step_factors(state, i) for i in self.kron if plan is None or plan.grad_worker(i)}
        if not blocks:  # KAISA: a rank that is no layer's gradient worker
            return None
        return KroneckerBlockOperator.from_inverse_factors(self.model, blocks, missing="identity", order=self.block_order)

    def preconditioned_blocks(self, operator, m_views):
        """(layer, P = C_l^{-1} M^) for every Kronecker layer, in layer order: ``operator.solve_blocks``,
        or under KAISA the gradient workers' P, broadcast to the other ranks."""
        plan = self.factor_plan()
        if plan is None:
            yield from operator.solve_blocks(m_views)
            return
        steps = dict(operator.solve_blocks(m_views)) if operator is not None else {}
        layers = self.model.layers
        shape = lambda i: (layers[i].d_out, layers[i].d_in + 1)  # noqa: E731
        yield from plan.share_steps(steps, shape, array_module(m_views[0]), m_views[0].dtype).items()

    def apply_step_(self, params, m_views, operator):
        """theta <- theta - alpha P on every block (P from ``operator.solve_blocks`` of the momentum)
        and theta <- theta - alpha m elsewhere, in place; returns ||theta_new - theta|| (0-d).

        The step alpha P is written into one flat vector (two fused copies per layer), so the update
        and its norm are one operation each on the flat parameters.
        """
        model = self.model
        xp = array_module(*params)
        lr = self.lr
        step = xp.empty(model.n_params, dtype=params[0].dtype)
        step_views = model.unflatten(step)
        for i, P in self.preconditioned_blocks(operator, m_views):
            for out, dp in zip(model.layer_params(step_views, i), model.layers[i].from_matrix(P)):
                scaled_copy_(out, dp, lr)
        for j in self.other_params:
            scaled_copy_(step_views[j], m_views[j], lr)
        theta = model.flat_buffer(params)
        if theta is not None:
            theta -= step
        else:
            for p, dp in zip(params, step_views):
                p -= dp
        return xp.sqrt(xp.dot(step, step))


@fused
def _momentum_(xp, m, g, rho, weight, threshold):
    m *= rho
    m += weight * g  # weight = 1 - rho from the host (see engine.curvature.kronecker._ema_)
    m[...] = xp.where(xp.absolute(m) < threshold, 0, m)


@fused
def _scaled_copy_(xp, out, a, scale):
    out[...] = scale * a


def scaled_copy_(out, a, scale):
    """out[...] = scale * a: one kernel on a device, one pass without a temporary on NumPy."""
    if not host_kernels.scaled_copy_(out, a, scale):
        _scaled_copy_(out, a, scale)
