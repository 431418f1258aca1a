"""Muon, AdaHessian and Sophia-H against slow, obvious NumPy re-implementations (float64), their
Newton-Schulz band, exact resume through HDF5, the curvature back-ends and host syncs
(training mnist-mlp with the defaults: tests/solvers/test_mnist_mlp_defaults.py).

The references below are written from the papers (docs/muon-adahessian-sophia.md), not from the
solvers: Muon's Newton-Schulz is checked against the SVD (U p^5(S) V^T for the quintic p), and the
AdaHessian/Sophia Hessian-vector products come from the dense R-operator Hessian with the same
Rademacher probe (the solvers' documented stream: PCG64(seed), int8 signs 2 b - 1, one vector of
n per Hessian step). The solvers run under the ``xp`` fixture; the device run is also compared
with the NumPy run (tests/solvers/common.py).
"""


import numpy
import pytest

import solvers.adahessian  # noqa: F401  (registers the solvers; the package imports them too)
import solvers.muon  # noqa: F401
import solvers.sophia  # noqa: F401
from engine.curvature import HessianRop
from nets import mlp
from solvers import make_solver
from solvers.muon import NS_COEFFICIENTS, newton_schulz5
from tests.solvers.common import host_float, on, to_np, twin
from tests.solvers.test_conv_solvers import tiny_cnn, tiny_data
from tests.solvers.test_solvers import assert_resume_bit_for_bit, problem
from tests.solvers.test_sync_budget import check_syncs, measured, on_standin

NAMES = ["muon", "adahessian", "sophia"]


def tiny_mlp():
    return mlp([6, 5, 4, 3], ["tanh", "relu", "linear"], "softmax_xent", weight_decay=1e-3)


def mlp_data(n_batches=3, n=16, seed=0, dtype=numpy.float64):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n_batches * n, 6)).astype(dtype)
    y = (x[:, 0] + x[:, 1] > 0).astype(numpy.int64) + (x[:, 2] > 0.5)
    return [(x[i:i + n], y[i:i + n]) for i in range(0, len(x), n)]


CASES = {"mlp": (tiny_mlp, mlp_data), "cnn": (tiny_cnn, tiny_data)}


def flat(grads):
    return numpy.concatenate([g.reshape(-1) for g in grads])


def rel_err(a, b):
    return float(numpy.linalg.norm(a - b) / numpy.linalg.norm(b))


# --- the references -----------------------------------------------------------------------------------
def ref_newton_schulz(G, steps=5):
    """The quintic iteration, written on the wide orientation with explicit polynomials."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.T.copy() if G.shape[0] > G.shape[1] else G.copy()
    X = X / (numpy.sqrt((X ** 2).sum()) + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + b * (A @ X) + c * (A @ (A @ X))
    return X.T if G.shape[0] > G.shape[1] else X


def ref_muon(model, theta, data, steps, lr, adam_lr, mu=0.95, scale="moonlight"):
    """Muon on matrices (Nesterov, SGD-style buffer), standard Adam on vectors: list of iterates."""
    params = [p.copy() for p in model.unflatten(theta.copy())]
    buf = [numpy.zeros_like(p) for p in params]
    m = [numpy.zeros_like(p) for p in params]
    v = [numpy.zeros_like(p) for p in params]
    out = []
    for k in range(steps):
        x, y = data[k % len(data)]
        grads = model.loss_and_grad(params, x.astype(numpy.float64), y)[1]
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.ndim >= 2:
                buf[i] = mu * buf[i] + g
                G = (g + mu * buf[i]).reshape(p.shape[0], -1)
                rows, cols = G.shape
                s = 0.2 * numpy.sqrt(max(rows, cols)) if scale == "moonlight" else numpy.sqrt(max(1, rows / cols))
                params[i] = p - lr * s * ref_newton_schulz(G).reshape(p.shape)
            else:
                m[i] = 0.9 * m[i] + 0.1 * g
                v[i] = 0.999 * v[i] + 0.001 * g * g
                params[i] = p - adam_lr * (m[i] / (1 - 0.9 ** (k + 1))) / (numpy.sqrt(v[i] / (1 - 0.999 ** (k + 1))) + 1e-8)
        out.append(flat(params))
    return out


def ref_probe(rng, n):
    return rng.integers(0, 2, size=n, dtype=numpy.int8).astype(numpy.float64) * 2 - 1


def ref_hessian_diagonal_sample(model, params, x, y, z, spatial):
    """z * (H z) with H the dense float64 Hessian (R-operator, tau I included), spatially averaged."""
    d = z * (HessianRop(model, params, x, y).dense() @ z)
    if spatial:
        pieces, start = [], 0
        for shape in model.shapes:
            size = int(numpy.prod(shape))
            block = d[start:start + size].reshape(shape)
            if block.ndim == 4:
                block = numpy.broadcast_to(block.mean(axis=(2, 3), keepdims=True), shape)
            pieces.append(block.reshape(-1))
            start += size
        d = numpy.concatenate(pieces)
    return d


def ref_adahessian(model, theta, data, steps, lr, seed, b1=0.9, b2=0.999, eps=1e-4, power=1.0):
    theta = theta.copy()
    rng = numpy.random.default_rng(seed)
    m, v, out = numpy.zeros_like(theta), numpy.zeros_like(theta), []
    for k in range(steps):
        x, y = data[k % len(data)]
        x = x.astype(numpy.float64)
        params = model.unflatten(theta)
        g = flat(model.loss_and_grad(params, x, y)[1])
        d = ref_hessian_diagonal_sample(model, params, x, y, ref_probe(rng, len(theta)), spatial=True)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * d ** 2
        theta = theta - lr * (m / (1 - b1 ** (k + 1))) / (numpy.sqrt(v / (1 - b2 ** (k + 1))) ** power + eps)
        out.append(theta.copy())
    return out


def ref_sophia(model, theta, data, steps, lr, seed, every, gamma, b1=0.965, b2=0.99, eps=1e-12):
    theta = theta.copy()
    rng = numpy.random.default_rng(seed)
    m, h, out, branches = numpy.zeros_like(theta), numpy.zeros_like(theta), [], set()
    for k in range(steps):
        x, y = data[k % len(data)]
        x = x.astype(numpy.float64)
        params = model.unflatten(theta)
        g = flat(model.loss_and_grad(params, x, y)[1])
        m = b1 * m + (1 - b1) * g
        if k % every == 0:
            h = b2 * h + (1 - b2) * ref_hessian_diagonal_sample(model, params, x, y, ref_probe(rng, len(theta)), False)
        ratio = numpy.array([mi / max(gamma * hi, eps) for mi, hi in zip(m, h)])
        branches |= {"clipped" if abs(r) > 1 else "inside" for r in ratio}
        branches |= {"floor" for hi in h if gamma * hi < eps}
        theta = theta - lr * numpy.clip(ratio, -1, 1)
        out.append(theta.copy())
    return out, branches


# --- one step (and a few more) against the references -------------------------------------------------
#: relative error of the first step; later float32 iterates are compared at LATER_TOL (float32 rounding
#: of the gradient and of the Newton-Schulz / Hessian products accumulates over the steps)
TOL = {numpy.float64: 1e-12, numpy.float32: 1e-6}
LATER_TOL = {numpy.float64: 1e-12, numpy.float32: 1e-5}


def run_solver(xp, name, case, dtype, steps, **hyper):
    """``steps`` iterations from a fixed start: (model, host data, initial theta (float64), iterates)."""
    build, make_data = CASES[case]
    model, data = build(), make_data(dtype=dtype)
    solver = make_solver(name, model, **hyper)
    params = model.init(seed=3, dtype=dtype, xp=xp)
    theta0 = to_np(model.flatten(params)).astype(numpy.float64)
    state = solver.init(params)
    trajectory = []
    for k in range(steps):
        params, state, info = solver.step(params, state, *on(xp, [data[k % len(data)]])[0])
        assert params[0].dtype == dtype and numpy.ndim(info["loss"]) == 0
        trajectory.append(model.flatten(params))
    return model, data, theta0, trajectory, state


def check_trajectory(got, want, dtype):
    for k, (a, b) in enumerate(zip(got, want)):
        err, tol = rel_err(to_np(a).astype(numpy.float64), b), (TOL if k == 0 else LATER_TOL)[dtype]
        assert err <= tol, f"step {k + 1}: relative error {err:.3e} > {tol:g}"


def muon_run(xp, case, dtype, scale):
    model, data, theta0, traj, state = run_solver(xp, "muon", case, dtype, 3, lr=0.05, adam_lr=0.01, scale=scale)
    check_trajectory(traj, ref_muon(model, theta0, data, 3, 0.05, 0.01, scale=scale), dtype)
    return {"params": traj, "m": state["m"], "v": state["v"]}


@pytest.mark.parametrize("scale", ["moonlight", "jordan"])
@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_muon_matches_reference(case, dtype, scale, xp):
    twin(xp, muon_run, case, dtype, scale)


def adahessian_run(xp, case, dtype):
    # lr / (|D_i| + eps) magnifies the float32 rounding of small D_i up to 1e4-fold (eps = 1e-4): a
    # smaller float32 lr keeps the parameters' relative error at float32 level
    lr = 0.05 if dtype == numpy.float64 else 0.01
    # beta1 given (not the default), so the reference follows the paper's formula whatever the default
    model, data, theta0, traj, state = run_solver(xp, "adahessian", case, dtype, 3, lr=lr, seed=5, beta1=0.85)
    check_trajectory(traj, ref_adahessian(model, theta0, data, 3, lr, seed=5, b1=0.85), dtype)
    return {"params": traj, "m": state["m"], "v": state["v"], "rng": state["rng"]}


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_adahessian_matches_reference(case, dtype, xp):
    twin(xp, adahessian_run, case, dtype)


def test_adahessian_hessian_power_matches_reference():
    """k = 0.5 (the only branch the default k = 1 skips): v^(k/2) in the denominator, float64."""
    model, data, theta0, traj, _ = run_solver(numpy, "adahessian", "mlp", numpy.float64, 3, lr=0.05, seed=5,
                                              hessian_power=0.5)
    check_trajectory(traj, ref_adahessian(model, theta0, data, 3, 0.05, seed=5, power=0.5), numpy.float64)


def sophia_run(xp, case, dtype):
    hyper = {"lr": 0.01, "gamma": 0.5, "hessian_every": 2, "seed": 7, "beta1": 0.95}
    model, data, theta0, traj, state = run_solver(xp, "sophia", case, dtype, 5, **hyper)
    want, branches = ref_sophia(model, theta0, data, 5, 0.01, seed=7, every=2, gamma=0.5, b1=0.95)
    assert branches == {"clipped", "inside", "floor"}  # every branch of clip(m / max(gamma h, eps), 1) is taken
    check_trajectory(traj, want, dtype)
    return {"params": traj, "m": state["m"], "h": state["h"], "rng": state["rng"]}


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_sophia_matches_reference(case, dtype, xp):
    twin(xp, sophia_run, case, dtype)


def test_sophia_refreshes_every_k_steps_by_default():
    model, data = tiny_mlp(), mlp_data()
    solver = make_solver("sophia", model)
    assert (solver.hessian_every, solver.beta1, solver.beta2, solver.gamma, solver.eps) == (10, 0.7, 0.99, 0.01, 1e-12)
    params = model.init(seed=3, xp=numpy)
    state = solver.init(params)
    refreshed = []
    for k in range(21):
        rng_before = state["rng"].copy()
        params, state, info = solver.step(params, state, *data[k % 3])
        refreshed.append(info["hessian_refreshed"])
        assert info["hessian_refreshed"] == (not numpy.array_equal(rng_before, state["rng"]))
    assert [k for k, r in enumerate(refreshed) if r] == [0, 10, 20]


def curvature_run(xp, name, case):
    hyper = {"adahessian": {"lr": 0.05}, "sophia": {"lr": 0.01, "gamma": 0.5, "hessian_every": 2}}[name]
    out = {}
    for curvature in ("cs", "rop", "fd-central"):
        out[curvature] = run_solver(xp, name, case, numpy.float64, 3, curvature=curvature, **hyper)[3]
    for k in range(3):
        cs, rop, fd = (to_np(out[c][k]) for c in ("cs", "rop", "fd-central"))
        assert rel_err(cs, rop) <= 1e-12, f"{name} step {k + 1}: cs and rop differ by {rel_err(cs, rop):.2e}"
        assert rel_err(fd, rop) <= 1e-6, f"{name} step {k + 1}: fd-central and rop differ by {rel_err(fd, rop):.2e}"
    return {c: out[c] for c in ("cs", "rop")}


@pytest.mark.parametrize("case", ["mlp", "cnn"])
@pytest.mark.parametrize("name", ["adahessian", "sophia"])
def test_curvature_back_ends_give_the_same_step(name, case, xp):
    twin(xp, curvature_run, name, case)


def test_unknown_curvature_is_refused():
    with pytest.raises(ValueError, match="'cs', 'fd-central' or 'rop'"):
        make_solver("adahessian", tiny_mlp(), curvature="fd-forward")
    with pytest.raises(ValueError, match="'moonlight' or 'jordan'"):
        make_solver("muon", tiny_mlp(), scale="spectral")


# --- Muon's Newton-Schulz iteration -------------------------------------------------------------------
def quintic_iterate(s, steps=5):
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        s = a * s + b * s ** 3 + c * s ** 5
    return s


def newton_schulz_run(xp, shape, seed):
    G = numpy.random.default_rng(seed).standard_normal(shape)
    X = to_np(newton_schulz5(xp.asarray(G)))
    U, S, Vt = numpy.linalg.svd(G, full_matrices=False)
    s_in = S / (numpy.sqrt((G ** 2).sum()) + 1e-7)
    # X = U p^5(S / (||G||_F + 1e-7)) V^T exactly (the iteration acts on the singular values alone)
    want = (U * quintic_iterate(s_in)) @ Vt
    assert rel_err(X, want) <= 1e-10
    numpy.testing.assert_allclose(ref_newton_schulz(G), X, rtol=0, atol=1e-12)
    return {"X": X, "s_in_min": s_in.min(), "s_out": numpy.linalg.svd(X, compute_uv=False)}


@pytest.mark.parametrize("shape", [(20, 50), (50, 20), (300, 100), (10, 300), (3, 27)])
def test_newton_schulz_singular_values_lie_in_the_published_band(shape, xp):
    """For a normalised input whose singular values are all >= 0.01 (random Gaussian rectangles here),
    five quintic steps leave them in [0.6818, 1.1344]: the range of p^5 on [0.01, 1] (the scalar map
    has its minimum 0.68183 and its maximum 1.13436 there; inputs down to 0.002 still reach [0.68, 1.21])."""
    run = twin(xp, newton_schulz_run, shape, seed=sum(shape))
    assert float(run["s_in_min"]) >= 0.01
    s = run["s_out"]
    assert 0.6818 <= s.min() and s.max() <= 1.1344, (s.min(), s.max())
    grid = quintic_iterate(numpy.geomspace(0.01, 1.0, 100001))
    assert 0.6818 <= grid.min() < 0.6819 and 1.1343 < grid.max() <= 1.1344


def test_newton_schulz_float32_and_zero():
    G = numpy.random.default_rng(1).standard_normal((30, 12))
    X32 = newton_schulz5(G.astype(numpy.float32))
    assert X32.dtype == numpy.float32 and rel_err(X32.astype(numpy.float64), newton_schulz5(G)) < 1e-5
    assert not newton_schulz5(numpy.zeros((4, 6))).any()  # a zero momentum gives a zero update, not NaN


# --- exact resume ------------------------------------------------------------------------------------
#: Sophia estimates every 3 steps here, so the step after the reload (k = 3) draws a probe from the
#: reloaded generator words
RESUME_HYPER = {"muon": {}, "adahessian": {"lr": 0.05}, "sophia": {"hessian_every": 3, "lr": 0.01}}


def resume_start(name, case, dtype, xp):
    if case == "ae":
        model, data = problem(dtype, xp)
    else:
        model, data = CASES[case][0](), on(xp, CASES[case][1](dtype=dtype))
    solver = make_solver(name, model, **RESUME_HYPER[name])
    params = model.init(seed=9999, dtype=dtype, xp=xp)
    return model, data, solver, params, solver.init(params)


@pytest.mark.parametrize("dtype,writer", [(numpy.float64, "h5py"), (numpy.float32, "h5py"), (numpy.float32, "runfile")])
@pytest.mark.parametrize("case", ["ae", "cnn"])
@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_through_hdf5_bit_for_bit(name, case, dtype, writer, tmp_path, xp):
    model, data, solver, params, state = resume_start(name, case, dtype, xp)
    assert_resume_bit_for_bit(model, data, solver, params, state,
                              lambda: make_solver(name, model, **RESUME_HYPER[name]), dtype, writer, tmp_path)


# --- host syncs on the device -------------------------------------------------------------------------
@pytest.mark.parametrize("name,curvature", [("muon", None), ("adahessian", "cs"), ("adahessian", "rop"),
                                            ("sophia", "cs"), ("sophia", "rop")])
@pytest.mark.parametrize("case", ["ae", "cnn"])
def test_a_step_makes_no_host_sync(name, curvature, case, cupy_only):
    """Zero syncs per step, Hessian steps included (Sophia estimates at k = 0 and 3 here); the probe
    costs one host-to-device copy per Hessian step."""
    hyper = {} if curvature is None else {"curvature": curvature}
    model, data, _, params, _ = resume_start(name, case, numpy.float64, cupy_only)
    solver = make_solver(name, model, **RESUME_HYPER[name], **hyper)
    state = solver.init(params)
    for k in range(4):
        with measured(cupy_only) as work:
            params, state, info = solver.step(params, state, *data[k % len(data)])
        check_syncs(work, 0, f"{name} ({curvature}) step {k}")
        if on_standin(cupy_only) and name != "muon":
            probes = 1 if name == "adahessian" or k % 3 == 0 else 0
            assert work.h2d == probes, f"{name} step {k}: {work.h2d} host-to-device copies"
    assert numpy.isfinite(host_float(info["loss"]))


# training mnist-mlp with the defaults: tests/solvers/test_mnist_mlp_defaults.py (all five baselines)
