"""solvers.bfgs: the BFGS inverse update against the textbook product form, and its skip rule.

Each body runs under the ``xp`` fixture and returns what it computed; on the CuPy half that must
agree with the NumPy run (``twinned``, tests/solvers/common.py)."""

import numpy
import pytest

from solvers.bfgs import add_symmetric_rank2, bfgs_inverse_update, matvec, select
from tests.solvers.common import Tol, twinned


def spd(rng, d, dtype=numpy.float64):
    q = rng.standard_normal((d, d))
    return (q @ q.T / d + 0.5 * numpy.eye(d)).astype(dtype)


def textbook(H, s, y):
    """(I - rho s y^T) H (I - rho y s^T) + rho s s^T in float64 (Nocedal & Wright eq. 6.17)."""
    H, s, y = (numpy.asarray(a, dtype=numpy.float64) for a in (H, s, y))
    rho = 1.0 / (s @ y)
    E = numpy.eye(len(s)) - rho * numpy.outer(s, y)
    return E @ H @ E.T + rho * numpy.outer(s, s)


def to_np(a):
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


@twinned
def test_secant_condition_symmetry_and_positive_definiteness(xp):
    rng = numpy.random.default_rng(0)
    d = 7
    H = spd(rng, d)
    s = rng.standard_normal(d)
    y = s + 0.3 * rng.standard_normal(d)  # s^T y > 0
    assert s @ y > 0
    H_new, skipped = bfgs_inverse_update(xp.asarray(H), xp.asarray(s), xp.asarray(y), xp.asarray(y))
    H_new = to_np(H_new)
    assert not bool(skipped)
    numpy.testing.assert_allclose(H_new @ y, s, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(H_new, textbook(H, s, y), rtol=1e-12, atol=1e-12)
    assert numpy.array_equal(H_new, H_new.T)
    assert numpy.linalg.eigvalsh(H_new).min() > 0
    return {"H": H_new, "skipped": skipped}


@twinned
def test_float32_updates_stay_exactly_symmetric_pd(xp):
    """Pitfall 16: thousands of rank-2 updates in float32 keep H exactly symmetric."""
    rng = numpy.random.default_rng(1)
    d = 12
    H = xp.asarray(numpy.eye(d, dtype=numpy.float32))
    B = spd(rng, d)  # a fixed quadratic: y = B s
    for _ in range(2000):
        s = rng.standard_normal(d).astype(numpy.float32)
        y = (B @ s).astype(numpy.float32)
        H, _ = bfgs_inverse_update(H, xp.asarray(s), xp.asarray(y), xp.asarray(y))
    Hn = to_np(H)
    assert Hn.dtype == numpy.float32
    assert numpy.array_equal(Hn, Hn.T)
    assert numpy.linalg.eigvalsh(Hn.astype(numpy.float64)).min() > 0
    numpy.testing.assert_allclose(Hn, numpy.linalg.inv(B), rtol=2e-2, atol=2e-3)
    return {"H": Tol(Hn, 1e-3)}  # 2000 float32 updates: the rounding of the two runs drifts apart


@twinned
def test_skip_rules(xp):
    rng = numpy.random.default_rng(2)
    d = 5
    H = xp.asarray(spd(rng, d))
    s = rng.standard_normal(d)
    g = xp.asarray(rng.standard_normal(d))
    # s^T y <= 0
    out, skipped = bfgs_inverse_update(H, xp.asarray(s), xp.asarray(-s), g)
    assert bool(skipped) and out is H or numpy.array_equal(to_np(out), to_np(H))
    # 0 < s^T y <= 1e-4 s^T s ||g_ref||
    y = s * 1e-5
    gn = float(numpy.linalg.norm(to_np(g)))
    assert 0 < s @ y <= 1e-4 * (s @ s) * max(gn, 1.0)
    big_g = g * (1.0 / gn) * 2.0  # ||g_ref|| = 2
    _, skipped = bfgs_inverse_update(H, xp.asarray(s), xp.asarray(y), big_g)
    assert bool(skipped)
    # the same pair passes with a tiny reference gradient
    _, skipped = bfgs_inverse_update(H, xp.asarray(s), xp.asarray(y), big_g * 1e-3)
    assert not bool(skipped)
    # the update would overflow to inf (float32)
    H32 = xp.asarray(numpy.eye(d, dtype=numpy.float32))
    s32 = xp.asarray(numpy.full(d, 1e19, dtype=numpy.float32))
    y32 = xp.asarray(numpy.full(d, 1e-18, dtype=numpy.float32))
    with numpy.errstate(all="ignore"):
        out, skipped = bfgs_inverse_update(H32, s32, y32, xp.zeros(d, dtype=numpy.float32))
    assert bool(skipped)
    assert numpy.array_equal(to_np(out), numpy.eye(d, dtype=numpy.float32))
    # NaN in the pair: skipped, H unchanged
    with numpy.errstate(all="ignore"):
        out, skipped = bfgs_inverse_update(H, xp.asarray(numpy.full(d, numpy.nan)), xp.asarray(s), g)
    assert bool(skipped) and numpy.array_equal(to_np(out), to_np(H))
    return {"H": out, "skipped": skipped}


@twinned
def test_symmetric_rank2_and_helpers(xp):
    rng = numpy.random.default_rng(3)
    H = spd(rng, 6)
    s, w = rng.standard_normal(6), 1e3 * rng.standard_normal(6)
    out = to_np(add_symmetric_rank2(xp.asarray(H), xp.asarray(s), xp.asarray(w)))
    numpy.testing.assert_allclose(out, H + numpy.outer(s, w) + numpy.outer(w, s), rtol=1e-12, atol=1e-9)
    assert numpy.array_equal(out, out.T)
    # zero vectors give H exactly
    z = numpy.zeros(6)
    assert numpy.array_equal(to_np(add_symmetric_rank2(xp.asarray(H), xp.asarray(z), xp.asarray(w))), H)
    numpy.testing.assert_allclose(to_np(matvec(xp.asarray(H), xp.asarray(s))), H @ s, rtol=1e-13)
    a, b = xp.asarray(H), xp.asarray(H * 2)
    assert numpy.array_equal(to_np(select(xp.asarray(True), a, b)), H)
    assert numpy.array_equal(to_np(select(xp.asarray(False), a, b)), 2 * H)
    return {"out": out}


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="square H"):
        bfgs_inverse_update(numpy.eye(3), numpy.ones(2), numpy.ones(2), numpy.ones(2))


@twinned
def test_inplace_update_matches_and_skips_without_touching_h(xp):
    """The solvers' in-place path: same H+, and skipped pairs (incl. would-be overflow) leave H as is."""
    rng = numpy.random.default_rng(4)
    d = 6
    H = spd(rng, d)
    s = rng.standard_normal(d)
    y = s + 0.2 * rng.standard_normal(d)
    H_dev = xp.asarray(H.copy())
    out, skipped = bfgs_inverse_update(H_dev, xp.asarray(s), xp.asarray(y), xp.asarray(y), inplace=True)
    assert out is H_dev and not bool(skipped)
    numpy.testing.assert_allclose(to_np(out), textbook(H, s, y), rtol=1e-12, atol=1e-12)
    before = to_np(H_dev).copy()
    _, skipped = bfgs_inverse_update(H_dev, xp.asarray(s), xp.asarray(-y), xp.asarray(y), inplace=True)
    assert bool(skipped) and numpy.array_equal(to_np(H_dev), before)
    H32 = xp.asarray(numpy.eye(d, dtype=numpy.float32))
    with numpy.errstate(all="ignore"):
        _, skipped = bfgs_inverse_update(H32, xp.asarray(numpy.full(d, 1e19, dtype=numpy.float32)),
                                         xp.asarray(numpy.full(d, 1e-18, dtype=numpy.float32)),
                                         xp.zeros(d, dtype=numpy.float32), inplace=True)
    assert bool(skipped) and numpy.array_equal(to_np(H32), numpy.eye(d, dtype=numpy.float32))
    return {"H": out}
