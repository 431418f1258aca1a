"""Inverses of Kronecker factors: Cholesky for symmetric positive definite factors, LU otherwise,
with every check of many factors read in ONE host sync (no reliance on the library raising:
CuPy's linear algebra does not).

K-FAC inverts its damped factors (A + sqrt(lambda) I, G + sqrt(lambda) I) through
:func:`factor_inverses` at every refresh (docs/kbfgs.md section 6); :class:`engine.curvature.kronecker.
KroneckerBlockOperator` inverts its curvature factors on first use.
"""

from __future__ import annotations

import numpy
from scipy.linalg import lapack  # at import: a BLAS loaded later escapes a thread limit set before (threadpoolctl)

from ..backend import array_module, to_host

__all__ = ["factor_inverse", "factor_inverses", "symmetry_flag", "SYMMETRY_TOL"]


def _solve_triangular(xp):
    if xp is numpy:
        from scipy.linalg import solve_triangular  # noqa: PLC0415
    else:
        from cupyx.scipy.linalg import solve_triangular  # noqa: PLC0415
    return solve_triangular


#: A factor is treated as symmetric when max|F - F^T| <= SYMMETRY_TOL eps max|F| (BFGS-updated
#: factors are symmetric only to rounding).
SYMMETRY_TOL = 1e3

# status codes of the Cholesky attempt (one device integer per factor)
_CHOLESKY_OK, _NOT_FINITE, _ZERO, _USE_LU = 0, 1, 2, 3


def symmetry_flag(F):
    """max|F - F^T| <= SYMMETRY_TOL eps max|F|, as a 0-d device boolean (no host sync)."""
    xp = array_module(F)
    eps = float(numpy.finfo(F.dtype).eps)
    return xp.abs(F - F.T).max() <= SYMMETRY_TOL * eps * xp.abs(F).max()


def _lapack_cholesky_inverse(F):
    """NumPy: (inverse by LAPACK potrf + potri or None, status), about d^3 flops.

    On the host LAPACK's ``info`` is the exact test: potrf returns info = 0 only when every pivot
    of S = (F + F^T)/2 is positive, so the residual check the device path needs (see
    :func:`_cholesky_attempt`) is not; potri then forms inv(S) from the factor in place (lower
    triangle, mirrored: exactly symmetric). The device path's inv(L) by a triangular solve on I,
    inv(L)^T inv(L) and the L L^T residual cost about 5 d^3, the LU inverse 2 d^3.
    """
    scale = numpy.abs(F).max()
    if not numpy.isfinite(scale):
        return None, numpy.asarray(_NOT_FINITE)
    if scale == 0:
        return None, numpy.asarray(_ZERO)
    eps = float(numpy.finfo(F.dtype).eps)
    if numpy.abs(F - F.T).max() > SYMMETRY_TOL * eps * scale:
        return None, numpy.asarray(_USE_LU)
    S = (F + F.T) / 2
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (S,))
    c, info = potrf(S, lower=True, clean=False, overwrite_a=True)
    if info == 0:
        c, info = potri(c, lower=True, overwrite_c=True)
    if info != 0:
        return None, numpy.asarray(_USE_LU)
    inv = numpy.tril(c)
    inv += numpy.tril(c, -1).T
    if not numpy.isfinite(inv).all():
        return None, numpy.asarray(_USE_LU)
    return inv, numpy.asarray(_CHOLESKY_OK)


def _cholesky_attempt(F):
    """(inverse by Cholesky or None, status) for a square factor, without a host sync.

    The status is a 0-d device integer: ``_CHOLESKY_OK`` when F is symmetric and the factor
    L of S = (F + F^T)/2 is valid (then the inverse is inv(L)^T inv(L), exactly symmetric),
    ``_NOT_FINITE`` / ``_ZERO`` for a factor with NaN/Inf or all zeros, else ``_USE_LU``.

    Validity does not rely on the library raising. NumPy's ``cholesky`` raises ``LinAlgError``
    for a matrix that is not positive definite; CuPy's does not (outside
    ``cupyx.errstate(linalg="raise")``): it returns whatever cuSOLVER's potrf left, a partial
    factor that may be finite and wrong, and the inverse built from it is inf/NaN or a finite
    wrong matrix. So L is accepted only when

    * its diagonal is positive (a failed potrf leaves the failing pivot, <= 0, or NaN there),
    * it reproduces S: max|L L^T - S| <= 4 (n + 1) eps max|F|. A computed Cholesky factor
      satisfies |L L^T - S| <= gamma_{n+1} |L| |L^T| (Higham, "Accuracy and Stability of
      Numerical Algorithms", 2nd ed., Theorem 10.3), with |L| |L^T|_ij <= sqrt(S_ii S_jj) <=
      max|S| by Cauchy-Schwarz, whatever the conditioning of S; the product L L^T adds another
      gamma_n. 4 (n + 1) eps is twice both together, so a successful factorisation always
      passes, while a partial factor (rows past the failing pivot are not factored) does not,
      whatever potrf leaves in them;
    * the inverse is finite (a positive but tiny pivot can still overflow inv(L)).

    The work (one Cholesky, one triangular solve, two GEMMs) is done before anything is known
    about F: that is what lets every check share one host sync. On NumPy, where LAPACK's own
    status is read at no cost, :func:`_lapack_cholesky_inverse` does it instead.
    """
    xp = array_module(F)
    if xp is numpy:
        return _lapack_cholesky_inverse(F)
    n = F.shape[0]
    eps = float(numpy.finfo(F.dtype).eps)
    scale = xp.abs(F).max()
    symmetric = xp.abs(F - F.T).max() <= SYMMETRY_TOL * eps * scale
    S = (F + F.T) / 2
    Finv = None
    ok = symmetric
    with numpy.errstate(all="ignore"):  # NumPy only: a bad factor's inverse may overflow
        try:
            L = xp.linalg.cholesky(S)
            Linv = _solve_triangular(xp)(L, xp.eye(n, dtype=F.dtype), lower=True, check_finite=False)
        except numpy.linalg.LinAlgError:  # NumPy's cholesky (SciPy's solve on a zero pivot)
            ok = xp.zeros((), dtype=bool)
        else:
            Finv = Linv.T @ Linv
            residual = xp.abs(L @ L.T - S).max()
            ok = ok & (xp.diagonal(L) > 0).all() & xp.isfinite(Finv).all() & (residual <= 4 * (n + 1) * eps * scale)
    status = xp.where(ok, _CHOLESKY_OK, _USE_LU)
    status = xp.where(scale == 0, _ZERO, status)
    status = xp.where(xp.isfinite(scale), status, _NOT_FINITE)
    return Finv, status


def _finish_inverse(F, chol_inverse, status: int, name: str):
    """The inverse from the Cholesky attempt's host status, falling back to LU (one more sync)."""
    if status == _NOT_FINITE:
        raise ValueError(f"{name} contains NaN or Inf; check the statistics it was built from")
    if status == _ZERO:
        raise numpy.linalg.LinAlgError(f"{name} is zero and has no inverse; add damping")
    if status == _CHOLESKY_OK:
        return chol_inverse
    xp = array_module(F)
    try:
        Finv = xp.linalg.inv(F)  # CuPy's gives NaN/Inf for a singular F instead of raising
    except numpy.linalg.LinAlgError:
        raise numpy.linalg.LinAlgError(f"{name} is singular; add damping") from None
    if not bool(xp.isfinite(Finv).all()):
        raise numpy.linalg.LinAlgError(f"{name} is singular; add damping")
    return Finv


def _check_square(F, name):
    if F.ndim != 2 or F.shape[0] != F.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(F.shape)}")
    if F.dtype.kind != "f":
        raise TypeError(f"{name} must be a real float matrix, got {F.dtype}")
    if not F.size:
        raise numpy.linalg.LinAlgError(f"{name} is empty, so zero, and has no inverse; add damping")


def factor_inverse(F, name: str = "factor"):
    """inv(F): by Cholesky when F is symmetric positive definite, else by LU.

    Symmetry is judged to ``SYMMETRY_TOL`` eps relative (BFGS-updated factors are symmetric
    only to rounding); the Cholesky inverse inv(L)^T inv(L) of the symmetrised factor is exactly
    symmetric. A factor with NaN/Inf raises ``ValueError``; a zero or singular one
    ``numpy.linalg.LinAlgError`` ("... is singular; add damping"), on NumPy and on CuPy alike
    (CuPy's linear algebra does not raise: see :func:`_cholesky_attempt` for how a failed
    factorisation is recognised instead).

    Host syncs: ONE for a symmetric positive definite factor (every check of the Cholesky route
    is combined into one device integer, read once), two when it falls back to LU (the LU
    inverse's finiteness is read too). Callers cache the result; :func:`factor_inverses` reads
    the statuses of many factors with one sync.
    """
    return factor_inverses([F], [name])[0]


def factor_inverses(factors, names=None) -> list:
    """[inv(F) for F in factors] as :func:`factor_inverse` computes them, with ONE host sync for
    all the factors that are symmetric positive definite (plus one per factor that needs LU)."""
    factors = list(factors)
    names = list(names) if names is not None else [f"factor {k}" for k in range(len(factors))]
    if not factors:
        return []
    for F, name in zip(factors, names):
        _check_square(F, name)
    xp = array_module(*factors)
    attempts = [_cholesky_attempt(F) for F in factors]
    statuses = to_host(xp.stack([status for _, status in attempts])).tolist()  # the one host sync
    return [_finish_inverse(F, inv, status, name) for F, (inv, _), status, name in zip(factors, attempts, statuses, names)]
