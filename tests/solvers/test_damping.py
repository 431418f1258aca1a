"""solvers.damping: Powell, B = I and double damping (docs/kbfgs.md section 4.4, docs/kbfgs.md pitfalls 5 and 18).

Each body runs under the ``xp`` fixture and returns what it computed; on the CuPy half that must
agree with the NumPy run (``twinned``, tests/solvers/common.py)."""

import numpy
import pytest

from solvers.damping import double_damping, lm_damping, powell_damping
from tests.solvers.common import twinned


def to_np(a):
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


def spd(rng, d):
    q = rng.standard_normal((d, d))
    return q @ q.T / d + 0.5 * numpy.eye(d)


@pytest.mark.parametrize("seed", range(6))
@twinned
def test_powell_damping_property(xp, seed):
    """After firing, s~^T y = mu1 y^T H y; when r > mu1, s is returned unchanged."""
    rng = numpy.random.default_rng(seed)
    d = 8
    H = spd(rng, d)
    y = rng.standard_normal(d)
    out = []
    for s in (rng.standard_normal(d), -y, 1e-3 * rng.standard_normal(d), H @ y):
        Hy = H @ y
        r = (s @ y) / (y @ Hy)
        s_d, fired = powell_damping(xp.asarray(s), xp.asarray(y), xp.asarray(Hy), 0.2)
        out.append((s_d, fired))
        s_d = to_np(s_d)
        assert bool(fired) == (r <= 0.2)
        if bool(fired):
            assert s_d @ y == pytest.approx(0.2 * (y @ Hy), rel=1e-10)
            theta = 0.8 * (y @ Hy) / (y @ Hy - s @ y)  # the reference formula
            numpy.testing.assert_allclose(s_d, theta * s + (1 - theta) * Hy, rtol=1e-12)
        else:
            assert numpy.array_equal(s_d, s)
    return out


@pytest.mark.parametrize("mu2", [0.1, numpy.sqrt(0.3), 0.9])
@twinned
def test_lm_damping_property(xp, mu2):
    """After firing, s^T y~ = mu2 s^T s (mu2 < 1: the convex Powell weight with B = I)."""
    rng = numpy.random.default_rng(7)
    d = 8
    out = []
    for _ in range(20):
        s, y = rng.standard_normal(d), rng.standard_normal(d)
        y_d, fired = lm_damping(xp.asarray(s), xp.asarray(y), mu2)
        out.append((y_d, fired))
        y_d = to_np(y_d)
        assert bool(fired) == ((s @ y) / (s @ s) <= mu2)
        if bool(fired):
            assert s @ y_d == pytest.approx(mu2 * (s @ s), rel=1e-10)
            theta = (1 - mu2) * (s @ s) / (s @ s - s @ y)
            assert 0 <= theta <= 1
            numpy.testing.assert_allclose(y_d, theta * y + (1 - theta) * s, rtol=1e-12)
        else:
            assert numpy.array_equal(y_d, y)
    return out


@twinned
def test_division_guards(xp):
    """Pitfall 18: y^T H y = 0, lambda >= 1 (theta2 outside [0, 1]) and 0/0 give finite pairs."""
    d = 4
    s = numpy.array([1.0, 2.0, -1.0, 0.5])
    H = numpy.eye(d)
    # y = 0: y^T H y = 0, Powell does not fire (no division by zero)
    s_d, fired = powell_damping(xp.asarray(s), xp.asarray(numpy.zeros(d)), xp.asarray(numpy.zeros(d)), 0.2)
    assert not bool(fired) and numpy.array_equal(to_np(s_d), s)
    # mu2 >= 1 with s^T y < s^T s: the Powell weight would be negative -> additive correction
    out = []
    for mu2, y in ((1.7, 0.5 * s), (1.7, s.copy()), (1.0, -s), (2.0, 1.5 * s)):
        y_d, fired = lm_damping(xp.asarray(s), xp.asarray(y), mu2)
        out.append(y_d)
        y_d = to_np(y_d)
        assert bool(fired)
        assert numpy.isfinite(y_d).all()
        assert s @ y_d == pytest.approx(mu2 * (s @ s), rel=1e-12)
    # s = 0: B = I damping does not fire
    y_d, fired = lm_damping(xp.asarray(numpy.zeros(d)), xp.asarray(s), 0.5)
    assert not bool(fired) and numpy.array_equal(to_np(y_d), s)
    del H
    return out


@twinned
def test_double_damping_order_and_inputs_untouched(xp):
    """Powell on s with H first, then B = I on y with the damped s~ (docs/kbfgs.md pitfall 5)."""
    rng = numpy.random.default_rng(11)
    d = 6
    H = spd(rng, d)
    y = rng.standard_normal(d)
    s = -0.5 * y + 0.01 * rng.standard_normal(d)  # negative curvature: both dampings fire
    s0, y0 = s.copy(), y.copy()
    mu1, mu2 = 0.2, numpy.sqrt(0.3)
    sx, yx = xp.asarray(s), xp.asarray(y)
    s_d, y_d, p_fired, l_fired = double_damping(sx, yx, xp.asarray(H), mu1, mu2=mu2)
    s_d, y_d = to_np(s_d), to_np(y_d)
    assert bool(p_fired)
    assert s_d @ y == pytest.approx(mu1 * (y @ H @ y), rel=1e-10)
    if bool(l_fired):
        assert s_d @ y_d == pytest.approx(mu2 * (s_d @ s_d), rel=1e-10)
    assert s_d @ y_d > 0
    assert numpy.array_equal(to_np(sx), s0) and numpy.array_equal(to_np(yx), y0)
    # a callable H (the L-BFGS operator of K-BFGS(L)) gives the same result
    s_c, y_c, _, _ = double_damping(sx, yx, lambda v: xp.asarray(H) @ v, mu1, mu2=mu2)
    numpy.testing.assert_allclose(to_np(s_c), s_d, rtol=1e-12)
    numpy.testing.assert_allclose(to_np(y_c), y_d, rtol=1e-12)
    return {"s": s_d, "y": y_d, "powell": p_fired, "lm": l_fired}
