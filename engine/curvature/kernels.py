"""Fused in-place kernels for the O(d^2) Kronecker-factor updates on the CPU (the EMA of A, the
symmetric rank-2 BFGS update of H_a and H_g).

NumPy evaluates ``H += U @ V.T`` or ``A = decay A + w B`` as several passes over d x d arrays
(temporaries, then adds); on the MNIST autoencoder those passes are ~10% of a K-BFGS iteration.
On NumPy arrays these kernels do each update in one read-modify-write pass (numba, compiled once
and cached); on CuPy arrays the same entry formula runs as one fused elementwise kernel
(:mod:`engine.fuse`), the rank-2 factors broadcast as a column and a row. numba only ever sees
host arrays: the kernel is taken only when *every* operand is a ``numpy.ndarray`` (a device array
would otherwise be converted implicitly, which CuPy refuses).
"""

from __future__ import annotations

import numpy

from ..fuse import fused

__all__ = ["symmetric_rank2_update_", "scaled_ema_", "flush_below_"]

try:  # numba is a project dependency; the fallback keeps the module importable without it
    import numba
except ImportError:  # pragma: no cover
    numba = None


if numba is not None:
    @numba.njit(cache=True, nogil=True)
    def _rank2_numba(H, p, q):
        n = H.shape[0]
        for i in range(n):
            pi = p[i]
            qi = q[i]
            for j in range(n):
                # p_i (p_j / 2) and q_i (q_j / 2) are the same exact products as for (j, i):
                # the update is exactly symmetric
                H[i, j] += pi * (0.5 * p[j]) - qi * (0.5 * q[j])

    @numba.njit(cache=True, nogil=True)
    def _ema_numba(A, B, decay, w):
        n, m = B.shape
        for i in range(n):
            for j in range(m):
                A[i, j] = decay * A[i, j] + w * B[i, j]


def _on_host(*arrays) -> bool:
    """True when numba may take these operands: all NumPy arrays."""
    return numba is not None and all(isinstance(a, numpy.ndarray) for a in arrays)


@fused
def _rank2_entries_(xp, H, p_col, p_row, q_col, q_row, accept):
    # the numba kernel's entry formula: p_i (p_j / 2) - q_i (q_j / 2), exactly symmetric
    H += xp.where(accept, p_col * (0.5 * p_row) - q_col * (0.5 * q_row), 0)


def symmetric_rank2_update_(H, p, q, accept=None):
    """H += p (p/2)^T - q (q/2)^T in place (exactly symmetric when H is) where the 0-d flag
    ``accept`` holds (always when None); returns H."""
    if _on_host(H, p, q) and H.flags.c_contiguous and H.dtype == p.dtype == q.dtype:
        if accept is None or bool(accept):  # a host flag: no device to keep it on
            _rank2_numba(H, p, q)
        return H
    _rank2_entries_(H, p[:, None], p[None, :], q[:, None], q[None, :], True if accept is None else accept)
    return H


@fused
def _scaled_ema_(xp, A, B, decay, w):
    A *= decay
    A += w * B


def scaled_ema_(A, B, decay: float, w: float):
    """A <- decay A + w B in place (A may be a view, e.g. a block of a larger matrix); returns A."""
    if _on_host(A, B) and A.dtype == B.dtype:
        _ema_numba(A, B, A.dtype.type(decay), A.dtype.type(w))
        return A
    _scaled_ema_(A, B, decay, w)
    return A


@fused
def _flush_below_(xp, a, threshold):
    a[...] = xp.where(xp.absolute(a) < threshold, 0, a)


def flush_below_(a, threshold):
    """a <- 0 where |a| < threshold, in place (one pass; a no-op for threshold 0); returns a."""
    _flush_below_(a, threshold)
    return a
