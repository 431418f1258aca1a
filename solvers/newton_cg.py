"""The Newton-CG base of the Newton-type solvers (:mod:`solvers.newton_krylov`, :mod:`solvers.hessian_free`).

Both are line-search Newton-CG methods (Nocedal & Wright 2006, Alg. 7.1) on a damped curvature
operator (docs/newton-krylov.md sections 1, 3 and 7). One outer iteration on the minibatch B_g:

1. **Gradient prologue** (:meth:`NewtonCG.step`, :meth:`NewtonCG.gradient_start`): L = L_{B_g}(w)
   and g = grad L_{B_g}(w) of the regularised loss (+ 1/2 tau ||w||^2), with the Kronecker captures
   when the subclass asks for them, and one host transfer of (L, g^T g). A non-finite loss or
   gradient raises ``FloatingPointError``; a zero gradient ends the step there (w unchanged,
   ``cg_exit = -1``, the subclass's :attr:`NewtonCG.zero_gradient_info`).
2. **Curvature operator** (:meth:`NewtonCG.build_operator`): the operator named by the ``curvature``
   hyper-parameter on B_H, the first :func:`solvers.krylov.curvature_rows` rows of B_g, built
   through the curvature-operator interface of engine/curvature
   (:func:`solvers.krylov.curvature_operator`; docs/newton-krylov.md section 6).
3. **Inner solve** (:meth:`NewtonCG.solve`): :func:`solvers.krylov.truncated_cg` on
   (H + lambda I) p = -g with lambda = the state's ``damping`` (docs/newton-krylov.md section 2).
4. **What p becomes** (:meth:`NewtonCG.newton_step`, the subclass): the Taylor check of
   Newton-Krylov or Martens' CG backtracking and Armijo search, both through :func:`backtracking`.
5. **Damping from the reduction ratio** (:func:`adapt_damping`, a pure function of the predicted
   and actual reductions, the current lambda and the constants; docs/newton-krylov.md section 4.3).

Cost accounting: ``start.passes`` sums gradient-equivalent passes (:data:`solvers.krylov.PASS_COST`),
each weighted by the rows of its pass relative to |B_g| (docs/newton-krylov.md section 6); it is
the ``n_grad_passes`` of the step's info.

Host synchronisation: one transfer in the prologue, those of CG (one per product,
docs/complex-step.md section 10) and one per trial loss; the products stay on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

from engine.backend import array_module, to_host

from .base import Solver
from .krylov import OPERATOR_SETUP_COST, PASS_COST, CGResult, curvature_operator, curvature_rows, truncated_cg

__all__ = ["RhoRule", "RhoUpdate", "adapt_damping", "RadiusRule", "adapt_radius", "LineSearch", "backtracking", "GradientStart", "NewtonCG"]

#: what :func:`adapt_damping` does to the trust in the quadratic model: lambda up (and the step
#: length or radius down), lambda down (and the step up), or nothing
VERDICTS = ("shrink", "grow", "keep")


@dataclass(frozen=True)
class RhoRule:
    """Constants of the Levenberg-Marquardt update of lambda from rho (Martens 2010, section 4.1).

    ``rho_low``, ``rho_high``: thresholds (1/4, 3/4: Nocedal & Wright 2006, Alg. 4.1);
    ``increase``, ``decrease``: the factors of lambda (Martens: 3/2, 2/3); ``damping_min``,
    ``damping_max``: the clip of lambda (Martens: 0 and none).
    """

    rho_low: float = 0.25
    rho_high: float = 0.75
    increase: float = 1.5
    decrease: float = 2.0 / 3.0
    damping_min: float = 0.0
    damping_max: float = math.inf


@dataclass(frozen=True)
class RhoUpdate:
    """What :func:`adapt_damping` decided.

    ``damping``: the new lambda. ``rho``: the ratio as measured (to report). ``effective_rho``:
    the rho the rule acted on (1 for an unresolved prediction the loss did not contradict).
    ``case``: "measured", "unresolved" (0 < Delta_pred <= noise) or "unmeasurable" (no
    prediction of a decrease, or a ratio that is not a number). ``verdict``: one of
    :data:`VERDICTS`.
    """

    damping: float
    rho: float
    effective_rho: float
    case: str
    verdict: str


def _taylor_ratio(predicted: float, actual: float, noise: float | None):
    """(rho, effective rho, case) of :func:`adapt_damping` (see there)."""
    if noise is None:
        # Martens' form [L(w + p) - L(w)] / (g^T p + 1/2 p^T G p): the same quotient, in his signs
        rho = -actual / -predicted if predicted != 0 else math.nan
        if math.isinf(rho):
            rho = math.nan
        return rho, rho, ("unmeasurable" if math.isnan(rho) else "measured")
    if predicted > noise:
        rho = actual / predicted
        return rho, rho, "measured"
    if predicted > 0:  # below the loss's rounding: the comparison cannot judge the step
        rho = actual / predicted
        return rho, (1.0 if actual >= -noise else rho), "unresolved"
    return -math.inf, -math.inf, "unmeasurable"  # the model predicts no decrease


def adapt_damping(predicted: float, actual: float, damping: float, rule: RhoRule,
                  noise: float | None = None) -> RhoUpdate:
    """Levenberg-Marquardt update of lambda from the reduction ratio; a pure function.

    rho = Delta_act / Delta_pred (Nocedal & Wright 2006, eq. 4.4): ``actual`` = L(w) - L(w + p)
    over ``predicted`` = -(g^T p + 1/2 p^T H p), the reduction of the quadratic model. Then
    (Martens 2010, section 4.1; docs/newton-krylov.md sections 4.3 and 7):

        lambda <- min(increase lambda, damping_max)  if rho < rho_low or rho is NaN  ("shrink")
        lambda <- max(decrease lambda, damping_min)  if rho > rho_high               ("grow")
        lambda unchanged                             otherwise                       ("keep")

    How rho is measured (docs/newton-krylov.md section 4.2):

    * ``noise=None`` (Martens, Hessian-free): the quotient as it comes, whatever the sign of the
      prediction; a zero prediction or an infinite quotient counts as NaN ("unmeasurable").
    * ``noise`` >= 0 (cstep, Newton-Krylov; noise = rho_noise eps |L(w)|, the rounding of the
      loss): a prediction above the noise is "measured"; 0 < Delta_pred <= noise is "unresolved",
      acted on as rho = 1 when the loss did not rise by more than the noise (only near a
      minimiser, where the model is exact to rounding) and as the quotient otherwise; a
      prediction of no decrease is "unmeasurable", rho = -inf.
    """
    rho, effective, case = _taylor_ratio(predicted, actual, noise)
    if not effective >= rule.rho_low:  # NaN and -inf shrink
        return RhoUpdate(min(damping * rule.increase, rule.damping_max), rho, effective, case, "shrink")
    if effective > rule.rho_high:
        return RhoUpdate(max(damping * rule.decrease, rule.damping_min), rho, effective, case, "grow")
    return RhoUpdate(damping, rho, effective, case, "keep")


@dataclass(frozen=True)
class RadiusRule:
    """Constants of the trust-radius update (Nocedal & Wright 2006, Alg. 4.1): thresholds of rho,
    the factor of the step length on a poor ratio, the factor of Delta on a good one, and the cap."""

    rho_low: float = 0.25
    rho_high: float = 0.75
    shrink: float = 0.25
    grow: float = 2.0
    radius_max: float = 1e3


def adapt_radius(rho: float, radius: float, step_norm: float, at_boundary: bool, rule: RadiusRule) -> tuple[float, str]:
    """The next trust radius from the Taylor ratio; a pure function. Returns (Delta', verdict).

    ``rho``: the ratio the rule acts on (the ``effective_rho`` of :func:`adapt_damping`, so an
    unresolved prediction the loss did not contradict counts as 1; NaN and -inf count as poor).
    ``step_norm``: ||alpha p|| of the step judged; ``at_boundary``: whether it reached Delta.

        Delta' = shrink ||alpha p||             if rho < rho_low or rho is NaN   ("shrink")
        Delta' = min(grow Delta, radius_max)    if rho > rho_high and at_boundary ("grow")
        Delta' = Delta                          otherwise                         ("keep")

    Nocedal & Wright's Alg. 4.1 shrinks to Delta/4; shrinking from the length of the step that
    failed (as MINPACK's Levenberg-Marquardt code does, More 1978) matters after an interior step
    much shorter than Delta, which Delta/4 could still contain. A zero step (nothing to judge)
    shrinks Delta itself.
    """
    if not rho >= rule.rho_low:
        base = step_norm if 0.0 < step_norm <= radius else radius
        return rule.shrink * base, "shrink"
    if rho > rule.rho_high and at_boundary:
        return min(rule.grow * radius, rule.radius_max), "grow"
    return radius, "keep"


@dataclass(frozen=True)
class LineSearch:
    """What :func:`backtracking` found: whether a trial was accepted, the last alpha tried, the
    number of reductions made, and the outcome the last trial returned (None if none ran)."""

    accepted: bool
    alpha: float
    backtracks: int
    outcome: object = None


def backtracking(trial: Callable, alpha: float, factor: float, max_backtracks: int) -> LineSearch:
    """Backtracking line search (Nocedal & Wright 2006, Alg. 3.1; Martens' constants 0.8 and 60).

    Tries alpha, factor alpha, factor^2 alpha, ... until ``trial(alpha, j) -> (accepted,
    outcome)`` accepts the j-th, at most ``max_backtracks`` reductions; then the step is rejected.
    """
    outcome = None
    for j in range(max_backtracks + 1):
        if j:
            alpha *= factor
        accepted, outcome = trial(alpha, j)
        if accepted:
            return LineSearch(True, alpha, j, outcome)
    return LineSearch(False, alpha, j, outcome)


@dataclass
class GradientStart:
    """What the gradient prologue hands to the rest of the step.

    ``n_g``, ``n_h``: rows of B_g and of the curvature batch B_H, ``weight_h`` = n_h / n_g;
    ``damping``: the lambda of this step's CG; ``loss``, ``grad_norm``, ``g_sq``: host floats;
    ``g``: the flat gradient (device); ``captures``: the Kronecker captures of the gradient pass
    (None unless asked for); ``info``: the step's info so far; ``passes``: gradient equivalents
    spent so far (a host float the step adds to).
    """

    xp: object
    n_g: int
    n_h: int
    weight_h: float
    damping: float
    loss: float
    grad_norm: float
    g_sq: float
    g: object
    captures: list | None
    info: dict
    passes: float


class NewtonCG(Solver):
    """Base of the Newton-CG solvers: the prologue, the zero-gradient exit, the curvature operator,
    the CG call and the rho rule (see the module docstring). A subclass declares the
    hyper-parameters ``curvature``, ``curvature_fraction``, ``curvature_batch_size``,
    ``rho_low``, ``rho_high``, ``damping_increase``, ``damping_decrease``, ``damping_min``
    (``damping_max`` optional) and implements :meth:`newton_step`.
    """

    #: info entries of a step that stops at a zero gradient, after the prologue's
    zero_gradient_info: ClassVar[dict] = {}
    #: the advice of the error raised on a non-finite loss or gradient
    nonfinite_advice: ClassVar[str] = "raise the damping"
    #: no upper clip of lambda unless the subclass declares the hyper-parameter
    damping_max = math.inf

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        if self.rho_low >= self.rho_high:
            raise ValueError(f"rho_low ({self.rho_low}) must be below rho_high ({self.rho_high})")

    # --- hooks ----------------------------------------------------------------------------
    def wants_captures(self) -> bool:
        """Whether the gradient pass also returns the Kronecker captures (for a preconditioner)."""
        return False

    def step_info(self, state) -> dict:
        """Info entries known before the step, after ``loss``, ``grad_norm`` and ``damping``."""
        return {}

    def newton_step(self, params, state, x, y, start: GradientStart):
        """The step after the prologue, at a nonzero gradient: ``(params, state, info)``."""
        raise NotImplementedError

    # --- the shared steps -----------------------------------------------------------------
    def step(self, params, state, x, y):
        """The prologue, then the zero-gradient exit or :meth:`newton_step`."""
        start = self.gradient_start(params, state, x, y)
        if start.g_sq == 0.0:
            state["k"] += 1
            return params, state, {**start.info, **self.zero_gradient_info, "n_grad_passes": start.passes}
        return self.newton_step(params, state, x, y, start)

    def gradient_start(self, params, state, x, y) -> GradientStart:
        """The prologue: the curvature batch's size, L and g on B_g (one host transfer), checks."""
        model = self.model
        xp = array_module(x, *params)
        n_g = x.shape[0]
        n_h = curvature_rows(n_g, self.curvature_fraction, self.curvature_batch_size)
        lam = float(state["damping"])
        capture = self.wants_captures()
        out = model.loss_and_grad(params, x, y, capture=capture)
        g = model.flatten(out[1])
        loss, g_sq = (float(s) for s in to_host(xp.stack([out[0], g @ g])))
        grad_norm = math.sqrt(g_sq)
        if not math.isfinite(loss) or not math.isfinite(grad_norm):
            raise FloatingPointError(f"the minibatch loss or gradient is {loss}/{grad_norm} at iteration {state['k']}; "
                                     f"{self.nonfinite_advice}")
        info = {"loss": loss, "grad_norm": grad_norm, "damping": lam, **self.step_info(state)}
        return GradientStart(xp, n_g, n_h, n_h / n_g, lam, loss, grad_norm, g_sq, g, out[2] if capture else None,
                             info, PASS_COST["gradient"])

    def build_operator(self, params, x, y, start: GradientStart, h: float = 0.0):
        """The ``curvature`` operator of the regularised loss on B_H (its set-up cost counted)."""
        op = curvature_operator(self.curvature, self.model, params, x[:start.n_h], y[:start.n_h], h)
        start.passes += OPERATOR_SETUP_COST[self.curvature] * start.weight_h
        return op

    def solve(self, op, start: GradientStart, x0, preconditioner: Callable | None, **options) -> CGResult:
        """Truncated CG on (op + lambda I) p = -g from ``x0`` (its products counted)."""
        cg = truncated_cg(op.matvec, -start.g, x0, damping=start.damping, preconditioner=preconditioner, **options)
        start.passes += PASS_COST[self.curvature] * start.weight_h * cg.n_matvec
        return cg

    def rho_rule(self) -> RhoRule:
        """The constants of :func:`adapt_damping`, from the hyper-parameters."""
        return RhoRule(self.rho_low, self.rho_high, self.damping_increase, self.damping_decrease,
                       self.damping_min, self.damping_max)

    def loss_at(self, w, x, y) -> float:
        """L(w) on (x, y) for flat parameters w, as a host float (one host sync)."""
        return float(to_host(self.model.loss(self.model.unflatten(w), x, y)))

    def assign(self, params, w):
        """Write flat parameters w into ``params`` in place."""
        for prm, t in zip(params, self.model.unflatten(w)):
            prm[...] = t
