"""engine.ops' first-order forms inside a declared complex-step pass: f(a) + i b f'(a) from real
f and f' against 50-digit values of the analytic functions, the same accuracy as the full complex
functions, and nothing changed outside a declared pass (docs/complex-step.md section 5.3)."""

import mpmath
import numpy
import pytest

from engine import losses, ops
from engine.backend import to_host
from engine.products import complex_step

EPS = numpy.finfo(numpy.float64).eps
H = 1e-30
#: real parts: both tails (sigmoid' down to 1e-261), the branch point 0, and where 1 - s or 1 - t^2 cancels
POINTS = [-600.0, -40.0, -20.0, -1.5, -1e-8, 0.0, 1e-8, 0.3, 2.0, 20.0, 40.0, 300.0]
MP = {  # the analytic function, evaluated at a + i h in 50 digits
    "sigmoid": lambda z: 1 / (1 + mpmath.exp(-z)),
    "softplus": lambda z: mpmath.log1p(mpmath.exp(z)),
    "tanh": mpmath.tanh,
    "exp": mpmath.exp,
}
FUNCS = {"sigmoid": ops.sigmoid, "softplus": ops.softplus, "tanh": ops.tanh, "exp": ops.exp}


def _mp(name, a):
    with mpmath.workdps(50):
        v = MP[name](mpmath.mpc(a, H))
        return float(v.real), float(v.imag / H)


def _errors(got, name, points):
    """Relative errors of Re and Im/h at each point against the 50-digit values (0 where both underflow)."""
    out = []
    for a, g in zip(points, got):
        ref, dref = _mp(name, a)
        out.append(abs(g.real - ref) / max(abs(ref), 1e-300))
        out.append(0.0 if dref == 0 and abs(g.imag) < 1e-300 else abs(g.imag / H - dref) / max(abs(dref), 1e-300))
    return numpy.array(out)


@pytest.mark.parametrize("name", list(FUNCS))
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_first_order_forms_match_50_digits_as_well_as_the_full_functions(xp, name):
    points = [a for a in POINTS if not (name == "exp" and a > 40)]
    z = xp.asarray(numpy.array(points) + 1j * H, dtype=xp.complex128)
    full = to_host(FUNCS[name](z))
    with complex_step(H):
        assert ops.first_order(z)
        first = to_host(FUNCS[name](z))
    e_first, e_full = _errors(first, name, points), _errors(full, name, points)
    assert first.dtype == numpy.complex128
    assert e_first.max() <= 4 * EPS, (name, e_first)
    assert (e_first <= 2 * e_full + 2 * EPS).all(), (name, e_first, e_full)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_first_order_log_softmax_and_losses(xp):
    rng = numpy.random.default_rng(5)
    a, b = rng.standard_normal((4, 6)) * 3, rng.standard_normal((4, 6))
    z = xp.asarray(a + 1j * H * b)
    with mpmath.workdps(50):
        ref = numpy.array([[complex(zj - mpmath.log(sum(mpmath.exp(mpmath.mpc(ak, H * bk)) for ak, bk in zip(ar, br))))
                            for zj in (mpmath.mpc(ak, H * bk) for ak, bk in zip(ar, br))] for ar, br in zip(a, b)])
    with complex_step(H):
        got = to_host(ops.log_softmax(z, axis=1))
        sm = to_host(ops.softmax(z, axis=1))
    numpy.testing.assert_allclose(got.real, ref.real, rtol=4 * EPS, atol=4 * EPS)
    numpy.testing.assert_allclose(got.imag / H, ref.imag / H, rtol=1e-14, atol=1e-15)
    numpy.testing.assert_allclose(sm.imag / H, numpy.exp(ref.real) * ref.imag / H, rtol=1e-14, atol=1e-15)
    for loss, y in ((losses.SigmoidCrossEntropy(), xp.asarray(rng.random((4, 6)))),
                    (losses.SoftmaxCrossEntropy(), xp.asarray(rng.integers(0, 6, 4)))):
        v_full, g_full = loss.value_and_grad(z, y)
        with complex_step(H):
            v_first, g_first = loss.value_and_grad(z, y)
        for got_, want in ((v_first, v_full), (g_first, g_full)):
            got_, want = numpy.asarray(to_host(got_)), numpy.asarray(to_host(want))
            numpy.testing.assert_allclose(got_.real, want.real, rtol=4 * EPS, atol=1e-16)
            numpy.testing.assert_allclose(got_.imag / H, want.imag / H, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list(FUNCS) + ["log_softmax"])
def test_outside_a_declared_pass_the_full_functions_run(xp, name):
    """No declaration, a step too large (the precision study's), or float input: bit for bit the full function."""
    f = ops.log_softmax if name == "log_softmax" else FUNCS[name]
    rng = numpy.random.default_rng(6)
    z = xp.asarray(rng.standard_normal((3, 5)) + 1j * rng.standard_normal((3, 5)))  # a general complex input
    want = to_host(f(z))
    assert not ops.first_order(z)
    with complex_step(1e-3):
        assert not ops.first_order(z)
        numpy.testing.assert_array_equal(to_host(f(z)), want)
    with complex_step(H):
        assert not ops.first_order(z.real)
        numpy.testing.assert_array_equal(to_host(f(z.real)), to_host(f(z.real.copy())))
