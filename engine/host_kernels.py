"""One-pass numba kernels for hot elementwise formulas on NumPy arrays.

On CuPy a formula of :mod:`engine.fuse` is one fused kernel; on NumPy it runs op by op, each
operation a pass over memory with a temporary (a ReLU forward is five such passes, a column mean
of a difference three and a reduction). The kernels here do the same arithmetic in one pass for
the common case (real float32/float64 operands of one dtype; the ReLU pair also complex64/128,
the complex-step pass's; the layouts named per kernel) and return ``None`` for anything else,
where the caller runs its formula. They compute every entry with the formula's own operations
in the formula's own order, in the operands' dtype (the scalars are cast first, as NumPy casts a
Python scalar against an array), and sum a column in row order as NumPy's ``sum(axis=0)`` does:
the results are bitwise those of the formula (tests/engine/test_host_kernels.py holds them to it). No transcendental function is here: numba's
``exp`` and ``log1p`` are not NumPy's SIMD ones, and would move results in the last bit.

The convolutions' window work (im2col, col2im, max-pooling) has its kernels in
:mod:`engine.cpu_kernels`, the O(d^2) factor updates in :mod:`engine.curvature.kernels`. Image
batches (more than two axes) keep the pooled branchless blends of :mod:`engine.ops` for ReLU:
fresh outputs here would cost new pages every pass.

numba only ever sees host arrays: every entry point checks that all operands are
``numpy.ndarray`` first (a device array would otherwise be converted implicitly, which CuPy
refuses). ``engine.fuse.unfused()`` switches these kernels off with the fused ones, which leaves
the plain formulas: the reference the tests compare against.
"""

from __future__ import annotations

import numpy

from .fuse import fusion_off

__all__ = ["available", "relu_forward", "where0", "column_sum", "column_difference_sum", "momentum_", "scaled_copy_"]

try:  # numba is a project dependency; without it every entry point declines
    import numba
except ImportError:  # pragma: no cover
    numba = None

_REAL = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
_COMPLEX = (numpy.dtype(numpy.complex64), numpy.dtype(numpy.complex128))


def available(*arrays, dtypes=_REAL) -> bool:
    """True when the kernels may take these operands: numba present, all NumPy arrays of one
    dtype of ``dtypes`` (float32 or float64 unless told), and the formulas not switched off
    (``engine.fuse.unfused``)."""
    if numba is None or fusion_off():
        return False
    if not all(type(a) is numpy.ndarray for a in arrays):
        return False
    dtype = arrays[0].dtype
    return dtype in dtypes and all(a.dtype == dtype for a in arrays)


if numba is not None:
    @numba.njit(cache=True, nogil=True)
    def _relu_forward_nb(z, y, mask):
        for i in range(z.size):
            v = z[i]
            p = v.real > 0
            mask[i] = p
            y[i] = v if p else 0  # +0 (+0 + 0i) where not Re z > 0 (NaN included), as where(Re z > 0, z, 0)

    @numba.njit(cache=True, nogil=True)
    def _where0_nb(mask, v, out):
        for i in range(v.size):
            out[i] = v[i] if mask[i] else 0

    @numba.njit(cache=True, nogil=True)
    def _column_sum_nb(a, scale, divisor, out):
        n, d = a.shape
        for j in range(d):
            out[j] = 0
        for i in range(n):  # row by row, as NumPy reduces axis 0 when the rows are in order
            for j in range(d):
                out[j] += a[i, j] * scale / divisor

    @numba.njit(cache=True, nogil=True)
    def _column_difference_sum_nb(a, b, scale, divisor, out):
        n, d = a.shape
        for j in range(d):
            out[j] = 0
        for i in range(n):
            for j in range(d):
                out[j] += (a[i, j] - b[i, j]) * scale / divisor

    @numba.njit(cache=True, nogil=True)
    def _momentum_nb(m, g, rho, weight, threshold):
        for i in range(m.size):
            v = m[i] * rho
            v += weight * g[i]
            m[i] = 0 if abs(v) < threshold else v


def relu_forward(z):
    """(where(Re z > 0, z, 0), Re z > 0) of a real or complex (a complex-step pass) C-contiguous ``z``
    in one pass, or None."""
    if not (available(z, dtypes=_REAL + _COMPLEX) and z.flags.c_contiguous):
        return None
    y = numpy.empty_like(z)
    mask = numpy.empty(z.shape, dtype=bool)
    _relu_forward_nb(z.reshape(-1), y.reshape(-1), mask.reshape(-1))
    return y, mask


def where0(mask, v):
    """where(mask, v, 0) for a boolean ``mask`` and a real or complex ``v`` of its shape, both C-contiguous, or None."""
    if not (available(v, dtypes=_REAL + _COMPLEX) and type(mask) is numpy.ndarray and mask.dtype == numpy.bool_ and mask.shape == v.shape
            and v.flags.c_contiguous and mask.flags.c_contiguous):
        return None
    out = numpy.empty_like(v)
    _where0_nb(mask.reshape(-1), v.reshape(-1), out.reshape(-1))
    return out


def _rows_in_order(*arrays) -> bool:
    """2-D operands whose rows are laid out one after another (row stride > column stride > 0) and
    that have two columns or more: where NumPy's ``sum(axis=0)`` adds the rows in order. A column
    vector, or a column-major operand, it sums pairwise along the contiguous axis instead."""
    return all(a.ndim == 2 and a.shape[1] >= 2 and a.strides[0] > a.strides[1] > 0 for a in arrays)


def column_sum(a, scale, divisor):
    """sum(a * scale / divisor, axis=0) of a real 2-D ``a`` with rows in order (:func:`_rows_in_order`), or None."""
    if not (available(a) and _rows_in_order(a)):
        return None
    out = numpy.empty(a.shape[1], dtype=a.dtype)
    t = a.dtype.type
    _column_sum_nb(a, t(scale), t(divisor), out)
    return out


def column_difference_sum(a, b, scale, divisor):
    """sum((a - b) * scale / divisor, axis=0) of real 2-D ``a``, ``b`` of one shape, rows in order, or None."""
    if not (available(a, b) and a.shape == b.shape and _rows_in_order(a, b)):
        return None
    out = numpy.empty(a.shape[1], dtype=a.dtype)
    t = a.dtype.type
    _column_difference_sum_nb(a, b, t(scale), t(divisor), out)
    return out


def momentum_(m, g, rho, weight, threshold) -> bool:
    """m <- where(|rho m + weight g| < threshold, 0, rho m + weight g) in place for 1-D ``m``, ``g``;
    False (nothing done) where the kernel does not apply."""
    if not (available(m, g) and m.ndim == 1 and m.shape == g.shape):
        return False
    t = m.dtype.type
    _momentum_nb(m, g, t(rho), t(weight), t(threshold))
    return True


def scaled_copy_(out, a, scale) -> bool:
    """out[...] = scale * a as one NumPy pass into ``out`` (no temporary); False where it does not apply."""
    if not (available(out, a) and out.shape == a.shape):
        return False
    numpy.multiply(a, out.dtype.type(scale), out=out)
    return True
