"""One-pass CPU kernels (numba) for a convolutional network's window work: im2col, col2im, max-pooling.

NumPy does these as several passes over strided views whose innermost runs are one output row
long (10 values in LeNet-5's second layer): im2col as a copy from the window view, col2im as
``kh * kw`` strided additions, max-pooling as one comparison and one blend per window offset.
Each kernel here is the same arithmetic in one pass, in the same order, so the results are the
same bits as the NumPy formulation they replace (tests/engine/test_cpu_kernels.py compares them).

Every function declines (returns ``None`` or ``False``) when its kernel does not apply: an operand
that is not a ``numpy.ndarray`` (CuPy or the tests' stand-in: numba never converts a device
array), numba missing, a layout the kernel does not take; the caller then runs its array-module
code. Outputs are :mod:`engine.workspace` buffers (reused once their holders let go). Complex
values are only moved or added (the pooling's arg-max is read from a real-part view), so the
complex-step pass takes the same kernels.

The batch-sized elementwise formulas of dense layers (ReLU and its backward selection, column
means, the momentum EMA) have their one-pass kernels in :mod:`engine.host_kernels`. A ReLU of
image batches is not there or here: a one-pass numba ReLU saved nothing measurable on LeNet-5
against the pooled branchless NumPy form of :mod:`engine.ops`. Calling any numba function costs a
process about 43 MB of resident memory once (LLVM); every Kronecker solver pays it (the MNIST
autoencoder's K-FAC peaks at 576 MB with it, 0.40x the authors' code).
"""

from __future__ import annotations

import numpy

from . import workspace

try:  # numba is a project dependency; the fallback keeps the module importable without it
    import numba
except ImportError:  # pragma: no cover
    numba = None

__all__ = ["im2col", "col2im", "maxpool_forward", "maxpool_route"]

_KINDS = "fc"


def _host(*arrays) -> bool:
    return numba is not None and all(type(a) is numpy.ndarray and a.dtype.kind in _KINDS for a in arrays)


_WINDOW_KERNELS: dict = {}


def _window_kernels(kh: int, kw: int, sh: int, sw: int):
    """(im2col, col2im, select, route) kernels compiled for one window geometry (on first use, about 0.2 s each).

    The window sizes and strides are compile-time constants: the window loops unroll and the
    pooling's comparisons become branchless selects. With them as run-time arguments the same
    loops ran four to ten times slower (max-pooling 128 x 6 x 28 x 28: 2.8 ms against 0.25 ms,
    mispredicting the data-dependent comparison; col2im 128 x 6 x 14 x 14: 1.8 ms against 0.43 ms).
    im2col here takes 0.8 ms where NumPy's copy from the strided window view takes 1.4 ms
    (128 x 6 x 14 x 14 float32, 5 x 5 windows), whose innermost runs are one output row long."""
    key = (kh, kw, sh, sw)
    if key in _WINDOW_KERNELS:
        return _WINDOW_KERNELS[key]

    @numba.njit(nogil=True)
    def im2col(x, out):
        m_, _, _, ho, wo = out.shape
        for m in range(m_):
            for i in range(kh):
                for j in range(kw):
                    for h in range(ho):
                        for w in range(wo):
                            out[m, i, j, h, w] = x[m, sh * h + i, sw * w + j]

    @numba.njit(nogil=True)
    def col2im(d5, dx):
        m_, _, _, ho, wo = d5.shape
        for m in range(m_):
            dx[m] = 0
            for i in range(kh):  # offsets in the order of the NumPy loop: the same sums
                for j in range(kw):
                    for h in range(ho):
                        for w in range(wo):
                            dx[m, sh * h + i, sw * w + j] += d5[m, i, j, h, w]

    @numba.njit(nogil=True)
    def select(xr, x, out, idx):
        m_, ho, wo = out.shape
        for m in range(m_):
            for h in range(ho):
                for w in range(wo):
                    r0, c0 = sh * h, sw * w
                    best, val, at = xr[m, r0, c0], x[m, r0, c0], 0
                    for i in range(kh):
                        for j in range(kw):
                            if i + j > 0 and xr[m, r0 + i, c0 + j] > best:  # strictly larger: the first maximum on ties
                                best, val, at = xr[m, r0 + i, c0 + j], x[m, r0 + i, c0 + j], i * kw + j
                    out[m, h, w] = val
                    idx[m, h, w] = at

    @numba.njit(nogil=True)
    def route(dy, idx, dx):
        m_, ho, wo = dy.shape
        for m in range(m_):
            for h in range(ho):
                for w in range(wo):
                    at = idx[m, h, w]
                    dx[m, sh * h + at // kw, sw * w + at % kw] = dy[m, h, w]

    _WINDOW_KERNELS[key] = im2col, col2im, select, route
    return im2col, col2im, select, route


def im2col(xpad, out6, stride) -> bool:
    """Copy the windows of a padded NCHW array into ``out6`` (N, C, kh, kw, H_out, W_out), a
    C-contiguous array of its dtype: ``out6[n, c, i, j, h, w] = xpad[n, c, s_h h + i, s_w w + j]``.
    False (nothing done) where the kernel does not apply."""
    if not _host(xpad, out6) or not out6.flags.c_contiguous or xpad.dtype != out6.dtype:
        return False
    n, c, kh, kw, ho, wo = out6.shape
    x3 = xpad.reshape(n * c, *xpad.shape[2:])
    _window_kernels(kh, kw, *stride)[0](x3, out6.reshape(n * c, kh, kw, ho, wo))
    return True


def col2im(d6, padded_shape, stride):
    """The padded input gradient (``padded_shape``) from patch gradients ``d6`` laid out
    (N, C, kh, kw, H_out, W_out): pixel (s_h h + i, s_w w + j) sums d6[n, c, i, j, h, w] over the
    offsets in (i, j) order, from 0 (as the NumPy loop's strided additions into zeros)."""
    if not _host(d6):
        return None
    n, c, kh, kw, ho, wo = d6.shape
    dx = workspace.empty(numpy, padded_shape, d6.dtype)
    _window_kernels(kh, kw, *stride)[1](d6.reshape(n * c, kh, kw, ho, wo), dx.reshape(n * c, *padded_shape[2:]))
    return dx


def maxpool_forward(xpad, kernel, stride, out_shape, index_dtype):
    """(max, arg-max offset i kw + j) over the windows of a padded NCHW array: the arg-max of the
    real parts (the first maximum on ties; NaN is never larger), the whole (complex) value carried."""
    if not _host(xpad):
        return None
    n, c, ho, wo = out_shape
    out = workspace.empty(numpy, out_shape, xpad.dtype)
    idx = workspace.empty(numpy, out_shape, index_dtype)
    x3 = xpad.reshape(n * c, *xpad.shape[2:])
    _window_kernels(*kernel, *stride)[2](x3.real, x3, out.reshape(n * c, ho, wo), idx.reshape(n * c, ho, wo))
    return out, idx


def maxpool_route(dy, idx, kernel, stride, padded_shape):
    """Disjoint windows only (stride >= kernel): the padded input gradient, ``dy`` at each window's
    arg-max pixel and +0 elsewhere (the NumPy path's ``where(idx == k, dy, 0)`` per offset)."""
    (kh, kw), (sh, sw) = kernel, stride
    if not _host(dy) or sh < kh or sw < kw or not dy.flags.c_contiguous or not idx.flags.c_contiguous:
        return None
    n, c, ho, wo = dy.shape
    dx = workspace.empty(numpy, padded_shape, dy.dtype)
    dx.fill(0)
    _window_kernels(kh, kw, sh, sw)[3](dy.reshape(n * c, ho, wo), idx.reshape(n * c, ho, wo), dx.reshape(n * c, *padded_shape[2:]))
    return dx
