"""solvers.krylov.truncated_cg against dense linear algebra (numpy.linalg on the host).

Each body runs under the ``xp`` fixture and returns the CG results it got; on the CuPy half they
must agree with the NumPy run of the same body (``twinned``, tests/solvers/common.py)."""

import math

import numpy
import pytest

from engine.backend import to_host
from solvers.krylov import EXIT_REASONS, exit_code, martens_schedule, truncated_cg
from tests.solvers.common import Tol, twinned


def spd_matrix(n, seed, cond=1e3):
    rng = numpy.random.default_rng(seed)
    q, _ = numpy.linalg.qr(rng.standard_normal((n, n)))
    eig = numpy.geomspace(1.0, cond, n)
    return (q * eig) @ q.T


def record(*results, rtol=None):
    """What the NumPy and device runs of a CG test must agree on."""
    out = []
    for res in results:
        fields = {"x": res.x, "iterations": res.iterations, "exit": res.exit_reason, "n_matvec": res.n_matvec,
                  "gTp": res.gTp, "pHp": res.pHp, "curvature": res.curvature, "model_value": res.model_value,
                  "iterates": [it.x for it in res.iterates]}
        out.append(Tol(fields, rtol) if rtol is not None else fields)
    return out


def counted(xp, A):
    """matvec on device plus a counter of calls."""
    Ad = xp.asarray(A)
    calls = []

    def mv(v):
        calls.append(1)
        return Ad @ v
    return mv, calls


@twinned
def test_spd_system_solved_exactly_within_n_iterations(xp):
    n = 12
    # well conditioned so that n floating-point CG steps reach machine precision
    A = spd_matrix(n, 0, cond=5.0)
    g = numpy.random.default_rng(1).standard_normal(n)
    mv, calls = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), rtol=1e-14, adaptive_rtol=False, max_iter=n)
    exact = numpy.linalg.solve(A, -g)
    x = to_host(res.x)
    assert res.exit_reason == "converged"
    assert res.iterations <= n
    assert numpy.linalg.norm(x - exact) <= 1e-13 * numpy.linalg.norm(exact)
    assert res.n_matvec == res.iterations == len(calls)
    # quantities along the step from the recurrences match the dense values
    assert res.gTp == pytest.approx(g @ x, rel=1e-12)
    assert res.pHp == pytest.approx(x @ A @ x, rel=1e-12)
    assert res.curvature == pytest.approx(x @ A @ x, rel=1e-12)
    assert res.model_value == pytest.approx(0.5 * x @ A @ x + g @ x, rel=1e-12)
    assert res.step_sq_norm == pytest.approx(x @ x, rel=1e-12)
    return record(res)


@twinned
def test_damping_is_added_to_the_operator(xp):
    n = 8
    A = spd_matrix(n, 2, cond=10.0) - 0.5 * numpy.eye(n)  # indefinite without damping
    lam = 1.2
    g = numpy.random.default_rng(3).standard_normal(n)
    mv, _ = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), damping=lam, rtol=1e-13, adaptive_rtol=False, max_iter=50)
    exact = numpy.linalg.solve(A + lam * numpy.eye(n), -g)
    x = to_host(res.x)
    assert res.exit_reason == "converged" and res.iterations <= n
    assert numpy.linalg.norm(x - exact) <= 1e-10 * numpy.linalg.norm(exact)
    assert res.pHp == pytest.approx(x @ (A + lam * numpy.eye(n)) @ x, rel=1e-11)
    assert res.curvature == pytest.approx(x @ A @ x, rel=1e-10)
    return record(res)


@twinned
def test_warm_start_reaches_the_same_solution_and_tracks_curvature(xp):
    n = 10
    A = spd_matrix(n, 4, cond=100.0)
    g = numpy.random.default_rng(5).standard_normal(n)
    x0 = numpy.random.default_rng(6).standard_normal(n)
    mv, calls = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), x0=xp.asarray(x0), rtol=1e-13, adaptive_rtol=False, max_iter=100)
    exact = numpy.linalg.solve(A, -g)
    x = to_host(res.x)
    assert numpy.linalg.norm(x - exact) <= 1e-10 * numpy.linalg.norm(exact)
    assert res.n_matvec == res.iterations + 1 == len(calls)
    assert res.curvature == pytest.approx(x @ A @ x, rel=1e-11)
    assert res.gTp == pytest.approx(g @ x, rel=1e-11)
    return record(res)


@twinned
def test_preconditioned_cg_matches_the_exact_solution_in_fewer_iterations(xp):
    n = 30
    rng = numpy.random.default_rng(7)
    # badly scaled diagonal times a well-conditioned SPD core: Jacobi preconditioning fixes it
    D = numpy.diag(numpy.geomspace(1.0, 1e4, n))
    core = spd_matrix(n, 8, cond=3.0)
    A = numpy.sqrt(D) @ core @ numpy.sqrt(D)
    g = rng.standard_normal(n)
    exact = numpy.linalg.solve(A, -g)
    dinv = xp.asarray(1.0 / numpy.diag(A))
    mv, _ = counted(xp, A)
    plain = truncated_cg(mv, xp.asarray(-g), rtol=1e-12, adaptive_rtol=False, max_iter=1000)
    pre = truncated_cg(mv, xp.asarray(-g), rtol=1e-12, adaptive_rtol=False, max_iter=1000,
                       preconditioner=lambda r: dinv * r)
    for res in (plain, pre):
        assert res.exit_reason == "converged"
        assert numpy.linalg.norm(to_host(res.x) - exact) <= 1e-8 * numpy.linalg.norm(exact)
    assert pre.iterations <= n
    assert pre.iterations < plain.iterations
    return record(pre) + record(plain, rtol=1e-9)  # unpreconditioned: cond 1e4, many iterations


def indefinite(n, seed, negative):
    rng = numpy.random.default_rng(seed)
    q, _ = numpy.linalg.qr(rng.standard_normal((n, n)))
    eig = numpy.linspace(1.0, 5.0, n)
    eig[:negative] = -numpy.linspace(0.5, 2.0, negative)
    return (q * eig) @ q.T


def reference_cg_directions(A, b, max_iter):
    """Plain textbook CG in float64 on the host; returns the curvature d^T A d of each direction."""
    x = numpy.zeros_like(b)
    r = b.copy()
    d = r.copy()
    curvs, xs = [], [x.copy()]
    for _ in range(max_iter):
        Ad = A @ d
        c = d @ Ad
        curvs.append(c)
        if c <= 0:
            break
        a = (r @ r) / c
        x = x + a * d
        r_new = r - a * Ad
        d = r_new + (r_new @ r_new) / (r @ r) * d
        r = r_new
        xs.append(x.copy())
    return curvs, xs


@twinned
def test_indefinite_matrix_exits_on_first_nonpositive_direction_with_descent_step(xp):
    n = 12
    found_later_exit = False
    results = []
    for seed in range(20):
        A = indefinite(n, seed, negative=2)
        g = numpy.random.default_rng(100 + seed).standard_normal(n)
        curvs, xs = reference_cg_directions(A, -g, 3 * n)
        first_bad = next(i for i, c in enumerate(curvs) if c <= 0)
        mv, _ = counted(xp, A)
        res = truncated_cg(mv, xp.asarray(-g), rtol=1e-14, adaptive_rtol=False, max_iter=3 * n)
        results.append(res)
        assert res.exit_reason == "negative_curvature"
        assert res.iterations == first_bad
        assert res.n_matvec == first_bad + 1
        x = to_host(res.x)
        assert g @ x < 0  # a descent direction
        if first_bad > 0:
            found_later_exit = True
            # the returned step is the iterate before the bad direction, not a step along it
            assert numpy.linalg.norm(x - xs[first_bad]) <= 1e-9 * numpy.linalg.norm(xs[first_bad])
            assert res.curvature == pytest.approx(x @ A @ x, rel=1e-9)
    assert found_later_exit, "no seed produced negative curvature after the first iteration"
    return record(*results)


@twinned
def test_negative_curvature_step_along_the_disturbing_direction_lowers_model_and_loss(xp):
    """negative_curvature="step": the iterate plus t d, t = r^T z / (|d^T H d| + lambda ||d||^2), on
    indefinite systems built by hand; the model and a quartic loss with that quadratic part fall
    below those of the iterate "stop" returns, and the step stays a descent direction."""
    n, lam, kappa = 12, 0.1, 1e-2
    results, later = [], 0
    for seed in range(12):
        A = indefinite(n, seed, negative=2)
        g = numpy.random.default_rng(100 + seed).standard_normal(n)
        mv, _ = counted(xp, A)
        stop = truncated_cg(mv, xp.asarray(-g), damping=lam, rtol=1e-14, adaptive_rtol=False, max_iter=3 * n)
        step = truncated_cg(mv, xp.asarray(-g), damping=lam, rtol=1e-14, adaptive_rtol=False, max_iter=3 * n,
                            negative_curvature="step")
        assert stop.exit_reason == step.exit_reason == "negative_curvature"
        assert step.iterations == stop.iterations and step.n_matvec == stop.n_matvec
        if stop.iterations == 0:
            continue
        later += 1
        xs, xt = to_host(stop.x), to_host(step.x)

        def model(p):
            return g @ p + 0.5 * p @ (A + lam * numpy.eye(n)) @ p

        def loss(p):
            return g @ p + 0.5 * p @ A @ p + 0.25 * kappa * (p @ p) ** 2

        assert model(xt) < model(xs) < 0
        assert loss(xt) < loss(xs) < 0
        assert g @ xt < g @ xs < 0
        assert step.model_value == pytest.approx(model(xt), rel=1e-10)
        assert step.curvature == pytest.approx(xt @ A @ xt, rel=1e-10)
        d = xt - xs  # along the disturbing direction, with the reflected-curvature length
        assert d @ A @ d < -lam * (d @ d)
        assert numpy.linalg.norm(d) > 0
        results.append(step)
    assert later >= 3, "too few seeds met negative curvature after the first iteration"
    with pytest.raises(ValueError, match="negative_curvature"):
        truncated_cg(mv, xp.asarray(-g), negative_curvature="walk")
    return record(*results)


@twinned
def test_forcing_exponent_one_is_the_quadratic_forcing_term(xp):
    n = 40
    A = spd_matrix(n, 11, cond=1e4)
    g = 1e-2 * numpy.random.default_rng(12).standard_normal(n)
    mv, _ = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), max_iter=200, forcing_exponent=1.0)
    half = truncated_cg(mv, xp.asarray(-g), max_iter=200)
    gn = numpy.linalg.norm(g)
    assert numpy.linalg.norm(A @ to_host(res.x) + g) <= min(0.5, gn) * gn * (1 + 1e-8)
    assert res.iterations > half.iterations  # eta = ||g|| = 0.06 is tighter than sqrt(||g||) = 0.25
    return record(res, half)


@twinned
def test_negative_curvature_at_first_direction_returns_scaled_steepest_descent(xp):
    n = 6
    A = -numpy.eye(n) * 2.0 + 0.1 * spd_matrix(n, 9, cond=2.0)
    g = numpy.random.default_rng(10).standard_normal(n)
    curv = g @ A @ g
    assert curv < 0
    mv, _ = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), max_iter=10)
    x = to_host(res.x)
    assert res.exit_reason == "negative_curvature" and res.iterations == 0
    numpy.testing.assert_allclose(x, -(g @ g) / abs(curv) * g, rtol=1e-13)
    assert g @ x < 0
    assert res.curvature == pytest.approx(x @ A @ x, rel=1e-12)
    return record(res)


@twinned
def test_curvature_threshold_is_relative_to_direction_norm(xp):
    n = 5
    A = numpy.diag([1e-3, 2e-3, 3e-3, 4e-3, 5e-3])
    g = numpy.ones(n)
    mv, _ = counted(xp, A)
    assert truncated_cg(mv, xp.asarray(-g), rtol=1e-12, adaptive_rtol=False).exit_reason == "converged"
    res = truncated_cg(mv, xp.asarray(-g), curvature_threshold=1e-2)
    assert res.exit_reason == "negative_curvature" and res.iterations == 0
    return record(res)


@twinned
def test_adaptive_residual_rule_and_iteration_cap(xp):
    n = 40
    A = spd_matrix(n, 11, cond=1e4)
    g = 1e-2 * numpy.random.default_rng(12).standard_normal(n)
    mv, _ = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), max_iter=200)
    eta = min(0.5, math.sqrt(numpy.linalg.norm(g)))
    x = to_host(res.x)
    true_r = numpy.linalg.norm(A @ x + g)
    assert res.exit_reason == "converged"
    assert true_r <= eta * numpy.linalg.norm(g) * (1 + 1e-8)
    capped = truncated_cg(mv, xp.asarray(-g), rtol=1e-15, adaptive_rtol=False, max_iter=3)
    assert capped.exit_reason == "max_iter" and capped.iterations == 3 and capped.n_matvec == 3
    return record(res, capped)


@twinned
def test_martens_progress_rule_stops_before_the_cap(xp):
    # gradient weighted towards the large eigenvalues: CG gains most of the model decrease early
    # and then crawls through the small ones, which is what the rule detects
    n = 300
    rng = numpy.random.default_rng(13)
    q, _ = numpy.linalg.qr(rng.standard_normal((n, n)))
    eig = numpy.geomspace(1e-4, 1e4, n)
    A = (q * eig) @ q.T
    g = q @ (eig * rng.standard_normal(n))
    mv, _ = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), rtol=0.0, max_iter=300, model_decrease_check=True)
    assert res.exit_reason == "model_stalled"
    i = res.iterations
    assert 10 < i < 300
    k = max(10, math.ceil(0.1 * i))
    # recompute the model values of plain CG in float64 and check the rule at i and not before
    _, xs = reference_cg_directions(A, -g, i)
    phi = [0.5 * x @ A @ x + g @ x for x in xs]
    assert (phi[i] - phi[i - k]) / phi[i] < k * 5e-4
    for j in range(1, i):
        kj = max(10, math.ceil(0.1 * j))
        if j > kj:
            assert not (phi[j] < 0 and (phi[j] - phi[j - kj]) / phi[j] < kj * 5e-4 * (1 - 1e-6))
    assert res.model_value == pytest.approx(phi[i], rel=1e-9)
    return record(res, rtol=1e-9)  # condition number 1e8 and a hundred iterations: rounding grows


@twinned
def test_kept_iterates_follow_martens_schedule(xp):
    n = 60
    A = spd_matrix(n, 15, cond=1e3)
    g = numpy.random.default_rng(16).standard_normal(n)
    mv, _ = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), rtol=0.0, max_iter=30, keep_iterates=True)
    its = [it.iteration for it in res.iterates]
    sched = martens_schedule()
    expected = []
    s = next(sched)
    while s <= 30:
        expected.append(s)
        s = next(sched)
    if expected[-1] != 30:
        expected.append(30)
    assert expected[:4] == [5, 7, 9, 11]
    assert its == expected
    _, xs = reference_cg_directions(A, -g, 30)
    for it in res.iterates:
        x = to_host(it.x)
        numpy.testing.assert_allclose(x, xs[it.iteration], rtol=1e-8, atol=1e-10 * numpy.linalg.norm(xs[it.iteration]))
        assert float(to_host(it.gTp)) == pytest.approx(g @ x, rel=1e-10)
        assert float(to_host(it.curvature)) == pytest.approx(x @ A @ x, rel=1e-10)
    return record(res)


def test_exit_codes():
    assert [exit_code(r) for r in EXIT_REASONS] == list(range(len(EXIT_REASONS)))
    with pytest.raises(ValueError, match="unknown CG exit reason"):
        exit_code("bogus")


@twinned
def test_zero_gradient_returns_zero_step(xp):
    mv, calls = counted(xp, numpy.eye(3))
    res = truncated_cg(mv, xp.zeros(3))
    assert res.exit_reason == "converged" and res.iterations == 0 and not calls
    assert float(to_host(abs(res.x).max())) == 0.0
    return record(res)


@twinned
def test_nan_gradient_is_refused(xp):
    mv, _ = counted(xp, numpy.eye(3))
    with pytest.raises(ValueError, match="NaN or Inf"):
        truncated_cg(mv, xp.asarray([1.0, numpy.nan, 0.0]))


@pytest.mark.parametrize("seed", [3, 11, 21])
@twinned
def test_float32_residual_underflow_ends_as_converged(xp, seed):
    # Hessian-free's first steps: lambda = 45 dominates a small Gauss-Newton matrix, so each CG
    # iteration divides the (recurrence) residual by ~1e4, far below float32 rounding, until
    # r^T M^{-1} r underflows to 0 while r^T r does not, before Martens' progress rule may stop
    # (it needs i > 10). The next beta was 0/0: with these seeds the former loop raised on a NaN
    # curvature (11) or mislabelled the exit as negative curvature (3, 21). CG must stop as
    # converged with the float32-accurate solution.
    n = 40
    rng = numpy.random.default_rng(seed)
    B = rng.standard_normal((n, n)) * 1e-2
    A = B @ B.T
    b = rng.standard_normal(n) * 0.05
    lam = 45.0
    m = xp.asarray(((numpy.diag(A) + lam) ** 0.75).astype(numpy.float32))  # Martens' preconditioner
    mv, _ = counted(xp, A.astype(numpy.float32))
    with numpy.errstate(divide="raise", invalid="raise", over="raise"):  # no 0/0 on the way (NumPy side)
        res = truncated_cg(mv, xp.asarray(b.astype(numpy.float32)), damping=lam, rtol=0.0, max_iter=250,
                           model_decrease_check=True, preconditioner=lambda r: r / m)
    assert res.exit_reason == "converged"
    assert res.iterations <= 10
    x = to_host(res.x)
    assert x.dtype == numpy.float32 and numpy.isfinite(x).all()
    exact = numpy.linalg.solve(A + lam * numpy.eye(n), b)
    assert numpy.linalg.norm(x - exact) <= 1e-6 * numpy.linalg.norm(exact)
    return record(res)
