"""engine.fuse and the fused formulas: each fused kernel equals its formula run op by op (the unfused
path, :func:`engine.fuse.unfused`) on real and complex inputs, equals an independent textbook form,
keeps the complex step exact, and is ONE launch on a device (counted on the CuPy stand-in, whose
``cupy.fuse`` refuses what CuPy's fusion refuses: tests/test_cupy_standin.py)."""

from __future__ import annotations

import numpy
import pytest

from engine import ops
from engine.curvature.kernels import flush_below_, scaled_ema_, symmetric_rank2_update_
from engine.curvature.kronecker import column_mean, ema_, secant_means
from engine.fuse import device_arange, device_ones, fused, unfused
from engine.losses import SigmoidCrossEntropy
from engine.model import Capture
from solvers.bfgs import inner_products
from tests.device_counts import device_work
from tests.solvers.common import to_np

H = 1e-30  # the complex step


def _z(xp, n=257, complex_step=False, dtype=numpy.float64, seed=0):
    """Real parts spanning the tails (+-1000, +-40) and the kink, optionally with an imaginary step."""
    rng = numpy.random.default_rng(seed)
    x = numpy.concatenate([rng.standard_normal(n - 7) * 4, [-1000.0, -40.0, -1e-3, 0.0, 1e-3, 40.0, 1000.0]]).astype(dtype)
    if complex_step:
        cdt = numpy.complex64 if dtype == numpy.float32 else numpy.complex128
        x = x.astype(cdt) + 1j * numpy.asarray(H, dtype=dtype)
    return xp.asarray(x)


def _both(xp, f, *args):
    """(fused result, unfused result) on host arrays."""
    fused_out = f(*args)
    with unfused():
        plain = f(*args)
    as_tuple = (lambda r: r if isinstance(r, tuple) else (r,))
    return [to_np(a) for a in as_tuple(fused_out)], [to_np(a) for a in as_tuple(plain)]


@pytest.mark.parametrize("complex_step", [False, True], ids=["real", "complex-step"])
def test_fused_activations_equal_their_formulas_and_the_textbook(xp, complex_step):
    z = _z(xp, complex_step=complex_step)
    zh = to_np(z)
    cases = {
        "relu": (lambda: ops.relu_forward(z), (numpy.where(zh.real > 0, zh, 0), zh.real > 0)),
        "sigmoid": (lambda: ops.sigmoid(z), None),
        "sigmoid_vjp": (lambda: ops.sigmoid_vjp(z, ops.sigmoid(z)), None),
        "tanh_vjp": (lambda: ops.tanh_vjp(z, ops.tanh(z)), None),
        "softplus": (lambda: ops.softplus(z), None),
    }
    for name, (run, textbook) in cases.items():
        got, plain = _both(xp, run)
        for g, p in zip(got, plain):
            assert g.dtype == p.dtype and numpy.array_equal(g, p, equal_nan=True), name  # the same operations
        if textbook is not None:
            for g, t in zip(got, textbook):
                assert numpy.array_equal(g, t), name
    # independent references: sigmoid = 1 / (1 + e^-x) away from the tails, and the complex step
    # differentiates the fused sigmoid and softplus exactly: Im f(x + ih) / h = f'(x)
    s = to_np(ops.sigmoid(z))
    x = zh.real
    mid = numpy.abs(x) < 30
    numpy.testing.assert_allclose(s.real[mid], 1 / (1 + numpy.exp(-x[mid])), rtol=1e-14)
    assert numpy.all(numpy.isfinite(s))
    if complex_step:
        e = numpy.exp(-numpy.abs(x))
        sr = numpy.where(x >= 0, 1 / (1 + e), e / (1 + e))  # sigmoid, and its derivative e / (1 + e)^2
        numpy.testing.assert_allclose(s.imag / H, e / (1 + e) ** 2, rtol=1e-12, atol=1e-300)
        numpy.testing.assert_allclose(to_np(ops.softplus(z)).imag / H, sr, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
def test_fused_sigmoid_cross_entropy_equals_the_unfused_loss(xp, dtype):
    rng = numpy.random.default_rng(1)
    out = xp.asarray((rng.standard_normal((20, 9)) * 5).astype(dtype))
    target = xp.asarray(rng.random((20, 9)).astype(dtype))
    loss = SigmoidCrossEntropy()
    (value, grad), (value0, grad0) = _both(xp, loss.value_and_grad, out, target)
    assert numpy.array_equal(value, value0) and numpy.array_equal(grad, grad0)
    # the textbook loss in float64
    o, t = to_np(out).astype(numpy.float64), to_np(target).astype(numpy.float64)
    ref = (numpy.logaddexp(0, o) - t * o).sum(axis=1).mean()
    tol = 1e-12 if dtype == numpy.float64 else 1e-5
    numpy.testing.assert_allclose(float(value), ref, rtol=tol)
    numpy.testing.assert_allclose(grad, (1 / (1 + numpy.exp(-o)) - t) / 20, rtol=tol, atol=tol * 1e-2)
    # the complex-step pass still goes through the unfused, complex-exact softplus
    v_c, _ = loss.value_and_grad(out.astype(numpy.complex128) + 1j * H, target)
    numpy.testing.assert_allclose(float(to_np(v_c).imag) / H, float(((1 / (1 + numpy.exp(-o)) - t)).sum(axis=1).mean()), rtol=1e-10)


def test_fused_factor_kernels_equal_their_array_expressions(xp):
    rng = numpy.random.default_rng(2)
    d = 11
    A0, B = rng.standard_normal((d, d)), rng.standard_normal((d, d))
    A = xp.asarray(A0.copy())
    ema_(A, xp.asarray(B), 0.9)
    numpy.testing.assert_array_equal(to_np(A), A0 * 0.9 + (1 - 0.9) * B)
    tiny = numpy.finfo(numpy.float64).tiny
    v0 = numpy.array([1.0, tiny / 4, -tiny / 8, -2.0, 0.0])
    v = xp.asarray(v0.copy())
    ema_(v, xp.zeros(5), 1.0, flush=True)
    numpy.testing.assert_array_equal(to_np(v), [1.0, 0.0, 0.0, -2.0, 0.0])
    w = xp.asarray(v0.copy())
    flush_below_(w, 0.0)  # threshold 0: a no-op
    numpy.testing.assert_array_equal(to_np(w), v0)
    M = xp.asarray(A0.copy())
    scaled_ema_(M[:5, :5], xp.asarray(B[:5, :5]), 0.5, 0.25)
    ref = A0.copy()
    ref[:5, :5] = 0.5 * ref[:5, :5] + 0.25 * B[:5, :5]
    numpy.testing.assert_array_equal(to_np(M), ref)
    # the rank-2 update: the entry formula on a device, numba on the host; a rejected flag leaves H
    p, q = rng.standard_normal(d), rng.standard_normal(d)
    S = xp.asarray(A0 + A0.T)
    symmetric_rank2_update_(S, xp.asarray(p), xp.asarray(q), xp.asarray(numpy.bool_(False)))
    numpy.testing.assert_array_equal(to_np(S), A0 + A0.T)
    symmetric_rank2_update_(S, xp.asarray(p), xp.asarray(q))
    Sn = to_np(S)
    numpy.testing.assert_allclose(Sn, A0 + A0.T + 0.5 * numpy.outer(p, p) - 0.5 * numpy.outer(q, q), rtol=1e-13, atol=1e-13)
    assert numpy.array_equal(Sn, Sn.T)


def test_inner_products_and_means_in_one_reduction(xp):
    rng = numpy.random.default_rng(3)
    a, b, c = (rng.standard_normal(300) for _ in range(3))
    dots = to_np(inner_products((xp.asarray(a), xp.asarray(b)), (xp.asarray(c), xp.asarray(c)), (xp.asarray(a), xp.asarray(c))))
    numpy.testing.assert_allclose(dots, [a @ b, c @ c, a @ c], rtol=1e-12)
    z, g = rng.standard_normal((40, 7)), rng.standard_normal((40, 7))
    numpy.testing.assert_allclose(to_np(column_mean(xp.asarray(z))), z.mean(axis=0), rtol=1e-12)
    old = Capture(0, 0, None, xp.asarray(z), xp.asarray(g))
    new = Capture(0, 0, None, xp.asarray(z[::-1].copy()), xp.asarray(0.5 * g))
    s, y = secant_means(old, new, 40)
    numpy.testing.assert_allclose(to_np(s), z.mean(axis=0) - z[::-1].mean(axis=0), atol=1e-14)
    numpy.testing.assert_allclose(to_np(y), g.sum(axis=0) - 0.5 * g.sum(axis=0), rtol=1e-12)


def test_a_fused_formula_is_one_launch_and_nested_formulas_inline(cupy_only):
    xp = cupy_only
    z = _z(xp)
    target = xp.zeros((1, z.shape[0]))
    with device_work(xp) as work:
        ops.sigmoid(z)
        ops.relu_forward(z)
        SigmoidCrossEntropy().value_and_grad(z.reshape(1, -1), target)
    if work.exact:
        # sigmoid 1, relu 1, the loss: terms and gradient 1, then the sum and the mean
        assert work.launches == 5, work.ops
    with device_work(xp) as work, unfused():
        ops.sigmoid(z)
    if work.exact:
        assert work.launches > 5  # the same formula op by op


def test_the_fused_wrapper_and_constants():
    calls = []

    @fused
    def twice_plus(xp, a, b):
        calls.append(xp)
        return 2 * a + b

    assert twice_plus.formula is not None and twice_plus.__name__ == "twice_plus"
    out = twice_plus(numpy.arange(3.0), 1.0)
    numpy.testing.assert_array_equal(out, [1.0, 3.0, 5.0])
    assert calls == [numpy]
    one = device_ones(numpy, 1, numpy.float32)
    assert one is device_ones(numpy, 1, numpy.float32) and one.dtype == numpy.float32 and one[0] == 1
    numpy.testing.assert_array_equal(device_arange(numpy, 4), [0, 1, 2, 3])
