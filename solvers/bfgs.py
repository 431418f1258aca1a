"""The BFGS inverse update with the K-BFGS skip rule (docs/kbfgs.md section 4.6).

With rho = 1 / (s^T y) and h = H y,

    H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T
       = H + (rho^2 y^T H y + rho) s s^T - rho (s h^T + h s^T)        (get_BFGS_formula)

which satisfies the secant condition H+ y = s and keeps H symmetric positive definite when
s^T y > 0. The update is *skipped* (H returned unchanged) when

* s^T y <= 0, or
* s^T y <= c * s^T s * ||g_ref||  (c = 1e-4; g_ref = batch-mean pre-activation gradient for H_g,
  the Hessian-action vector a_bar for H_a), or
* H+ would contain +-inf or NaN.

Everything is decided on the device (``where`` instead of ``if``), so the update never forces a
host synchronisation; ``skipped`` is a 0-d boolean array.

Symmetry (docs/kbfgs.md pitfall 16): the update is applied as H + s w^T + w s^T with
``w = (rho^2 y^T H y + rho)/2 s - rho h``, computed by :func:`add_symmetric_rank2` so that the
result is *exactly* symmetric whenever H is: H stays symmetric through any number of updates
(the official float32 code lets H drift away from symmetry instead).
"""

from __future__ import annotations

import numpy

from engine.backend import array_module
from engine.curvature.kernels import symmetric_rank2_update_
from engine.fuse import device_arange, fused

__all__ = ["SKIP_CONSTANT", "bfgs_inverse_update", "bfgs_coefficients", "inner_products", "add_symmetric_rank2", "symmetrize", "matvec", "select"]

#: The constant c of the skip rule s^T y <= c s^T s ||g_ref|| (docs/kbfgs.md section 4.6).
SKIP_CONSTANT = 1e-4


def matvec(H, v):
    """H v for a matrix H and a vector (or matrix) v.

    Vectors go through ``einsum``, not BLAS gemv: NumPy's float32 gemv on multi-threaded OpenBLAS
    collapses when the cores are shared (measured on a loaded 2-core machine: 12-28 ms for a
    1001 x 1001 product with ``@`` or ``dot``, 0.26 ms with ``einsum``, 0.12 ms single-threaded).
    Matrices go through ``dot`` (GEMM).
    """
    xp = array_module(H, v)
    if v.ndim == 1:
        return xp.einsum("ij,j->i", H, v)
    return xp.dot(H, v)


def select(flag, a, b):
    """``a`` where the 0-d boolean ``flag`` holds, else ``b``.

    On the GPU a device-side ``where`` (no host synchronisation); on NumPy the flag already lives
    on the host, so a Python branch avoids a full pass over the arrays. The flag counts as an
    operand: a device flag is never read on the host, whatever ``a`` and ``b`` are.
    """
    xp = array_module(flag, a, b)
    if xp is numpy:
        return a if bool(flag) else b
    return xp.where(flag, a, b)


def symmetrize(H):
    """(H + H^T) / 2, exactly symmetric (used once, after an explicit inverse)."""
    return (H + H.T) * 0.5


def add_symmetric_rank2(H, s, w):
    """H + s w^T + w s^T as a new array, symmetric when H is.

    Written as H + U V^T with U = [p, q], V = [p/2, -q/2], p = c s + w / c, q = c s - w / c
    (so U V^T = (p p^T - q q^T) / 2 = s w^T + w s^T): entry (i, j) of U V^T is
    p_i (p_j / 2) - q_i (q_j / 2), the same two exact products as entry (j, i) (halving is exact),
    so with the fixed accumulation order of a GEMM the term is exactly symmetric (checked on
    OpenBLAS for every MNIST layer size; the solvers also re-symmetrise periodically in case a
    BLAS orders the two products differently for different tiles). c = sqrt(||w|| / ||s||)
    balances the vectors so the cancellation between the two outer products costs no more than
    rounding of order eps ||s|| ||w||, the size of the update itself. One rank-2 GEMM and one add:
    a third of the memory traffic of forming the two outer products separately.
    """
    U, V = _rank2_factors(s, w)
    out = U @ V.T
    out += H
    return out


def _rank2_factors(s, w):
    """(U, V), d x 2, with U V^T = s w^T + w s^T (see :func:`add_symmetric_rank2`)."""
    xp = array_module(s, w)
    ns = xp.sqrt(xp.dot(s, s))
    nw = xp.sqrt(xp.dot(w, w))
    balanced = (ns > 0) & (nw > 0)
    c = xp.where(balanced, xp.sqrt(nw / xp.where(balanced, ns, 1)), 1)
    # s = 0 or w = 0: the term is zero; zero p and q so that H comes back exactly
    p = xp.where(balanced, c * s + w / c, 0)
    q = xp.where(balanced, c * s - w / c, 0)
    return xp.stack([p, q], axis=1), xp.stack([0.5 * p, -0.5 * q], axis=1)


@fused
def _inner_products(xp, sel, *vectors):
    # row j of the broadcast (k, d) product is a_j * b_j; one reduction along the rows
    k = len(vectors) // 2
    prod = vectors[2 * k - 2] * vectors[2 * k - 1]
    for j in range(k - 2, -1, -1):
        prod = xp.where(sel == j, vectors[2 * j] * vectors[2 * j + 1], prod)
    return xp.sum(prod, axis=1)


def inner_products(*pairs):
    """(a_0 . b_0, a_1 . b_1, ...) of equal-length vector pairs as one vector, in ONE fused reduction
    on a device (instead of one dot launch each); the callers take its entries as 0-d views."""
    xp = array_module(*[v for pair in pairs for v in pair])
    selector = device_arange(xp, len(pairs))[:, None]  # the rows' pair numbers
    return _inner_products(selector, *[v[None, :] for pair in pairs for v in pair])


def bfgs_coefficients(xp, ss, sy, yHy, sHy, HyHy, gg, skip_constant):
    """(accept, rho, a, c) of the update from inner products only (a formula for the fused kernels).

    accept: the skip rule's s^T y > 0 and s^T y > c s^T s ||g_ref||; rho = 1 / s^T y (0 when
    skipped); the symmetric term is s w^T + w s^T with w = a s - rho H y, a = (rho^2 y^T H y + rho) / 2;
    c = sqrt(||w|| / ||s||) balances the rank-2 factors (:func:`add_symmetric_rank2`), with
    ||w||^2 = a^2 s^T s - 2 a rho s^T H y + rho^2 ||H y||^2 from the same inner products (any c > 0
    gives the same term in exact arithmetic; c only balances the rounding, so c = 1 when that
    estimate is not positive).
    """
    accept = (sy > 0) & (sy > skip_constant * ss * xp.sqrt(gg))
    rho = xp.where(accept, 1 / xp.where(accept, sy, 1), 0)
    a = 0.5 * (rho * rho * yHy + rho)
    ww = a * a * ss - 2 * a * rho * sHy + rho * rho * HyHy
    balanced = (ss > 0) & (ww > 0)
    c = xp.where(balanced, xp.sqrt(xp.sqrt(xp.where(balanced, ww, 1)) / xp.sqrt(xp.where(balanced, ss, 1))), 1)
    return accept, rho, a, c


@fused
def _rank2_pq(xp, s, Hy, ss, sy, yHy, sHy, HyHy, gg, skip_constant):
    """p = c s + w / c, q = c s - w / c with w = a s - rho H y: (p p^T - q q^T) / 2 = s w^T + w s^T."""
    _, rho, a, c = bfgs_coefficients(xp, ss, sy, yHy, sHy, HyHy, gg, skip_constant)
    w = a * s - rho * Hy
    return c * s + w / c, c * s - w / c


@fused
def _entry_bound(xp, diag, p, q):
    """max_i (H_ii + (p_i^2 + q_i^2) / 2): bounds every |entry| of H + (p p^T - q q^T) / 2 for an SPD H."""
    return xp.amax(diag + 0.5 * (p * p + q * q))


@fused
def _final_accept(xp, ss, sy, gg, skip_constant, bound, big):
    """The skip rule and the overflow rule together: (accept, skipped) 0-d flags."""
    accept = (sy > 0) & (sy > skip_constant * ss * xp.sqrt(gg)) & (bound < big)
    return accept, ~accept


def bfgs_inverse_update(H, s, y, g_ref, skip_constant: float = SKIP_CONSTANT, Hy=None, inplace: bool = False):
    """One BFGS update of the inverse-Hessian approximation ``H`` with the pair (s, y).

    Returns ``(H_new, skipped)``: ``H_new`` equals H+ above, or equals ``H`` when the skip rule of
    docs/kbfgs.md section 4.6 fires; ``skipped`` is a 0-d boolean array. ``Hy`` may be passed when the
    caller already has ``H @ y``.

    ``inplace=False`` (default): ``H`` is not modified; H+ is formed as a new array and checked
    entry by entry for +-inf/NaN. ``inplace=True`` (the solvers' hot path): ``H`` is updated in
    place and returned, and the inf rule is decided *before* touching H, without a pass over it:
    for a symmetric positive definite H, |H_ij| <= sqrt(H_ii H_jj) and |p_i p_j - q_i q_j| / 2 <=
    sqrt(r_i r_j) / 2 with r_i = p_i^2 + q_i^2 (p, q the rank-2 factors), so every entry of H+ is
    at most max_i (H_ii + r_i / 2); the update is skipped when that bound reaches half the largest
    float (or is not finite: non-finite factors), a superset of "H+ contains inf" that differs only
    for entries within a factor 2 of overflow.

    The in-place path on a device is a fixed handful of launches (docs/gpu.md): H y, one fused reduction for
    all the inner products (:func:`inner_products`), the fused factors p, q, the fused bound, the flag, and the fused
    rank-2 update; the scalars never leave the device.
    """
    xp = array_module(H, s, y)
    if H.ndim != 2 or H.shape[0] != H.shape[1] or s.shape != (H.shape[0],) or y.shape != s.shape:
        raise ValueError(f"bfgs_inverse_update needs a square H and vectors of its size, got H {H.shape}, s {s.shape}, y {y.shape}")
    if Hy is None:
        Hy = matvec(H, y)
    if not inplace:
        sy = xp.dot(s, y)
        ss = xp.dot(s, s)
        g_norm = xp.sqrt(xp.dot(g_ref, g_ref))
        accept = (sy > 0) & (sy > skip_constant * ss * g_norm)
        rho = xp.where(accept, 1 / xp.where(accept, sy, 1), 0)
        yHy = xp.dot(y, Hy)
        # s w^T + w s^T = (rho^2 y^T H y + rho) s s^T - rho (s h^T + h s^T)
        w = (0.5 * (rho * rho * yHy + rho)) * s - rho * Hy
        H_new = add_symmetric_rank2(H, s, w)
        accept = accept & xp.isfinite(H_new).all()
        return select(accept, H_new, H), ~accept
    dots = inner_products((s, s), (s, y), (s, Hy), (y, Hy), (Hy, Hy), (g_ref, g_ref))
    ss, sy, sHy, yHy, HyHy, gg = (dots[j] for j in range(6))
    p, q = _rank2_pq(s, Hy, ss, sy, yHy, sHy, HyHy, gg, skip_constant)
    big = 0.5 * float(numpy.finfo(H.dtype).max)
    with numpy.errstate(over="ignore", invalid="ignore"):
        bound = _entry_bound(xp.diagonal(H), p, q)
        accept, skipped = _final_accept(ss, sy, gg, skip_constant, bound, big)
    symmetric_rank2_update_(H, p, q, accept)
    return H, skipped
