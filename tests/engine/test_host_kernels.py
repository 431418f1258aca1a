"""engine.host_kernels: each one-pass numba kernel gives bitwise the result of the plain NumPy
formula it replaces (run under :func:`engine.fuse.unfused`, which switches the kernels off), on
random values and on the special ones (signed zeros, subnormals, infinities, NaN), in float32 and
float64, on contiguous and strided operands; and it declines (returns None / False) what it does
not handle, so the formula runs instead."""

from __future__ import annotations

import numpy
import pytest

from engine import host_kernels as hk
from engine import ops
from engine.curvature.kronecker import column_mean, secant_means
from engine.fuse import unfused
from engine.losses import SigmoidCrossEntropy, _sigmoid_xent_terms
from engine.model import Capture

pytestmark = [pytest.mark.skipif(hk.numba is None, reason="numba is not installed"),
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # the NaN and inf operands

DTYPES = (numpy.float32, numpy.float64)
SPECIAL = [0.0, -0.0, 1e-310, -1e-310, 1e-40, -1e-40, numpy.inf, -numpy.inf, numpy.nan, 1.0, -1.0]


def _values(shape, dtype, seed=0):
    rng = numpy.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    flat = x.reshape(-1)
    k = min(len(SPECIAL), flat.size)
    with numpy.errstate(over="ignore"):
        flat[:k] = numpy.asarray(SPECIAL[:k]).astype(dtype)
    return x


def _bits_equal(a, b):
    a, b = numpy.asarray(a), numpy.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    u = {2: numpy.uint16, 4: numpy.uint32, 8: numpy.uint64}[a.dtype.itemsize]
    nan = numpy.isnan(a)
    assert numpy.array_equal(nan, numpy.isnan(b))
    assert numpy.array_equal(a.view(u)[~nan], b.view(u)[~nan]), "not bitwise equal"


def _reference_relu(z):
    mask = z > 0
    return numpy.where(mask, z, 0), mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (37,), (64, 129), (3, 5, 7, 2)])
def test_relu_forward_and_where0_bitwise(dtype, shape):
    z = _values(shape, dtype)
    out = hk.relu_forward(z)
    assert out is not None
    ref = _reference_relu(z)
    _bits_equal(out[0], ref[0])
    assert numpy.array_equal(out[1], ref[1])
    y, mask = ops.relu_forward(z)  # the engine's entry point takes the kernel
    _bits_equal(y, ref[0])
    v = _values(shape, dtype, seed=1)
    w = hk.where0(mask, v)
    _bits_equal(w, numpy.where(mask, v, 0))
    with unfused():  # the bit-blend path, the kernel off
        _bits_equal(ops.where0(mask, v), w)
        y0, _ = ops.relu_forward(z)
    _bits_equal(y, y0)


@pytest.mark.parametrize("dtype", (numpy.complex64, numpy.complex128))
def test_relu_pair_on_complex_step_values_bitwise(dtype):
    """A complex-step pass's activations: the branch on Re z, the whole complex value kept or +0 + 0i."""
    real = _values((64, 129), numpy.float64)
    z = (real + 1j * _values((64, 129), numpy.float64, seed=9) * 1e-30).astype(dtype)
    z.reshape(-1)[:3] = numpy.asarray([complex(0.0, 1.0), complex(-0.0, -1.0), complex(numpy.nan, 1.0)]).astype(dtype)
    y, mask = hk.relu_forward(z)
    _bits_equal(y.view(numpy.float64 if dtype == numpy.complex128 else numpy.float32),
                numpy.where(z.real > 0, z, 0).view(y.real.dtype))
    assert numpy.array_equal(mask, z.real > 0)
    w = hk.where0(mask, z[::-1].copy())
    with unfused():
        ref = ops.where0(mask, z[::-1].copy())
    _bits_equal(w.view(y.real.dtype), ref.view(y.real.dtype))


def test_relu_kernels_decline_what_they_do_not_handle():
    z = _values((8, 6), numpy.float64)
    assert hk.relu_forward(z.astype(numpy.clongdouble)) is None
    assert hk.relu_forward(z[:, ::2]) is None  # strided
    assert hk.relu_forward(z.astype(numpy.float16)) is None
    mask = z > 0
    assert hk.where0(mask[:, ::2], z[:, ::2]) is None
    assert hk.where0(mask.astype(numpy.int8), z) is None
    assert hk.where0(mask, z[:4]) is None
    with unfused():
        assert hk.relu_forward(z) is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2), (1, 9), (1000, 2), (1000, 30), (257, 784)])
@pytest.mark.parametrize("strided", [False, True])
def test_column_sums_bitwise(dtype, shape, strided):
    a = _values((shape[0], 2 * shape[1]), dtype)
    b = _values((shape[0], 2 * shape[1]), dtype, seed=3)
    a, b = (a[:, ::2], b[:, ::2]) if strided else (a[:, :shape[1]], b[:, :shape[1]])
    for scale, divisor in ((1.0, float(shape[0])), (1000 / 7, 1.0), (0.3, 3.0)):
        _bits_equal(hk.column_sum(a, scale, divisor), numpy.sum(a * scale / divisor, axis=0))
        _bits_equal(hk.column_difference_sum(a, b, scale, divisor), numpy.sum((a - b) * scale / divisor, axis=0))
    got, with_scale = column_mean(a), column_mean(a, 0.25)
    with unfused():
        _bits_equal(got, column_mean(a))
        _bits_equal(with_scale, column_mean(a, 0.25))


def test_secant_means_take_the_kernel_bitwise():
    z0, z1 = _values((300, 40), numpy.float32), _values((300, 40), numpy.float32, seed=5)
    g0, g1 = _values((300, 40), numpy.float32, seed=6), _values((300, 40), numpy.float32, seed=7)
    old, new = Capture(0, 0, None, z0, g0), Capture(0, 0, None, z1, g1)
    got = secant_means(old, new, 100)
    with unfused():
        ref = secant_means(old, new, 100)
    for a, b in zip(got, ref):
        _bits_equal(a, b)


def test_column_sums_decline_complex_mixed_and_pairwise_layouts():
    """Where NumPy sums a column pairwise (a column vector, a column-major operand) the kernel
    declines, and the formula keeps NumPy's order."""
    a = _values((5, 3), numpy.float64)
    for layout in (_values((1000, 1), numpy.float32), numpy.asfortranarray(_values((1000, 4), numpy.float32)),
                   _values((4, 1000), numpy.float32).T):
        assert hk.column_sum(layout, 1.0, 1000.0) is None
        assert hk.column_difference_sum(layout, layout, 1.0, 1000.0) is None
    assert hk.column_sum(a.astype(numpy.complex128), 1.0, 5.0) is None
    assert hk.column_difference_sum(a, a.astype(numpy.float32), 1.0, 5.0) is None
    assert hk.column_sum(a[0], 1.0, 5.0) is None  # 1-D


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, "tiny"])
def test_momentum_bitwise(dtype, threshold):
    thr = float(numpy.finfo(dtype).tiny) if threshold == "tiny" else 0.0
    m, g = _values((10_007,), dtype), _values((10_007,), dtype, seed=2)
    m[20:30] = numpy.finfo(dtype).tiny * numpy.arange(1, 11)  # some land below the threshold
    ref = m.copy()
    ref *= 0.9
    ref += 0.1 * g
    ref[...] = numpy.where(numpy.absolute(ref) < thr, 0, ref)
    assert hk.momentum_(m, g, 0.9, 0.1, thr)
    _bits_equal(m, ref)
    assert not hk.momentum_(m.astype(numpy.complex128), g, 0.9, 0.1, thr)
    assert not hk.momentum_(m.reshape(-1, 1), g.reshape(-1, 1), 0.9, 0.1, thr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scaled_copy_bitwise(dtype):
    a = _values((40, 31), dtype)[:, 1:]  # a strided view, as a layer's weight block of a step matrix
    out = numpy.full((40, 30), numpy.nan, dtype=dtype)
    assert hk.scaled_copy_(out, a, 0.3)
    _bits_equal(out, 0.3 * a)
    assert not hk.scaled_copy_(out, a.astype(numpy.complex128), 0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_xent_terms_share_one_exponential_bitwise(dtype):
    """The loss kernel's single exp(-|z|) gives bitwise the separate softplus and sigmoid formulas."""
    z = _values((64, 784), dtype) * dtype(20)
    z.reshape(-1)[20:24] = numpy.asarray([800.0, -800.0, 40.0, -40.0]).astype(dtype)
    x = (numpy.random.default_rng(4).random(z.shape) < 0.5).astype(dtype)
    with numpy.errstate(invalid="ignore", over="ignore"):
        terms, grad = _sigmoid_xent_terms(z, x, 64)
        _bits_equal(terms, ops.softplus_real_formula(numpy, z) - x * z)
        _bits_equal(grad, (ops.sigmoid_formula(numpy, z, z) - x) / 64)
    value, grad2 = SigmoidCrossEntropy().value_and_grad(z[:, 20:], x[:, 20:])
    assert numpy.isfinite(value) and numpy.all(numpy.isfinite(grad2))
