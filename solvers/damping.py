"""Damping of BFGS pairs: Powell damping, the "B = I" Powell (LM) damping, and the double damping
of K-BFGS (Goldfarb, Ren, Bahamou, NeurIPS 2020, section 3.2; docs/kbfgs.md section 4.4).

All decisions are made on the device with ``where`` (no host synchronisation); each function
returns the damped vector(s) and 0-d boolean "fired" flags.

Division guards (docs/kbfgs.md pitfall 18; the official code has none):

* Powell: when y^T H y <= 0 (for a positive definite H this means y = 0) damping does not fire
  and s is returned unchanged; the BFGS skip rule then discards the pair (s^T y = 0).
* B = I damping: when s^T s = 0 it does not fire. When it fires, the Powell weight
  theta2 = (1 - mu2) s^T s / (s^T s - s^T y) is used only when it is a true convex weight,
  0 <= theta2 <= 1, which always holds for mu2 < 1 (lambda < 1). For mu2 >= 1 (lambda >= 1) the
  formula can give theta2 < 0, > 1, or 0/0 (s^T y = s^T s); then the minimal additive
  correction y~ = y + ((mu2 s^T s - s^T y) / s^T s) s is used instead. Both give
  s^T y~ = mu2 s^T s exactly (in exact arithmetic), the property the damping exists for.
"""

from __future__ import annotations

from engine.fuse import fused

from .bfgs import inner_products, matvec

__all__ = ["powell_damping", "lm_damping", "double_damping", "powell_coefficients", "lm_coefficients"]


def powell_coefficients(xp, sy, yHy, mu1, one_minus_mu1):
    """(fired, theta1) of Powell damping from s^T y and y^T H y (a formula for the fused kernels;
    1 - mu1 comes from the host: arithmetic between two scalar arguments inside a CuPy fused kernel
    is float64, and would promote a float32 result)."""
    fired = (yHy > 0) & (sy <= mu1 * yHy)
    theta = xp.where(fired, one_minus_mu1 * yHy / xp.where(fired, yHy - sy, 1), 1)
    return fired, theta


def lm_coefficients(xp, ss, sy, mu2, one_minus_mu2):
    """(fired, convex, theta2, shift) of the B = I damping from s^T s and s^T y (see the module docstring)."""
    fired = (ss > 0) & (sy <= mu2 * ss)
    denom = ss - sy
    theta = one_minus_mu2 * ss / xp.where(denom > 0, denom, 1)
    convex = fired & (denom > 0) & (theta >= 0) & (theta <= 1)
    shift = (mu2 * ss - sy) / xp.where(ss > 0, ss, 1)
    return fired, convex, theta, shift


@fused
def _powell_vector(xp, s, Hy, sy, yHy, mu1, one_minus_mu1):
    fired, theta = powell_coefficients(xp, sy, yHy, mu1, one_minus_mu1)
    return xp.where(fired, theta * s + (1 - theta) * Hy, s)


@fused
def _lm_vector(xp, s, y, ss, sy, mu2, one_minus_mu2):
    fired, convex, theta, shift = lm_coefficients(xp, ss, sy, mu2, one_minus_mu2)
    y_powell = theta * y + (1 - theta) * s
    y_shift = y + shift * s
    return xp.where(convex, y_powell, xp.where(fired, y_shift, y))


@fused
def _powell_fired(xp, sy, yHy, mu1):
    return (yHy > 0) & (sy <= mu1 * yHy)  # powell_coefficients' flag


@fused
def _lm_fired(xp, ss, sy, mu2):
    return (ss > 0) & (sy <= mu2 * ss)  # lm_coefficients' flag


@fused
def _damping_fired(xp, sy, yHy, mu1, ss2, sy2, mu2):
    return _powell_fired.formula(xp, sy, yHy, mu1), _lm_fired.formula(xp, ss2, sy2, mu2)


def powell_damping(s, y, Hy, mu1: float = 0.2, fired: bool = True):
    """Powell damping in inverse form (``get_BFGS_PowellHDamping``): modifies s.

    r = s^T y / (y^T H y). If r > mu1, s is kept; otherwise
    theta1 = (1 - mu1) y^T H y / (y^T H y - s^T y) and s~ = theta1 s + (1 - theta1) H y, so that
    s~^T y = mu1 y^T H y. Returns ``(s~, fired)``; with ``fired=False`` ``(s~, (s^T y, y^T H y))``,
    the inner products the flag is decided from (so a caller can decide it together with others).
    """
    dots = inner_products((s, y), (y, Hy))
    sy, yHy = dots[0], dots[1]
    s_damped = _powell_vector(s, Hy, sy, yHy, mu1, 1 - mu1)
    return s_damped, (_powell_fired(sy, yHy, mu1) if fired else (sy, yHy))


def lm_damping(s, y, mu2: float, fired: bool = True):
    """Powell damping with B = I (``get_BFGS_ModifiedDamping``): modifies y.

    If s^T y / s^T s > mu2, y is kept; otherwise theta2 = (1 - mu2) s^T s / (s^T s - s^T y) and
    y~ = theta2 y + (1 - theta2) s, so that s^T y~ = mu2 s^T s: the curvature H sees along s is at
    least mu2, which bounds H from above (the Levenberg-Marquardt-like part of the double
    damping). See the module docstring for the guard used when mu2 >= 1. Returns ``(y~, fired)``
    (``fired=False``: ``(y~, (s^T s, s^T y))`` as in :func:`powell_damping`).
    """
    dots = inner_products((s, s), (s, y))
    ss, sy = dots[0], dots[1]
    y_damped = _lm_vector(s, y, ss, sy, mu2, 1 - mu2)
    return y_damped, (_lm_fired(ss, sy, mu2) if fired else (ss, sy))


def double_damping(s, y, H, mu1: float = 0.2, *, mu2: float):
    """K-BFGS double damping (docs/kbfgs.md section 4.4): Powell on s with H, then B = I on y.

    ``H`` is a matrix or a callable ``v -> H v`` (the L-BFGS operator of K-BFGS(L)). The second
    step uses the already damped s~. ``mu2`` (keyword, required) is sqrt(lambda) in K-BFGS. The inputs are not modified
    (the solver keeps the undamped EMA pair as state, docs/kbfgs.md pitfall 5).
    Returns ``(s~, y~, powell_fired, lm_fired)``. On a device: H y, two fused reductions for the
    four inner products, two fused vector kernels and one kernel for both flags.
    """
    Hy = H(y) if callable(H) else matvec(H, y)
    s_damped, (sy, yHy) = powell_damping(s, y, Hy, mu1, fired=False)
    y_damped, (ss2, sy2) = lm_damping(s_damped, y, mu2, fired=False)
    powell_fired, lm_fired = _damping_fired(sy, yHy, mu1, ss2, sy2, mu2)
    return s_damped, y_damped, powell_fired, lm_fired
