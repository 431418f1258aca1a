"""Steihaug-Toint truncated CG (``truncated_cg(..., radius=Delta)``) against dense references.

Three independent references on the host: a textbook dense implementation of Nocedal & Wright's
Algorithm 7.2 written here (its own root finding through ``numpy.roots``), the exact solution of
the trust-region subproblem (eigendecomposition and bisection on the secular equation, Nocedal &
Wright section 4.3), and a quartic loss whose quadratic part is the model.
"""

import numpy
import pytest

from engine.backend import to_host
from solvers.krylov import boundary_step, truncated_cg
from tests.solvers.common import twinned
from tests.solvers.test_krylov import counted, indefinite, record, spd_matrix


def textbook_steihaug(A, g, radius, tol, max_iter):
    """Nocedal & Wright 2006, Algorithm 7.2 (CG-Steihaug), dense, from z_0 = 0: (p, exit)."""
    def to_boundary(z, d):
        # tau >= 0 with ||z + tau d|| = radius: the larger root of the quadratic in tau
        roots = numpy.roots([d @ d, 2 * z @ d, z @ z - radius ** 2]).real
        return z + max(roots) * d

    z = numpy.zeros_like(g)
    r = g.copy()
    d = -r
    if numpy.linalg.norm(r) < tol:
        return z, "converged"
    for _ in range(max_iter):
        dBd = d @ A @ d
        if dBd <= 0:
            return to_boundary(z, d), "negative_curvature"
        alpha = (r @ r) / dBd
        z_next = z + alpha * d
        if numpy.linalg.norm(z_next) >= radius:
            return to_boundary(z, d), "boundary"
        r_next = r + alpha * A @ d
        if numpy.linalg.norm(r_next) < tol:
            return z_next, "converged"
        d = -r_next + (r_next @ r_next) / (r @ r) * d
        z, r = z_next, r_next
    return z, "max_iter"


def exact_trust_region(A, g, radius):
    """argmin g^T p + 1/2 p^T A p over ||p|| <= radius (the hard case excluded): p(lam) =
    -(A + lam I)^{-1} g with lam >= max(0, -lambda_min) and ||p(lam)|| = radius unless lam = 0 is
    interior; bisection on the secular equation in the eigenbasis."""
    eig, q = numpy.linalg.eigh(A)
    gq = q.T @ g

    def p_norm(lam):
        return numpy.linalg.norm(gq / (eig + lam))

    lo = max(0.0, -eig[0]) + 1e-14
    if eig[0] > 0 and p_norm(0.0) <= radius:
        return -q @ (gq / eig)
    hi = lo + numpy.linalg.norm(g) / radius + abs(eig).max() + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if p_norm(mid) > radius else (lo, mid)
    return -q @ (gq / (eig + hi))


def model(A, g, p):
    return g @ p + 0.5 * p @ A @ p


@pytest.mark.parametrize("xx, xd, dd, radius, tau", [
    (0.0, 0.0, 4.0, 3.0, 1.5),          # from the origin: radius / ||d||
    (1.0, 1.0, 1.0, 2.0, -1.0 + 2.0),   # x = d = e1: 1 + tau = 2
    (1.0, -1.0, 1.0, 2.0, 3.0),         # x = e1, d = -e1: |1 - tau| = 2, tau >= 0
    (4.0, 0.0, 1.0, 2.0, 0.0),          # on the boundary already
    (5.0, 1.0, 1.0, 2.0, 0.0),          # outside by rounding: no move
    (1.0, 0.5, 0.0, 2.0, 0.0),          # d = 0
])
def test_boundary_step_cases(xx, xd, dd, radius, tau):
    assert boundary_step(xx, xd, dd, radius) == pytest.approx(tau, abs=1e-15)


def test_boundary_step_lands_on_the_sphere():
    rng = numpy.random.default_rng(0)
    for _ in range(200):
        x, d = rng.standard_normal(5) * rng.uniform(0.01, 1), rng.standard_normal(5) * 10.0 ** rng.uniform(-6, 6)
        radius = numpy.linalg.norm(x) * rng.uniform(1.0, 10.0)
        tau = boundary_step(x @ x, x @ d, d @ d, radius)
        assert tau >= 0
        assert numpy.linalg.norm(x + tau * d) == pytest.approx(radius, rel=1e-12)


@twinned
def test_steihaug_is_the_textbook_algorithm(xp):
    """Same point, same exit as the dense Algorithm 7.2 on SPD and indefinite systems, for radii
    from well inside the first CG step to beyond the Newton step."""
    n, results, exits = 10, [], set()
    for seed in range(8):
        A = spd_matrix(n, seed, cond=1e2) if seed % 2 else indefinite(n, seed, negative=2)
        g = numpy.random.default_rng(50 + seed).standard_normal(n)
        for radius in (0.05, 0.3, 1.0, 5.0, 100.0):
            ref, why = textbook_steihaug(A, g, radius, tol=1e-11 * numpy.linalg.norm(g), max_iter=3 * n)
            mv, _ = counted(xp, A)
            res = truncated_cg(mv, xp.asarray(-g), radius=radius, rtol=1e-11, adaptive_rtol=False, max_iter=3 * n)
            p = to_host(res.x)
            assert res.exit_reason == why, (seed, radius)
            assert numpy.linalg.norm(p - ref) <= 1e-9 * numpy.linalg.norm(ref)
            assert numpy.linalg.norm(p) <= radius * (1 + 1e-12)
            assert res.model_value == pytest.approx(model(A, g, p), rel=1e-9)
            assert res.gTp == pytest.approx(g @ p, rel=1e-9)
            exits.add(why)
            results.append(res)
    assert exits == {"converged", "boundary", "negative_curvature"}
    return record(*results)


@twinned
def test_steihaug_against_the_exact_trust_region_solution(xp):
    """On tiny SPD problems: the exact solution when the Newton step is inside; on the boundary
    otherwise, with at least half the optimal model decrease (Yuan 2000) and at least the Cauchy
    point's."""
    results = []
    for seed in range(20):
        n = 2 + seed % 4
        A = spd_matrix(n, seed, cond=30.0)
        g = numpy.random.default_rng(200 + seed).standard_normal(n)
        newton = numpy.linalg.norm(numpy.linalg.solve(A, g))
        for radius in (0.1 * newton, 0.5 * newton, 0.9 * newton, 2.0 * newton):
            mv, _ = counted(xp, A)
            res = truncated_cg(mv, xp.asarray(-g), radius=radius, rtol=1e-12, adaptive_rtol=False, max_iter=4 * n)
            p, exact = to_host(res.x), exact_trust_region(A, g, radius)
            gHg = g @ A @ g
            cauchy = -min(numpy.linalg.norm(g) ** 3 / (radius * gHg), 1.0) * radius / numpy.linalg.norm(g) * g
            m, m_exact = model(A, g, p), model(A, g, exact)
            if radius > newton:
                assert res.exit_reason == "converged"
                assert numpy.linalg.norm(p - exact) <= 1e-8 * numpy.linalg.norm(exact)
            else:
                assert res.exit_reason == "boundary"
                assert numpy.linalg.norm(p) == pytest.approx(radius, rel=1e-12)
                assert m_exact <= m * (1 - 1e-12) or m == pytest.approx(m_exact, rel=1e-10)
                assert m <= 0.5 * m_exact
                assert m <= model(A, g, cauchy) * (1 - 1e-12)
            results.append(res)
    return record(*results)


@twinned
def test_negative_curvature_goes_to_the_boundary_and_lowers_model_and_loss(xp):
    """Indefinite systems built by hand: with a radius, the disturbing direction is followed to
    the boundary; the model and a quartic loss with that quadratic part fall below the values of
    the iterate plain truncated CG stops at, and below zero when the very first direction has
    negative curvature (the Cauchy-like point -Delta g/||g||)."""
    n, kappa, radius = 12, 1e-2, 2.0
    results, later, first = [], 0, 0
    cases = [(indefinite(n, seed, negative=3), numpy.random.default_rng(100 + seed).standard_normal(n)) for seed in range(16)]
    tilted = numpy.full(n, 0.1)
    tilted[0] = 1.0  # mostly along the eigenvector of -1: g^T A g < 0 at the first direction
    cases.append((numpy.diag(numpy.r_[-1.0, numpy.linspace(0.5, 2.0, n - 1)]), tilted))
    for A, g in cases:
        mv, _ = counted(xp, A)
        stop = truncated_cg(mv, xp.asarray(-g), rtol=1e-14, adaptive_rtol=False, max_iter=3 * n)
        tr = truncated_cg(mv, xp.asarray(-g), rtol=1e-14, adaptive_rtol=False, max_iter=3 * n, radius=radius)
        xs, xt = to_host(stop.x), to_host(tr.x)
        if numpy.linalg.norm(xs) >= radius:
            continue  # plain CG left the region before meeting the disturbing direction

        def loss(p):
            return model(A, g, p) + 0.25 * kappa * (p @ p) ** 2

        assert stop.exit_reason == tr.exit_reason == "negative_curvature"
        assert numpy.linalg.norm(xt) == pytest.approx(radius, rel=1e-12)
        assert model(A, g, xt) < model(A, g, xs) <= 0
        assert loss(xt) < loss(xs) <= 0
        assert g @ xt < 0
        if stop.iterations == 0:
            first += 1
            assert numpy.linalg.norm(xt + radius * g / numpy.linalg.norm(g)) <= 1e-12 * radius
        else:
            later += 1
        results.append(tr)
    assert later >= 3 and first >= 1, (later, first)
    return record(*results)


@twinned
def test_warm_start_outside_the_region_is_pulled_onto_its_boundary(xp):
    n, radius = 8, 0.5
    A = spd_matrix(n, 3, cond=10.0)
    g = numpy.random.default_rng(3).standard_normal(n)
    x0 = 10 * numpy.linalg.solve(A, -g)
    mv, calls = counted(xp, A)
    res = truncated_cg(mv, xp.asarray(-g), xp.asarray(x0), radius=radius, rtol=1e-12, adaptive_rtol=False)
    p = to_host(res.x)
    assert numpy.linalg.norm(p) <= radius * (1 + 1e-12)
    assert res.model_value == pytest.approx(model(A, g, p), rel=1e-9)
    assert res.n_matvec == len(calls)
    with pytest.raises(ValueError, match="radius"):
        truncated_cg(mv, xp.asarray(-g), radius=-1.0)
    return record(res)
