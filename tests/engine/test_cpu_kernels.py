"""engine.cpu_kernels: each numba kernel gives the same bits as an independent plain-NumPy
formulation (real and complex, several window geometries, NaN, ties, signed zeros), and the layers
give the same bits with the kernels as without them (their array-module path)."""

import numpy
import pytest

from engine import cpu_kernels
from engine.conv import Conv2d, MaxPool2d
from tests.engine.conv_reference import pool_loop

DTYPES = [numpy.float32, numpy.float64, numpy.complex64, numpy.complex128]
GEOMETRIES = [((2, 2), (2, 2)), ((3, 3), (1, 1)), ((2, 3), (3, 2)), ((3, 2), (2, 3)), ((5, 5), (1, 1))]


def _data(rng, shape, dtype):
    a = rng.standard_normal(shape)
    if numpy.dtype(dtype).kind == "c":
        a = a + 1j * rng.standard_normal(shape)
    return a.astype(dtype)


def _same_bits(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _out_hw(shape, kernel, stride):
    return tuple((s - k) // t + 1 for s, k, t in zip(shape[2:], kernel, stride))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride", GEOMETRIES)
def test_im2col_and_col2im_match_strided_numpy(dtype, kernel, stride):
    rng = numpy.random.default_rng(1)
    x = _data(rng, (3, 2, 11, 10), dtype)
    ho, wo = _out_hw(x.shape, kernel, stride)
    v = numpy.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))[:, :, ::stride[0], ::stride[1]]
    want = numpy.ascontiguousarray(v.transpose(0, 1, 4, 5, 2, 3))
    got = numpy.full(want.shape, numpy.nan, dtype=dtype)
    assert cpu_kernels.im2col(x, got, stride)
    assert _same_bits(got, want)
    # col2im: strided additions per offset (i, j), in that order, into zeros
    d6 = _data(rng, want.shape, dtype)
    ref = numpy.zeros(x.shape, dtype=dtype)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            ref[:, :, i:i + stride[0] * (ho - 1) + 1:stride[0], j:j + stride[1] * (wo - 1) + 1:stride[1]] += d6[:, :, i, j]
    assert _same_bits(cpu_kernels.col2im(d6, x.shape, stride), ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride", GEOMETRIES)
def test_maxpool_kernels_match_loops(dtype, kernel, stride):
    rng = numpy.random.default_rng(2)
    x = _data(rng, (2, 3, 9, 11), dtype)
    x.real[0, 0, :4, :4] = 0.5  # ties: the first maximum wins
    x.real[1, 2, 1, :] = numpy.nan  # NaN is never larger
    x[0, 1, 2:5, 3] = -0.0
    ho, wo = _out_hw(x.shape, kernel, stride)
    out, idx = cpu_kernels.maxpool_forward(x, kernel, stride, (2, 3, ho, wo), numpy.int8)
    want = numpy.empty_like(out)
    want_idx = numpy.empty(out.shape, dtype=numpy.int8)
    for n, c, h, w in numpy.ndindex(*out.shape):
        win = x[n, c, stride[0] * h:stride[0] * h + kernel[0], stride[1] * w:stride[1] * w + kernel[1]].reshape(-1)
        k = 0
        for t in range(1, win.size):
            if win[t].real > win[k].real:
                k = t
        want[n, c, h, w], want_idx[n, c, h, w] = win[k], k
    assert _same_bits(out, want) and _same_bits(idx, want_idx)
    finite = numpy.isfinite(x.real).all()
    if finite:
        assert numpy.array_equal(out, pool_loop(x, kernel, stride, (0, 0), "max"))
    dy = _data(rng, out.shape, dtype)
    dx = cpu_kernels.maxpool_route(dy, idx, kernel, stride, x.shape)
    if stride[0] < kernel[0] or stride[1] < kernel[1]:
        assert dx is None  # overlapping windows: the layer's additions
        return
    ref = numpy.zeros(x.shape, dtype=dtype)
    for n, c, h, w in numpy.ndindex(*dy.shape):
        i, j = divmod(int(idx[n, c, h, w]), kernel[1])
        ref[n, c, stride[0] * h + i, stride[1] * w + j] = dy[n, c, h, w]
    assert _same_bits(dx, ref)


def test_kernels_refuse_non_numpy_arrays():
    class Other(numpy.ndarray):
        pass

    x = numpy.zeros((1, 1, 4, 4)).view(Other)
    assert cpu_kernels.col2im(numpy.zeros((1, 1, 2, 2, 3, 3)).view(Other), (1, 1, 4, 4), (1, 1)) is None
    assert cpu_kernels.maxpool_forward(x, (2, 2), (2, 2), (1, 1, 2, 2), numpy.int8) is None
    assert not cpu_kernels.im2col(x, numpy.zeros((1, 1, 2, 2, 3, 3)), (1, 1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layer", [Conv2d(2, 3, 3, stride=2, padding=1), Conv2d(2, 3, (2, 3)), MaxPool2d(2), MaxPool2d(3, 2, padding=1)])
def test_layers_same_bits_with_and_without_kernels(monkeypatch, layer, dtype):
    """The kernels change no result of a layer: forward and backward against the array-module path."""
    rng = numpy.random.default_rng(4)
    x = _data(rng, (3, 2, 9, 8), dtype)
    params = [_data(rng, s, dtype) for s in layer.param_shapes()]

    def run():
        y, cache = layer.forward(params, x)
        dx, grads = layer.backward(params, cache, _data(numpy.random.default_rng(5), y.shape, dtype))
        return [y, dx, *grads]

    fast = [a.copy() for a in run()]
    for name in ("im2col",):
        monkeypatch.setattr(cpu_kernels, name, lambda *a: False)
    for name in ("col2im", "maxpool_forward", "maxpool_route"):
        monkeypatch.setattr(cpu_kernels, name, lambda *a: None)
    slow = run()
    for a, b in zip(fast, slow):
        assert _same_bits(numpy.ascontiguousarray(a), numpy.ascontiguousarray(b))
