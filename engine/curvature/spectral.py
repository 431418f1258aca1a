"""Spectra of curvature operators: Lanczos eigenvalues and the spectral density by stochastic
Lanczos quadrature, on the operator interface (DESIGN.md convention 4).

* :func:`lanczos` - the k largest / smallest eigenpairs by the symmetric Lanczos process (Golub &
  Van Loan, "Matrix Computations", 4th ed., Algorithm 10.1.1) with full reorthogonalisation (their
  discussion of practical Lanczos procedures, chapter 10): every new vector is orthogonalised
  against all previous ones by classical Gram-Schmidt applied twice ("twice is enough": Daniel,
  Gragg, Kaufman, Stewart, Math. Comp. 1976; Kahan's criterion in Parlett, "The Symmetric
  Eigenvalue Problem"), so the Ritz values acquire no spurious copies and reach the eigenvalues
  to rounding.
* :func:`slq_density` - the Gaussian-smoothed spectral density by stochastic Lanczos quadrature
  (Lin, Saad, Yang, "Approximating spectral densities of large matrices", SIAM Review 2016;
  Ghorbani, Krishnan, Xiao, "An investigation into neural net optimization via Hessian
  eigenvalue density", ICML 2019).

Cost per Lanczos step: one operator product plus O(j n) vector work at step j (six
matrix-vector products with the j stored vectors: two Gram-Schmidt passes for the new vector,
one for a restart direction, see :func:`_lanczos_steps`). No step synchronises with the host:
the tridiagonal coefficients stay on the device and come to the host in one transfer at the end,
where the small tridiagonal eigenproblem is solved (``scipy.linalg.eigh_tridiagonal``, float64).
See :mod:`engine.curvature.analysis` for the ``seed`` and ``progress`` conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from ..backend import is_device_array, to_host
from .analysis import ProductCounter, check_count, check_operator, host_generator, rademacher_rows
from .base import split_norm

__all__ = ["LanczosResult", "lanczos", "SpectralDensity", "slq_density", "gaussian_density", "lanczos_quadrature"]

WHICH = ("LA", "SA", "LM", "both")


# --- the Lanczos process -----------------------------------------------------------------------
def _lanczos_steps(xp, apply, Q, coef, reseed, start: int, stop: int) -> None:
    """Steps ``start`` .. ``stop - 1`` of Lanczos with full reorthogonalisation, in place.

    Q ((m + 1) x n, row j = q_j, q_0 set by the caller) and coef (2 x m: alpha_j, beta_j) live on
    the device. Step j: w = A q_j, then w -= Q_j^T (Q_j w) twice, with Q_j = rows 0..j (the
    first pass removes alpha_j q_j + beta_{j-1} q_{j-1}, the three-term recurrence, and the
    rest; the second removes what rounding left), alpha_j = q_j^T A q_j (both passes' j-th
    coefficient), beta_j = ||w||, q_{j+1} = w / beta_j.

    Breakdown (an invariant subspace: a Hessian with a repeated eigenvalue, a Gauss-Newton
    matrix of low rank) is decided on the device, without a sync, by Kahan's criterion: when
    the second pass removes at least half of what the first left (||w''|| <= ||w'|| / sqrt 2),
    w is rounding noise inside span(Q_j). Then beta_j = 0 and the process restarts from a fresh
    direction: a rolled copy of the random ``reseed`` vector, orthogonalised against Q_j in one
    pass (a random vector loses no significant digits to cancellation unless j is close to n,
    and at j = n - 1 the loss is only sqrt(n) eps). T then splits into blocks, and repeated
    eigenvalues are found with their multiplicity. The restart direction is prepared at every
    step (deciding first would cost a sync): with the two passes for w, six matrix-vector
    products over Q_j per step, the O(j n) vector work.
    """
    for j in range(start, stop):
        Qj = Q[:j + 1]
        w = apply(Q[j])
        h = Qj @ w  # Gram-Schmidt coefficients, first pass (never in place: apply may return its input)
        w = w - h @ Qj
        h2 = Qj @ w  # second pass
        w -= h2 @ Qj
        r = xp.roll(reseed, j + 1)
        r -= (Qj @ r) @ Qj
        coef[0, j] = h[j] + h2[j]
        w, beta = split_norm(w)
        # Kahan: ||w''||^2 <= ||w'||^2 / 2 = (||w''||^2 + ||h2||^2) / 2, i.e. ||w''|| <= ||h2||
        # (Q_j has orthonormal rows), decided from the j + 1 coefficients instead of a pass over w'
        restart = beta <= split_norm(h2)[1]
        Q[j + 1] = xp.where(restart, split_norm(r)[0], w)
        coef[1, j] = xp.where(restart, 0, beta)


def _tridiagonal_eigh(alpha, beta):
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal T (host, float64)."""
    from scipy.linalg import eigh_tridiagonal  # noqa: PLC0415 (import on use, as base.py does)

    alpha = numpy.asarray(alpha, dtype=numpy.float64)
    if alpha.size == 1:
        return alpha.copy(), numpy.ones((1, 1))
    return eigh_tridiagonal(alpha, numpy.asarray(beta[:alpha.size - 1], dtype=numpy.float64))


def _select(theta, k: int, which: str) -> numpy.ndarray:
    """Indices (ascending by value) of the wanted Ritz values among ``theta`` (ascending)."""
    m = theta.size
    k = min(k, m)
    if which == "LA":
        idx = numpy.arange(m - k, m)
    elif which == "SA":
        idx = numpy.arange(k)
    elif which == "LM":
        idx = numpy.sort(numpy.argsort(numpy.abs(theta), kind="stable")[m - k:])
    else:
        idx = numpy.union1d(numpy.arange(k), numpy.arange(m - k, m))
    return idx


@dataclass
class LanczosResult:
    """What :func:`lanczos` found.

    ``eigenvalues`` (host float64, ascending) and ``eigenvectors`` (n x k on ``op.xp``, unit
    columns, or None) are the wanted Ritz pairs; ``residual_norms`` the estimates
    ||A y_i - theta_i y_i|| = beta_m |s_{m,i}| (Golub & Van Loan, chapter 10) that come free
    with the tridiagonal T = S diag(theta) S^T. ``ritz_values`` are all m Ritz values, ``alpha``
    and ``beta`` the diagonal and off-diagonal of T (beta[m-1] is the last, outside T), and
    ``n_products`` / ``n_iter`` the operator products / steps spent. ``converged`` is None
    without ``tol``.
    """

    eigenvalues: numpy.ndarray
    eigenvectors: object
    residual_norms: numpy.ndarray
    ritz_values: numpy.ndarray
    alpha: numpy.ndarray
    beta: numpy.ndarray
    n_products: int
    n_iter: int
    converged: bool | None = None


def _start_rows(op, seed, v0):
    """(q0, reseed) on the device: both from one host draw moved in one copy, or q0 = ``v0``."""
    xp, n = op.xp, op.shape[0]
    rows = host_generator(seed).standard_normal((2, n)).astype(op.dtype)
    if v0 is None:
        dev = xp.asarray(rows)
        return dev[0], dev[1]
    if xp is numpy and is_device_array(v0):
        raise TypeError("lanczos: the operator computes with NumPy and v0 is a CuPy array; pass engine.backend.to_host(v0)")
    if not is_device_array(v0):
        v0 = numpy.asarray(v0, dtype=numpy.float64)
        if v0.size != n or not numpy.isfinite(v0).all() or not v0.any():
            raise ValueError(f"v0 must be a finite non-zero vector of length {n}")
    q0 = xp.asarray(v0).reshape(-1).astype(op.dtype)
    if q0.shape != (n,):
        raise ValueError(f"v0 must be a vector of length {n}, got shape {tuple(v0.shape)}")
    return q0, xp.asarray(rows[1])


def lanczos(op, k: int = 1, which: str = "LA", n_iter: int | None = None, seed=0, tol: float | None = None,
            return_vectors: bool = False, v0=None, check_every: int = 10, progress=None) -> LanczosResult:
    """The k extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    ``which``: "LA" the k largest, "SA" the k smallest, "LM" the k largest in magnitude, "both"
    the k largest and the k smallest. ``n_iter`` Lanczos steps (one product each; default
    min(n, 2 k' + 40) with k' the number of wanted values; at most n, where T is similar to A and
    every eigenvalue is found to rounding). The start vector is Gaussian from ``seed`` (or
    ``v0``). Memory: about n_iter + 6 vectors of length n on the device.

    Without ``tol`` all n_iter steps run and the host is synchronised once, at the end. With
    ``tol``, every ``check_every`` steps the coefficients come to the host (one sync each) and
    the run stops once every wanted Ritz pair has residual estimate <= tol max(|theta_i|, ||T||
    eps).
    """
    check_operator(op, "lanczos")
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    n = op.shape[0]
    k = check_count(k, "k")
    if k > n:
        raise ValueError(f"k={k} exceeds the operator's dimension {n}")
    wanted = min(n, 2 * k if which == "both" else k)
    m = min(n, 2 * wanted + 40) if n_iter is None else min(n, check_count(n_iter, "n_iter"))
    if m < wanted:
        raise ValueError(f"n_iter={m} Lanczos steps give at most {m} Ritz values; {wanted} are wanted")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive (or None for a fixed n_iter), got {tol}")
    check_every = check_count(check_every, "check_every")
    xp = op.xp
    Q = xp.zeros((m + 1, n), dtype=op.dtype)
    coef = xp.zeros((2, m), dtype=op.dtype)
    q0, reseed = _start_rows(op, seed, v0)
    Q[0] = split_norm(q0)[0]
    apply = ProductCounter(op, progress, m)
    done, converged = 0, None
    while done < m:
        stop = m if tol is None else min(m, done + check_every)
        _lanczos_steps(xp, apply, Q, coef, reseed, done, stop)
        done = stop
        host = to_host(coef[:, :done]).astype(numpy.float64)  # one transfer per check (one in all without tol)
        theta, S = _tridiagonal_eigh(host[0], host[1])
        idx = _select(theta, k, which)
        resid = numpy.abs(host[1, done - 1] * S[-1, idx])
        if tol is not None:
            floor = numpy.finfo(op.dtype).eps * numpy.abs(theta).max(initial=0.0)
            converged = bool((resid <= tol * numpy.maximum(numpy.abs(theta[idx]), floor)).all())
            if converged:
                break
    vectors = None
    if return_vectors:
        vectors = Q[:done].T @ xp.asarray(S[:, idx].astype(op.dtype))
    return LanczosResult(theta[idx], vectors, resid, theta, host[0], host[1], apply.count, done, converged)


# --- stochastic Lanczos quadrature ---------------------------------------------------------------
def gaussian_density(nodes, grid, sigma: float, weights=None) -> numpy.ndarray:
    """phi(t) = sum_i w_i g_sigma(t - theta_i), g_sigma(x) = exp(-x^2 / (2 sigma^2)) / (sigma sqrt(2 pi)),
    on the host grid; w_i = 1 / len(nodes) by default (the smoothed histogram of exact
    eigenvalues: the reference :func:`slq_density` approximates)."""
    nodes = numpy.asarray(nodes, dtype=numpy.float64).reshape(-1)
    grid = numpy.asarray(grid, dtype=numpy.float64)
    w = numpy.full(nodes.size, 1.0 / nodes.size) if weights is None else numpy.asarray(weights, dtype=numpy.float64).reshape(-1)
    x = (grid[:, None] - nodes[None, :]) / sigma
    return numpy.exp(-0.5 * x * x) @ w / (sigma * numpy.sqrt(2 * numpy.pi))


def lanczos_quadrature(alpha, beta):
    """Gauss quadrature nodes theta_i and weights tau_i = s_{1,i}^2 of the tridiagonal T (alpha,
    beta) from a unit start vector q: sum_i tau_i f(theta_i) ~ q^T f(A) q, exact for
    polynomials of degree <= 2m - 1 (Golub & Meurant, "Matrices, Moments and Quadrature"; Lin, Saad, Yang 2016)."""
    theta, S = _tridiagonal_eigh(alpha, beta)
    return theta, S[0] ** 2


@dataclass
class SpectralDensity:
    """The smoothed spectral density ``density`` on ``grid`` (host), from ``nodes`` and
    ``weights`` (n_probes x m, host: each probe's quadrature) with Gaussian width ``sigma``;
    the density integrates to 1 (the spectrum counted as (1/n) sum_i delta(t - lambda_i))."""

    grid: numpy.ndarray
    density: numpy.ndarray
    nodes: numpy.ndarray
    weights: numpy.ndarray
    sigma: float
    n_products: int


def slq_density(op, n_probes: int = 10, n_iter: int | None = None, grid=None, sigma: float | None = None,
                n_grid: int = 1000, seed=0, progress=None) -> SpectralDensity:
    """Stochastic Lanczos quadrature for the spectral density (Lin, Saad, Yang 2016; Ghorbani,
    Krishnan, Xiao 2019):

        phi_sigma(t) = (1/n) sum_i g_sigma(t - lambda_i)
                     ~ (1/P) sum_{l=1..P} sum_{i=1..m} tau_i^(l) g_sigma(t - theta_i^(l)),

    where probe l is a normalised Rademacher vector q_l (E[q q^T] = I / n), theta^(l) the Ritz
    values of m Lanczos steps from q_l and tau^(l) the squared first components of T's
    eigenvectors: the Gauss quadrature of q_l^T g_sigma(t - A) q_l. With m = n the quadrature is
    exact and only the probe average is random.

    ``n_iter`` default min(n, 80); ``sigma`` default 1% of the spread of the Ritz values;
    ``grid`` default ``n_grid`` points over [min theta - 5 sigma, max theta + 5 sigma]. Full
    reorthogonalisation, one buffer reused by every probe; the coefficients of all probes come to
    the host in one transfer at the end. P m products.
    """
    check_operator(op, "slq_density")
    n = op.shape[0]
    P = check_count(n_probes, "n_probes")
    m = min(n, 80) if n_iter is None else min(n, check_count(n_iter, "n_iter"))
    if sigma is not None and not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    xp = op.xp
    signs = rademacher_rows(op, P + 1, seed)  # the last row seeds restarts after a breakdown
    reseed = signs[P].astype(op.dtype)
    Q = xp.zeros((m + 1, n), dtype=op.dtype)
    coefs = xp.zeros((P, 2, m), dtype=op.dtype)
    apply = ProductCounter(op, progress, P * m)
    for p in range(P):
        Q[0] = signs[p].astype(op.dtype) / n ** 0.5
        _lanczos_steps(xp, apply, Q, coefs[p], reseed, 0, m)
    host = to_host(coefs).astype(numpy.float64)  # the one host transfer
    quad = [lanczos_quadrature(c[0], c[1]) for c in host]
    nodes = numpy.stack([t for t, _ in quad])
    weights = numpy.stack([w for _, w in quad])
    if sigma is None:
        spread = nodes.max() - nodes.min()
        sigma = 0.01 * spread if spread > 0 else max(1e-3 * abs(nodes.max()), 1e-12)
    if grid is None:
        grid = numpy.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, check_count(n_grid, "n_grid", 2))
    density = gaussian_density(nodes.ravel(), grid, sigma, weights.ravel() / P)
    return SpectralDensity(numpy.asarray(grid, dtype=numpy.float64), density, nodes, weights, float(sigma), apply.count)
