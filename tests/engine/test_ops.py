"""engine.ops: stability at +-1000 (real and complex) and derivatives against the complex step."""

import numpy
import pytest

from engine import ops


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
