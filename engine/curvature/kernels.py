"""Fused in-place kernels for the O(d^2) Kronecker-factor updates on the CPU (the EMA of A, the
symmetric rank-2 BFGS update of H_a and H_g).

NumPy evaluates ``H += U @ V.T`` or ``A = decay A + w B`` as several passes over d x d arrays
(temporaries, then adds); on the MNIST autoencoder those passes are ~10% of a K-BFGS iteration.
On NumPy arrays these kernels do each update in one read-modify-write pass (numba, compiled once
and cached); on CuPy arrays they fall back to the equivalent array expressions. numba only ever
sees host arrays: the kernel is taken only when *every* operand is a ``numpy.ndarray`` (a device
array would otherwise be converted implicitly, which CuPy refuses).
"""

from __future__ import annotations

import numpy

from ..backend import array_module

__all__ = ["symmetric_rank2_update_", "scaled_ema_"]

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


def symmetric_rank2_update_(H, p, q):
    """H += p (p/2)^T - q (q/2)^T in place (exactly symmetric when H is); returns H."""
    xp = array_module(H, p, q)
    if _on_host(H, p, q) and H.flags.c_contiguous and H.dtype == p.dtype == q.dtype:
        _rank2_numba(H, p, q)
        return H
    U = xp.stack([p, q], axis=1)
    V = xp.stack([0.5 * p, -0.5 * q], axis=1)
    H += U @ V.T
    return H


def scaled_ema_(A, B, decay: float, w: float):
    """A <- decay A + w B in place (A may be a view, e.g. a block of a larger matrix); returns A."""
    if _on_host(A, B) and A.dtype == B.dtype:
        _ema_numba(A, B, A.dtype.type(decay), A.dtype.type(w))
        return A
    A *= decay
    A += w * B
    return A
