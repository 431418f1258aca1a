"""The Hessian-action update of the activation-side factor H_a (docs/kbfgs.md section 4.5).

H_a approximates (A + sqrt(lambda) I)^{-1} without re-inverting A: every iteration does one BFGS
inverse update with

    s_a = H_a a_bar,    y_a = (A + sqrt(lambda) I) s_a,

so that the secant condition makes H_a+ exact along s_a: H_a+ (A + sqrt(lambda) I) s_a = s_a.
No damping is needed since s_a^T y_a >= sqrt(lambda) ||s_a||^2 > 0. The skip rule uses
g_ref = a_bar.

a_bar is the batch mean of the homogeneous layer input. Two variants exist in the reference code
(docs/kbfgs.md section 8.2): V2 (HEAD, default) ends a_bar with 1, the homogeneous coordinate;
V1 (the first Demo and probably the paper's figures) ends it with the mean of the activation means.
"""

from __future__ import annotations

from engine.backend import array_module
from engine.ops import add_scaled_

from .bfgs import SKIP_CONSTANT, bfgs_inverse_update, matvec

__all__ = ["HESSIAN_ACTION_VARIANTS", "hessian_action_vector", "hessian_action_update"]

HESSIAN_ACTION_VARIANTS = ("V2", "V1")


def hessian_action_vector(a_mean, variant: str = "V2"):
    """a_bar = [mean_rows(a), 1] (V2) or [mean_rows(a), mean(mean_rows(a))] (V1)."""
    xp = array_module(a_mean)
    if variant == "V2":
        last = xp.ones(1, dtype=a_mean.dtype)
    elif variant == "V1":
        last = a_mean.mean().reshape(1)
    else:
        raise ValueError(f"unknown Hessian-action variant {variant!r}; use 'V2' (reference code HEAD) or 'V1' (first Demo)")
    return xp.concatenate([a_mean, last])


def hessian_action_update(H_a, A, shift: float, a_bar, skip_constant: float = SKIP_CONSTANT, inplace: bool = False):
    """One Hessian-action BFGS update of ``H_a`` towards (A + shift I)^{-1}; shift = sqrt(lambda).

    Returns ``(H_a_new, skipped)`` as :func:`solvers.bfgs.bfgs_inverse_update` (``inplace`` as there). The damped matrix
    A + shift I is never formed: y_a = A s_a + shift s_a.
    """
    s_a = matvec(H_a, a_bar)
    y_a = matvec(A, s_a)
    add_scaled_(y_a, s_a, shift)
    return bfgs_inverse_update(H_a, s_a, y_a, g_ref=a_bar, skip_constant=skip_constant, inplace=inplace)
