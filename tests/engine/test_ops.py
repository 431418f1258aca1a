"""engine.ops: stability at +-1000 (real and complex) and derivatives against the complex step."""

import mpmath
import numpy
import pytest

from engine import ops
from engine.backend import to_host


@pytest.mark.parametrize("f, ref", [
    (ops.sigmoid, lambda a: 1 / (1 + numpy.exp(-a))),
    (ops.softplus, lambda a: numpy.logaddexp(0, a)),
    (ops.tanh, numpy.tanh),
])
def test_values_match_textbook_form(xp, f, ref):
    a = numpy.linspace(-30, 30, 121)
    assert numpy.allclose(numpy.asarray(xp.asnumpy(f(xp.asarray(a))) if hasattr(xp, "asnumpy") else f(a)), ref(a), rtol=1e-14, atol=1e-300)


@pytest.mark.parametrize("f, df", [
    (ops.sigmoid, lambda a: 0.5 / (1 + numpy.cosh(a))),          # s(1-s) = 1/(2(1+cosh a))
    (ops.softplus, lambda a: 1 / (1 + numpy.exp(-a))),            # sigmoid
    (ops.tanh, lambda a: 1 / numpy.cosh(a) ** 2 if abs(a) < 700 else 0.0),
])
@pytest.mark.parametrize("a", [-1000.0, -30.0, -1.5, 0.3, 2.0, 30.0, 1000.0])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_stable_and_complex_step_exact(xp, f, df, a):
    h = 1e-30
    real = f(xp.asarray([a]))
    cplx = f(xp.asarray([a + 1j * h], dtype=xp.complex128))
    assert bool(xp.isfinite(real).all()) and bool(xp.isfinite(cplx).all())
    assert float(abs(cplx.real[0] - real[0])) <= 1e-15 * max(1.0, float(abs(real[0])))
    want = df(a)
    got = float(cplx.imag[0]) / h
    assert abs(got - want) <= 1e-14 * max(abs(want), 1e-300) or (want == 0 and abs(got) < 1e-300)


def test_sigmoid_naive_form_would_fail():
    """The pitfall the stable form avoids: 1/(1+exp(-z)) is NaN at Re z = -1000 in complex mode."""
    z = numpy.array([-1000 + 1e-30j])
    with numpy.errstate(all="ignore"):
        assert numpy.isnan(1 / (1 + numpy.exp(-z))).any()
    assert numpy.isfinite(ops.sigmoid(z)).all()


def test_softplus_keeps_linear_term_derivative():
    """max(Re z, 0) would give sigmoid(a) - 1 for Re z > 0; the complex-safe max keeps sigmoid(a)."""
    a, h = 3.0, 1e-30
    got = ops.softplus(numpy.array([a + 1j * h])).imag[0] / h
    assert abs(got - 1 / (1 + numpy.exp(-a))) < 1e-15


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_logsumexp_and_log_softmax(xp, scale):
    rng = numpy.random.default_rng(1)
    z = rng.standard_normal((4, 7)) * scale
    v = rng.standard_normal((4, 7))
    h = 1e-30
    zc = xp.asarray(z) + 1j * h * xp.asarray(v)
    lse = ops.logsumexp(zc, axis=1)
    m = z.max(axis=1, keepdims=True)
    ref = (m + numpy.log(numpy.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    p = numpy.exp(z - ref[:, None])
    assert numpy.allclose(_host(lse.real), ref, rtol=1e-15)
    assert numpy.allclose(_host(lse.imag) / h, (p * v).sum(axis=1), rtol=1e-13, atol=1e-300)
    ls = ops.log_softmax(zc, axis=1)
    assert numpy.isfinite(_host(ls.real)).all()
    assert numpy.allclose(_host(ops.softmax(xp.asarray(z), axis=1)).sum(axis=1), 1.0)


def test_relu_mask_from_real_part(xp):
    z = xp.asarray([-1 + 1e-30j, 0 + 1e-30j, 0 - 1e-30j, 2 - 1e-30j])
    y = ops.relu(z)
    assert _host(y).tolist() == [0, 0, 0, 2 - 1e-30j]
    assert _host(ops.relu_grad(z)).tolist() == [False, False, False, True]


def test_abs_cs_is_not_the_modulus():
    z = numpy.array([-2 + 1e-30j, 3 + 1e-30j])
    assert (ops.abs_cs(z).imag / 1e-30).tolist() == [-1.0, 1.0]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
@pytest.mark.parametrize("f", [ops.sigmoid, ops.softplus, ops.tanh, ops.relu, ops.log_softmax])
def test_real_mode_keeps_dtype(f, dtype):
    x = numpy.linspace(-3, 3, 12, dtype=dtype).reshape(3, 4)
    assert f(x).dtype == dtype


def _host(a):
    return a.get() if hasattr(a, "get") else numpy.asarray(a)


# --- softplus against a 50-digit reference ----------------------------------------------------
#: real parts of complex-step points: both tails (results down to 1e-261, Im down to 1e-291), the
#: branch point Re z = 0 and its neighbourhood, and |Re z| where 1 + e^-|a| rounds to 1
SOFTPLUS_REAL = [-600.0, -40.0, -36.5, -20.0, -1.0, -1e-8, 0.0, 1e-8, 0.5, 20.0, 36.5, 40.0, 700.0]
#: general complex points: the analytic function itself, not only its first order in Im z
SOFTPLUS_COMPLEX = [-3 + 0.7j, 2 - 1.2j, 0.5 + 2j, -40 + 1e-3j, -40 - 1.5j, 36 + 0.25j, -700 + 0.3j, 0.8j]
EPS = numpy.finfo(numpy.float64).eps


def _mp_softplus(z) -> complex:
    with mpmath.workdps(50):
        return complex(mpmath.log1p(mpmath.exp(mpmath.mpc(z))))


def _mp_sigmoid(a) -> float:
    with mpmath.workdps(50):
        return float(1 / (1 + mpmath.exp(-mpmath.mpf(a))))


def _softplus_errors(xp):
    """Relative errors of ops.softplus (complex128) under ``xp``: (real parts and Im/h at the
    complex-step points, each component at the general complex points), and the host results."""
    h = 1e-30
    a = numpy.array(SOFTPLUS_REAL)
    cs = to_host(ops.softplus(xp.asarray(a + 1j * h, dtype=xp.complex128)))
    gen = to_host(ops.softplus(xp.asarray(SOFTPLUS_COMPLEX, dtype=xp.complex128)))
    errs = {}
    for ai, got in zip(SOFTPLUS_REAL, cs):
        ref, dref = _mp_softplus(ai).real, _mp_sigmoid(ai)
        errs[f"Re softplus({ai} + ih)"] = abs(got.real - ref) / ref
        errs[f"Im softplus({ai} + ih)/h"] = abs(got.imag / h - dref) / dref
    for z, got in zip(SOFTPLUS_COMPLEX, gen):
        ref = _mp_softplus(z)
        errs[f"softplus({z})"] = abs(got - ref) / abs(ref)
    return errs, (cs, gen)


def test_softplus_matches_mpmath_at_complex_step_points(xp):
    """Full relative precision in Re and in Im/h, with no cancellation in 1 + e^-|a| (Re z = -40
    gives 4.2e-18, not 0), the derivative sigmoid(0) = 1/2 at the branch point Re z = 0, and the
    exact analytic value at complex points far from the real axis."""
    errs, results = _softplus_errors(xp)
    bad = {k: v for k, v in errs.items() if not v <= 4 * EPS}
    assert not bad, bad
    if xp is not numpy:  # the device computes what the host computes
        for got, want in zip(results, _softplus_errors(numpy)[1]):
            numpy.testing.assert_allclose(got, want, rtol=2 * EPS, atol=0)


def test_softplus_does_not_rely_on_complex_log1p(xp, monkeypatch):
    """CuPy computes complex log1p as log(1 + z): with that log1p, softplus keeps full accuracy."""
    library_log1p = xp.log1p

    def log1p_as_cupy_computes_it(z, *args, **kwargs):
        if xp.iscomplexobj(z):
            return xp.log(1 + z)
        return library_log1p(z, *args, **kwargs)

    monkeypatch.setattr(xp, "log1p", log1p_as_cupy_computes_it)
    errs, _ = _softplus_errors(xp)
    bad = {k: v for k, v in errs.items() if not v <= 4 * EPS}
    assert not bad, bad


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_softplus_real_mode_is_the_real_part_of_complex_mode(xp, dtype):
    """Real input gives a real result of its dtype, which the complex pass at Im z = 0 agrees with
    to rounding (complex exp is not bit-identical to real exp), imaginary part exactly 0."""
    a = numpy.linspace(-50, 50, 101).astype(dtype)
    real = ops.softplus(xp.asarray(a))
    cplx = ops.softplus(xp.asarray(a).astype(numpy.result_type(dtype, numpy.complex64)))
    assert real.dtype == dtype and cplx.dtype == numpy.result_type(dtype, numpy.complex64)
    eps = numpy.finfo(dtype).eps
    numpy.testing.assert_allclose(to_host(cplx.real), to_host(real), rtol=2 * eps, atol=0)
    numpy.testing.assert_array_equal(to_host(cplx.imag), 0)
    numpy.testing.assert_allclose(to_host(real), numpy.logaddexp(0, a.astype(numpy.float64)), rtol=2 * eps, atol=0)


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64, numpy.complex64, numpy.complex128])
@pytest.mark.parametrize("transposed", [False, True])
def test_relu_forward_and_route_are_where_bit_for_bit(xp, dtype, transposed):
    """The branchless NumPy masking (engine.ops._bitmask) gives where()'s bits: +0 where masked,
    NaN, inf and -0 handled as where() handles them, complex values carried whole, any layout."""
    rng = numpy.random.default_rng(8)
    z = rng.standard_normal((40, 30)) + (1j * rng.standard_normal((40, 30)) if numpy.dtype(dtype).kind == "c" else 0)
    z = z.astype(dtype)
    z.real[0, :5] = [numpy.nan, -0.0, 0.0, numpy.inf, -numpy.inf]
    dy = (rng.standard_normal((40, 30)) * (1 + 1j if numpy.dtype(dtype).kind == "c" else 1)).astype(dtype)
    dy.real[1, :3] = [numpy.nan, numpy.inf, -numpy.inf]
    if transposed:
        z, dy = z.T, dy.T
    y, mask = ops.relu_forward(xp.asarray(z))
    want_y, want_mask = numpy.where(z.real > 0, z, 0), z.real > 0
    assert _host(y).dtype == dtype and _host(y).tobytes() == want_y.tobytes()
    assert _host(mask).tolist() == want_mask.tolist()
    assert _host(ops.where0(mask, xp.asarray(dy))).tobytes() == numpy.where(want_mask, dy, 0).tobytes()
