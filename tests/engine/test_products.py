"""engine.products: real-GEMM complex products against the library's complex GEMM, and the
complex-step pass they make against the 40-digit Hessian (tests/reference.py)."""

import numpy
import pytest

import engine.ops as ops
import engine.products as products
from engine.backend import to_host
from engine.curvature import HessianCS
from engine.products import complex_step, drops_second_order, matmul

from .curvature.common import ACTS, LOSSES, mp_hessian, rel, setup


def _operands(xp, rng, m=5, k=4, n=3, imag=1.0):
    """(a, b) pairs of every kind and layout: real/complex, C-ordered and transposed views."""
    def real(r, c):
        return rng.standard_normal((r, c))

    def cplx(r, c):
        return real(r, c) + 1j * imag * real(r, c)

    out = []
    for make_a in (real, cplx):
        for make_b in (real, cplx):
            a, b = make_a(m, k), make_b(k, n)
            out.append((xp.asarray(a), xp.asarray(b)))
            out.append((xp.asarray(a.T.copy()).T, xp.asarray(b.T.copy()).T))  # F-ordered (transposed views)
    return out


def _host(v):
    return numpy.asarray(to_host(v))


def test_products_equal_the_library_product_for_any_complex_operand(xp):
    rng = numpy.random.default_rng(0)
    for a, b in _operands(xp, rng):
        got, want = _host(matmul(a, b)), _host(a) @ _host(b)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert numpy.abs(got - want).max() <= 1e-14 * numpy.abs(want).max()
        with complex_step(1e-3):  # a step too large to drop h^2: still the full product
            assert numpy.abs(_host(matmul(a, b)) - want).max() <= 1e-14 * numpy.abs(want).max()


@pytest.mark.parametrize("a_shape, b_shape", [((2, 5, 4), (4, 3)), ((5, 4), (2, 4, 3)), ((2, 5, 4), (2, 4, 3))])
def test_stacked_products_equal_the_library_product(xp, a_shape, b_shape):
    """Stacks of matrices (a convolution's per-example GEMMs), broadcast as ``@`` does, with
    transposed-view operands and an ``out`` for the real product."""
    rng = numpy.random.default_rng(3)
    for a_c in (False, True):
        for b_c in (False, True):
            a = rng.standard_normal(a_shape) + (1j * rng.standard_normal(a_shape) if a_c else 0)
            b = rng.standard_normal(b_shape) + (1j * rng.standard_normal(b_shape) if b_c else 0)
            want = a @ b
            for ta in (False, True):
                aa = xp.asarray(numpy.ascontiguousarray(a.swapaxes(-1, -2))).swapaxes(-1, -2) if ta else xp.asarray(a)
                got = _host(matmul(aa, xp.asarray(b)))
                assert got.dtype == want.dtype and got.shape == want.shape
                assert numpy.abs(got - want).max() <= 1e-14 * numpy.abs(want).max()
            if not (a_c or b_c):
                out = xp.empty(want.shape)
                assert matmul(xp.asarray(a), xp.asarray(b), out=out) is out
                assert numpy.abs(_host(out) - want).max() <= 1e-14 * numpy.abs(want).max()
            with complex_step(1e-30):  # complex by complex drops the (here full-size) h^2 term
                got = _host(matmul(xp.asarray(a), xp.asarray(b)))
                drop = (a.imag @ b.imag) if (a_c and b_c) else 0
                assert numpy.abs(got - (want + drop)).max() <= 1e-14 * numpy.abs(want).max()


def test_mixed_precision_follows_numpy_promotion(xp):
    rng = numpy.random.default_rng(1)
    a = xp.asarray(rng.standard_normal((3, 4)))  # float64
    b = xp.asarray((rng.standard_normal((4, 2)) + 1j * rng.standard_normal((4, 2))).astype(numpy.complex64))
    assert matmul(a, b).dtype == numpy.complex128
    assert matmul(b.T, a.T).dtype == numpy.complex128


def test_inside_a_complex_step_pass_the_second_order_term_is_dropped(xp):
    """For a GENERAL complex operand inside complex_step, the product is AC + i(AD + BC): the
    hazard the docstring names (the declaration is a promise that B, D are O(h))."""
    rng = numpy.random.default_rng(2)
    A, B, C, D = (rng.standard_normal(s) for s in ((5, 4), (5, 4), (4, 3), (4, 3)))
    a, b = xp.asarray(A + 1j * B), xp.asarray(C + 1j * D)
    with complex_step(1e-30):
        assert drops_second_order(numpy.complex128) and drops_second_order(numpy.complex64)
        got = _host(matmul(a, b))
        real_by_complex = _host(matmul(xp.asarray(A), b))  # never drops anything
    assert not drops_second_order(numpy.complex128)
    numpy.testing.assert_allclose(got, A @ C + 1j * (A @ D + B @ C), rtol=1e-13, atol=1e-13)
    numpy.testing.assert_allclose(real_by_complex, A @ (C + 1j * D), rtol=1e-13, atol=1e-13)
    with complex_step(1e-12):  # complex64's default step: h <= eps of float32, not of float64
        assert drops_second_order(numpy.complex64) and not drops_second_order(numpy.complex128)
    with complex_step(1e-1):  # the precision study's large steps keep the full product
        assert not drops_second_order(numpy.complex64) and not drops_second_order(numpy.complex128)


def test_perturbation_products_are_the_complex_product_to_rounding(xp):
    rng = numpy.random.default_rng(3)
    h = 1e-30
    a = xp.asarray(rng.standard_normal((6, 5)) + 1j * h * rng.standard_normal((6, 5)))
    b = xp.asarray(rng.standard_normal((5, 4)) + 1j * h * rng.standard_normal((5, 4)))
    want = _host(a) @ _host(b)
    with complex_step(h):
        got = _host(matmul(a, b))
    assert rel(got.real, want.real) <= 1e-15
    assert rel(got.imag, want.imag) <= 1e-15


def _cs_full_products(model, params, x, y, v, h=1e-30):
    """Hv by the complex step with the library's complex GEMMs (the pass before products.py)."""
    w = model.flatten(params)
    wc = w.astype(numpy.complex128) + (1j * h) * v.astype(numpy.complex128)
    _, g = model.loss_and_grad(model.unflatten(wc), x, y)
    assert not drops_second_order(numpy.complex128)
    return numpy.concatenate([_host(gk.imag).ravel() for gk in g]) / h


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("act", ACTS + ["sigmoid"])
def test_three_gemm_pass_matches_the_40_digit_hessian_as_well_as_the_complex_gemm_pass(xp, act, loss, monkeypatch):
    """The exactness claim: dropping BD (3 real GEMMs) and the O(b^2) terms of the elementwise
    functions (their first-order forms f(a) + i b f'(a), engine.ops) leaves the products as close
    to the 40-digit Hessian-vector products as the full complex pass is (to rounding)."""
    H = mp_hessian(act, loss)
    model, params, x, y = setup(act, loss, xp)
    calls = []
    real_drops = products.drops_second_order
    monkeypatch.setattr(products, "drops_second_order", lambda dt: calls.append(real_drops(dt)) or real_drops(dt))
    first = []
    real_first = ops.first_order
    monkeypatch.setattr(ops, "first_order", lambda z: z.dtype.kind == "c" and first.append(real_first(z)) or real_first(z))
    op = HessianCS(model, params, x, y)
    rng = numpy.random.default_rng(7)
    for _ in range(3):
        v = rng.standard_normal(model.n_params)
        v /= numpy.linalg.norm(v)
        ref = H @ v
        calls.clear()
        first.clear()
        new = _host(op.matvec(xp.asarray(v)))
        assert calls and all(calls)  # the operator's pass took the 3-GEMM path in every complex-by-complex product
        assert all(first) and (first or act == "relu" and loss == "half_mse")  # and the first-order functions
        first.clear()
        old = _cs_full_products(model, params, x, y, xp.asarray(v))
        assert not any(first)  # outside the declared pass: the full complex functions
        err_new, err_old = rel(new, ref), rel(old, ref)
        assert err_new <= 1e-12 and err_old <= 1e-12
        assert err_new <= 2 * err_old + 4e-16, (err_new, err_old)
        assert rel(new, old) <= 1e-15
