"""solvers.kbfgs: K-BFGS and K-BFGS(L) against a plain float64 re-implementation of docs/kbfgs.md
section 4.3, plus one test per testable pitfall of section 9.

The reference below is written from the note, the slow and obvious way: a model copy for the
trial point, explicit homogeneous inputs, ``numpy.linalg.inv``, the textbook product form of the
BFGS update and the damping formulas with ``if`` statements. Only the model's forward/backward
(tested in tests/engine) is shared with the solver.

The solver runs under the ``xp`` fixture; the reference stays NumPy on the host (its own
parameters and data), and the device run is compared with it after an explicit copy to the host
and with the NumPy run of the same test (tests/solvers/common.py).
"""

import numpy
import pytest

from engine.model import Model
from nets import mlp
from solvers import make_solver
from engine.curvature.kronecker import flush_subnormals_
from tests.solvers.common import Tol, host_float, on, to_np, twin


def tiny_model(weight_decay=1e-3):
    return mlp([5, 4, 3, 5], ["relu", "tanh", "linear"], "sigmoid_xent", weight_decay=weight_decay)


def batches(n_batches=3, n=16, d=5, seed=0):
    rng = numpy.random.default_rng(seed)
    return [(x, x) for x in (rng.random((n, d)) for _ in range(n_batches))]


# --- the reference ------------------------------------------------------------------------------
def ref_bfgs(H, s, y, g_ref):
    sy = s @ y
    if sy <= 0 or sy <= 1e-4 * (s @ s) * numpy.linalg.norm(g_ref):
        return H, True
    rho = 1 / sy
    E = numpy.eye(len(s)) - rho * numpy.outer(s, y)
    return E @ H @ E.T + rho * numpy.outer(s, s), False


def ref_double_damping(s, y, H, mu1, mu2):
    Hy = H @ y
    if (s @ y) / (y @ Hy) <= mu1:
        t = (1 - mu1) * (y @ Hy) / (y @ Hy - s @ y)
        s = t * s + (1 - t) * Hy
    if (s @ y) / (s @ s) <= mu2:
        t = (1 - mu2) * (s @ s) / (s @ s - s @ y)
        y = t * y + (1 - t) * s
    return s, y


class ReferenceKBFGS:
    """docs/kbfgs.md section 4.3 in float64, dense H_g (memory=None) or L-BFGS from pairs (memory=p)."""

    def __init__(self, model, lr, lam, memory=None, variant="V2"):
        self.model, self.lr, self.lam, self.memory, self.variant = model, lr, lam, memory, variant
        self.kron = list(model.kron_layers)
        self.k = 0

    def rows(self, params, x, y, regularized):
        loss, grads, caps = self.model.loss_and_grad(params, x, y, regularized=regularized, capture=True)
        return loss, grads, {c.layer: c for c in caps}

    def warm_start(self, params, data):
        self.A = {i: 0 for i in self.kron}
        for x, _ in data:
            _, _, caps = self.rows(params, x, x, True)
            for i in self.kron:
                at = numpy.hstack([caps[i].a, numpy.ones((len(x), 1))])
                self.A[i] = self.A[i] + at.T @ at / len(x)
        self.A = {i: A / len(data) for i, A in self.A.items()}
        self.init_state(params)

    def init_state(self, params):
        """Momentum, H_g = I, empty L-BFGS memory and (s, y) EMAs at zero (docs/kbfgs.md section 4.2)."""
        self.m = [numpy.zeros_like(p) for p in params]
        self.H_g = {i: numpy.eye(self.model.layers[i].d_out) for i in self.kron}
        self.H_a = {}
        self.pairs = {i: [] for i in self.kron}
        self.s_ema = {i: 0 for i in self.kron}
        self.y_ema = {i: 0 for i in self.kron}

    def H_g_of(self, i):
        if self.memory is None:
            return self.H_g[i]
        H = numpy.eye(self.model.layers[i].d_out)
        for s, y in self.pairs[i][-self.memory:]:
            H, _ = ref_bfgs(H, s, y, numpy.zeros(1))
        return H

    def step(self, params, x, y):
        model, sq = self.model, numpy.sqrt(self.lam)
        loss, grads, caps = self.rows(params, x, y, True)
        self.m = [0.9 * m + 0.1 * g for m, g in zip(self.m, grads)]
        trial = [p.copy() for p in params]
        for i in self.kron:
            at = numpy.hstack([caps[i].a, numpy.ones((len(x), 1))])
            if self.k > 0:
                self.A[i] = 0.9 * self.A[i] + 0.1 * at.T @ at / len(x)
            A_lm = self.A[i] + sq * numpy.eye(len(self.A[i]))
            if self.k == 0:
                self.H_a[i] = numpy.linalg.inv(A_lm)
            j = model.layer_param_index[i]
            M = numpy.hstack([self.m[j], self.m[j + 1][:, None]])
            P = self.H_g_of(i) @ M @ self.H_a[i]
            trial[j] = params[j] - self.lr * P[:, :-1]
            trial[j + 1] = params[j + 1] - self.lr * P[:, -1]
        _, _, caps_new = self.rows(trial, x, y, False)
        for i in self.kron:
            s = caps[i].z.mean(0) - caps_new[i].z.mean(0)
            yv = caps[i].g.mean(0) - caps_new[i].g.mean(0)
            self.s_ema[i] = 0.9 * self.s_ema[i] + 0.1 * s
            self.y_ema[i] = 0.9 * self.y_ema[i] + 0.1 * yv
            H_g = self.H_g_of(i)
            s_d, y_d = ref_double_damping(self.s_ema[i], self.y_ema[i], H_g, 0.2, sq)
            g_ref = caps[i].g.mean(0)
            if self.memory is None:
                self.H_g[i], _ = ref_bfgs(H_g, s_d, y_d, g_ref)
            elif s_d @ y_d > 1e-4 * (s_d @ s_d) * numpy.linalg.norm(g_ref):
                self.pairs[i].append((s_d, y_d))
            a_mean = caps[i].a.mean(0)
            a_bar = numpy.concatenate([a_mean, [1.0 if self.variant == "V2" else a_mean.mean()]])
            A_lm = self.A[i] + sq * numpy.eye(len(self.A[i]))
            s_a = self.H_a[i] @ a_bar
            self.H_a[i], _ = ref_bfgs(self.H_a[i], s_a, A_lm @ s_a, a_bar)
        self.k += 1
        for p, t in zip(params, trial):
            p[...] = t
        return loss


def reference_run(xp, name, memory, variant):
    """Six steps of the solver (on ``xp``) next to the float64 reference (on the host)."""
    model = tiny_model()
    data = batches()
    lr, lam = 0.3, 0.3
    hyper = {"lr": lr, "damping": lam, "hessian_action": variant}
    if memory is not None:
        hyper["memory"] = memory
    solver = make_solver(name, model, **hyper)
    params = model.init(seed=3, xp=xp)
    ref_params = model.init(seed=3, xp=numpy)
    state = solver.warm_start(params, solver.init(params), on(xp, data))
    ref = ReferenceKBFGS(model, lr, lam, memory, variant)
    ref.warm_start(ref_params, data)
    record = {"loss": [], "params": []}
    for k in range(6):
        x, y = data[k % len(data)]
        params, state, info = solver.step(params, state, xp.asarray(x), xp.asarray(y))
        ref_loss = ref.step(ref_params, x, y)
        assert host_float(info["loss"]) == pytest.approx(float(ref_loss), rel=1e-12)
        for p, q in zip(params, ref_params):
            numpy.testing.assert_allclose(to_np(p), q, rtol=1e-9, atol=1e-12)
        record["loss"].append(info["loss"])
        record["params"].append(model.flatten(params))
    for i in solver.kron:
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/H_a"]), ref.H_a[i], rtol=1e-8, atol=1e-11)
        numpy.testing.assert_allclose(to_np(solver.g_side_inverse(state, i)), ref.H_g_of(i), rtol=1e-8, atol=1e-11)
        numpy.testing.assert_allclose(to_np(state[f"layer{i}/s_ema"]), ref.s_ema[i], rtol=1e-9, atol=1e-14)
        record[f"H_g{i}"] = solver.g_side_inverse(state, i)
    return record


@pytest.mark.parametrize("name,memory,variant", [("kbfgs", None, "V2"), ("kbfgs", None, "V1"),
                                                 ("kbfgs_l", 2, "V2"), ("kbfgs_l", 100, "V1")])
def test_matches_reference_implementation(name, memory, variant, xp):
    twin(xp, reference_run, name, memory, variant)


def first_iteration(xp):
    """Pitfalls 2, 6, 7: homogeneous A averaged over the epoch, H_a = inv(A + sqrt(lambda) I) at
    k = 0, A not EMA-updated at k = 0, H_g = I to start; state keeps the undamped EMA (docs/kbfgs.md pitfall 5)."""
    model = tiny_model()
    data = batches()
    solver = make_solver("kbfgs", model, lr=0.3, damping=0.3)
    params = model.init(seed=1, xp=xp)
    state = solver.warm_start(params, solver.init(params), on(xp, data))
    i = solver.kron[0]
    xs = [x for x, _ in data]
    A_ref = sum(numpy.hstack([x, numpy.ones((len(x), 1))]).T @ numpy.hstack([x, numpy.ones((len(x), 1))]) / len(x) for x in xs) / len(xs)
    numpy.testing.assert_allclose(to_np(state[f"layer{i}/A"]), A_ref, rtol=1e-13)
    A0 = to_np(state[f"layer{i}/A"]).copy()
    assert numpy.array_equal(to_np(state[f"layer{i}/H_g"]), numpy.eye(4))
    old = [to_np(p).copy() for p in params]  # the reference computations run on the host
    x, y = data[0]
    _, _, caps = model.loss_and_grad(old, x, y, capture=True)
    params, state, info = solver.step(params, state, xp.asarray(x), xp.asarray(y))
    assert numpy.array_equal(to_np(state[f"layer{i}/A"]), A0)  # no EMA at k = 0
    # the first step is -alpha H_g (0.1 g) H_a with H_g = I, H_a = inv(A + sqrt(lambda) I)
    _, grads = model.loss_and_grad(old, x, y)
    M = numpy.hstack([grads[0], grads[1][:, None]]) * 0.1
    P = M @ numpy.linalg.inv(A0 + numpy.sqrt(0.3) * numpy.eye(len(A0)))
    numpy.testing.assert_allclose(to_np(params[0]), old[0] - 0.3 * P[:, :-1], rtol=1e-10, atol=1e-13)
    # s_ema is the undamped 0.1 (mean z - mean z+) even though the damping fired
    _, _, caps_new = model.loss_and_grad([to_np(p) for p in params], x, y, regularized=False, capture=True)
    s = caps[0].z.mean(0) - caps_new[0].z.mean(0)
    numpy.testing.assert_allclose(to_np(state[f"layer{i}/s_ema"]), 0.1 * s, rtol=1e-10, atol=1e-15)
    # y uses the per-example scale N dL/dz (docs/kbfgs.md pitfall 3)
    yv = caps[0].g.mean(0) - caps_new[0].g.mean(0)
    numpy.testing.assert_allclose(to_np(state[f"layer{i}/y_ema"]), 0.1 * yv, rtol=1e-10, atol=1e-15)
    assert int(to_np(info["powell_damping"])) + int(to_np(info["lm_damping"])) >= 0
    return {"params": model.flatten(params), "s_ema": state[f"layer{i}/s_ema"], "y_ema": state[f"layer{i}/y_ema"],
            "H_g": state[f"layer{i}/H_g"], "H_a": state[f"layer{i}/H_a"],
            "info": {k: info[k] for k in ("loss", "powell_damping", "lm_damping", "skipped_H_g", "skipped_H_a")}}


def test_warm_start_and_first_iteration(xp):
    twin(xp, first_iteration)


def float32_run(xp, name):
    model = tiny_model(weight_decay=1e-5)
    data = on(xp, [(x.astype(numpy.float32), y.astype(numpy.float32)) for x, y in batches(4, 32)])
    solver = make_solver(name, model, lr=0.3, damping=0.3, memory=5) if name == "kbfgs_l" else make_solver(name, model)
    params = model.init(seed=2, dtype=numpy.float32, xp=xp)
    state = solver.warm_start(params, solver.init(params), data)
    early = None
    for k in range(60):
        params, state, info = solver.step(params, state, *data[k % 4])
        if k == 9:
            early = model.flatten(params)
    for key, value in state.items():  # no state array changes its dtype or leaves the backend
        if hasattr(value, "dtype") and value.dtype.kind == "f":
            assert value.dtype == numpy.float32, key
            assert type(value) is type(params[0]), key
    for i in solver.kron:
        for key in ("H_a", "A") + (("H_g",) if name == "kbfgs" else ()):
            F = to_np(state[f"layer{i}/{key}"])
            assert F.dtype == numpy.float32 and numpy.isfinite(F).all()
            assert numpy.array_equal(F, F.T), key
    if name == "kbfgs_l":
        assert to_np(state[f"layer{solver.kron[0]}/lbfgs/count"]) == 5  # memory full, oldest dropped
    return {"params after 10 steps": early, "params": Tol(model.flatten(params), 1e-3), "loss": Tol(info["loss"], 1e-3)}


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_l"])
def test_float32_factors_stay_symmetric_and_finite(name, xp):
    """Pitfall 16: float32 factors stay exactly symmetric over many steps."""
    twin(xp, float32_run, name)


def flush_run(xp):
    tiny = numpy.finfo(numpy.float32).tiny
    a = xp.asarray(numpy.array([1.0, tiny, tiny / 4, -tiny / 8, 0.0, -3.0], dtype=numpy.float32))
    flush_subnormals_(a)
    assert numpy.array_equal(to_np(a), numpy.array([1.0, tiny, 0, 0, 0, -3.0], dtype=numpy.float32))
    # inside the solver: an A entry decaying geometrically never becomes subnormal
    model = tiny_model()
    solver = make_solver("kbfgs", model)
    params = model.init(seed=0, dtype=numpy.float32, xp=xp)
    x = batches(1, 8)[0][0].astype(numpy.float32)
    x[:, 0] = 0  # input 0 is dead: its row/column of A decays by 0.9 per step
    x = xp.asarray(x)
    state = solver.warm_start(params, solver.init(params), [(x, x)])
    state["layer0/A"][0, :] = state["layer0/A"][:, 0] = 1e-37
    for _ in range(40):
        params, state, _ = solver.step(params, state, x, x)
    A = to_np(state["layer0/A"])
    assert not ((A != 0) & (numpy.abs(A) < tiny)).any()
    assert (A[0, :] == 0).all()
    return {"A": A, "params": model.flatten(params)}


def test_flush_subnormals(xp):
    """Pitfall 19: entries below the smallest normal float32 are flushed to zero."""
    twin(xp, flush_run)


def test_needs_dense_layers_and_real_params():
    from engine.layers import ReLU
    with pytest.raises(ValueError, match="needs a model with Dense layers"):
        make_solver("kbfgs", Model([ReLU()], "half_mse"))
    model = tiny_model()
    with pytest.raises(TypeError, match="real float32/float64"):
        make_solver("kbfgs", model).init([p.astype(numpy.complex128) for p in model.init()])
    with pytest.raises(ValueError, match="V2 or V1"):
        make_solver("kbfgs", model, hessian_action="V3")


def solve_run(xp, name):
    model = tiny_model()
    data = on(xp, batches())
    solver = make_solver(name, model)
    params = model.init(seed=5, xp=xp)
    state = solver.warm_start(params, solver.init(params), data)
    for k in range(3):
        params, state, _ = solver.step(params, state, *data[k])
    op = solver.curvature_operator(state)
    m = state["m"]
    direction = op.solve(m)
    mv = model.unflatten(to_np(m))
    dv = model.unflatten(to_np(direction))
    for i in solver.kron:
        j = model.layer_param_index[i]
        M = numpy.hstack([mv[j], mv[j + 1][:, None]])
        P = to_np(solver.g_side_inverse(state, i)) @ M @ to_np(state[f"layer{i}/H_a"])
        numpy.testing.assert_allclose(numpy.hstack([dv[j], dv[j + 1][:, None]]), P, rtol=1e-10, atol=1e-14)
    return {"direction": direction}


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_l"])
def test_curvature_operator_solve_is_the_step_direction(name, xp):
    """``solve`` of the block operator is H_g M H_a, the preconditioner the step applies."""
    twin(xp, solve_run, name)


def damping_above_one_run(xp, name):
    model = tiny_model()
    data = on(xp, batches())
    solver = make_solver(name, model, lr=0.3, damping=3.0)
    params = model.init(seed=6, xp=xp)
    state = solver.warm_start(params, solver.init(params), data)
    before = numpy.mean([host_float(model.loss(params, x, y)) for x, y in data])
    fired, losses = 0, []
    for k in range(30):
        params, state, info = solver.step(params, state, *data[k % 3])
        fired += int(to_np(info["lm_damping"]))
        losses.append(info["loss"])
        assert numpy.isfinite(host_float(info["loss"]))
    assert fired > 0
    for i in solver.kron:
        assert numpy.isfinite(to_np(solver.g_side_inverse(state, i))).all()
    assert numpy.mean([host_float(model.loss(params, x, y)) for x, y in data]) < before
    return {"losses": losses, "params": model.flatten(params), "lm_fired": fired}


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs_l"])
def test_damping_above_one_stays_finite(name, xp):
    """Pitfall 18 through the solver: lambda = 3 (mu2 = sqrt(3) > 1) gives finite, decreasing runs."""
    twin(xp, damping_above_one_run, name)
