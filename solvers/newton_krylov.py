"""Truncated Newton-Krylov on complex-step Hessian-vector products (Shen et al. 2020, reconstructed).

Shen, Shao, Zhou, Jiang, Luo, Yang, "Second-order Neural Network Training Using Complex-step
Directional Derivative", arXiv:2009.07098. Only the abstract is public (docs/complex-step.md section 6.1): a
stochastic Krylov iteration on complex-step (CSFD) Hessian-vector products that stops "as soon
as a disturbing direction is found", and a step size adjusted by "monitor[ing] the approximation
error in the Taylor expansion". The loop below is this project's reconstruction from standard
published rules (docs/complex-step.md section 6.3; docs/newton-krylov.md sections 3-4); **none of its
constants are the paper's settings**. Steps 1-3 and the damping rule of step 5 are those of the
Newton-CG base, :class:`solvers.newton_cg.NewtonCG`, shared with Hessian-free.

Per iteration k, on the minibatch B_g given to ``NewtonKrylov.step``:

1. **Gradient.** L_k = L_{B_g}(w_k), g_k = grad L_{B_g}(w_k) (regularised: + 0.5 tau ||w||^2);
   a zero gradient ends the step (``cg_exit`` = -1).
2. **Curvature.** H = the chosen curvature of the regularised loss on B_H, the first
   ``curvature_batch_size`` rows (or ceil(``curvature_fraction`` |B_g|) rows) of B_g. ``curvature``
   selects the operator: "cs" complex step (default, :class:`engine.curvature.HessianCS`),
   "fd-forward"/"fd-central" finite differences, "rop" the exact R-operator, "gn" Gauss-Newton.
   Nothing else in the code path depends on the choice.
3. **Inner solve.** Truncated CG (:func:`solvers.krylov.truncated_cg`) on (H + lambda I) p = -g_k
   from p_0 = 0, or beta p_{k-1} with ``warm_start_beta`` = beta > 0; exits on non-positive
   curvature d^T (H + lambda I) d <= ``cg_curvature_threshold`` ||d||^2 (the "disturbing
   direction"), on ||r|| <= min(``cg_rtol``, sqrt(||g||)) ||g||, optionally on Martens' stalled
   model (``cg_model_check``), or after ``cg_max_iter`` products. Optional preconditioner
   "kfac": the K-FAC block-diagonal (G + d I) (x) (A + d I) from the Kronecker factors of the
   curvature batch at targets sampled from the model (``kfac_targets="sampled"``, the true Fisher
   as K-FAC estimates it, Martens & Grosse 2015 section 5; one extra forward and backward on B_H)
   or of the gradient pass at the observed targets (``"empirical"``, free, the empirical Fisher),
   applied through :meth:`engine.curvature.KroneckerBlockOperator.solve`; d = ``kfac_damping``
   or, when that is 0, sqrt(lambda + tau). **Trust region** (``trust_radius`` Delta > 0, the
   default 1): with ``trust_region="steihaug"`` (default) CG is Steihaug-Toint's (Steihaug 1983;
   Nocedal & Wright 2006, Alg. 7.2): it stops where an iterate would leave ||p|| <= Delta, on the
   boundary, and a disturbing direction is followed to the boundary instead of only stopping;
   ``"scale"`` runs plain truncated CG and scales a longer step back to ||p|| = Delta.
   ``trust_radius=0`` leaves Levenberg-Marquardt damping alone in charge (the default before the
   Newton suite, docs/newton-krylov.md section 10).
4. **Taylor check.** For a step length alpha (``alpha``, 1 by default):
   Delta_pred(alpha) = -(alpha g^T p + 1/2 alpha^2 p^T H p)  (p^T H p from the CG recurrences,
   undamped unless ``rho_damped``), Delta_act(alpha) = L_{B_g}(w) - L_{B_g}(w + alpha p),
   rho = Delta_act / Delta_pred (Nocedal & Wright 2006, eq. 4.4). The step is accepted if
   rho > ``eta`` (``accept="rho"``) or if L(w + alpha p) <= L(w) + c alpha g^T p
   (``accept="armijo"``, c = ``armijo_c``); otherwise alpha <- ``backtrack_factor`` alpha, at most
   ``max_backtracks`` times (:func:`solvers.newton_cg.backtracking`), after which the step is
   rejected (w unchanged).
   When Delta_pred is below ``rho_noise`` eps |L(w)| the two losses cannot resolve it (rounding
   of L is ~eps |L|): the ratio is then not measurable, the step is accepted if the loss did not
   rise by more than that noise, and it counts as rho = 1 for the adaptation (it happens only
   near a minimiser, where the quadratic model is exact to rounding;
   :func:`solvers.newton_cg.adapt_damping`).
5. **Adaptation** from the rho of the last trial, with thresholds ``rho_low`` = 0.25 and
   ``rho_high`` = 0.75 (Nocedal & Wright Alg. 4.1; Martens 2010 section 4.1):
   ``adapt`` = "damping": lambda <- lambda ``damping_increase`` (3/2) if rho < rho_low or rho is
   NaN, lambda <- lambda ``damping_decrease`` (2/3) if rho > rho_high (Levenberg-Marquardt, Martens'
   constants), clipped to [``damping_min``, ``damping_max``]; "step": the next initial alpha is the
   accepted alpha times ``step_decrease`` (1/2) or ``step_increase`` (2), clipped to
   [``alpha_min``, ``alpha_max``]; "both": both; "none": neither. The trust radius, when on,
   follows :func:`solvers.newton_cg.adapt_radius` (Nocedal & Wright Alg. 4.1): a quarter of the
   length tried if rho < rho_low, min(2 Delta, ``trust_radius_max``) if rho > rho_high and the
   full step reached the boundary; after backtracking Delta is first cut to the length tried.

Info per step (host floats): ``loss``, ``grad_norm``, ``cg_iters``, ``cg_exit`` (an index into
:data:`solvers.krylov.EXIT_REASONS`: 0 converged, 1 negative_curvature, 2 max_iter,
3 model_stalled; -1 when the gradient was zero), ``rho``, ``alpha`` (the accepted step length, 0
when rejected), ``damping`` (lambda used by this step's CG), ``accepted``, ``backtracks``,
``pred_decrease``, ``actual_decrease``, ``step_norm`` (||alpha p||), ``trust_radius``,
``n_hvp`` (curvature products), ``n_grad_passes`` (gradient-equivalent passes, weighted by
:data:`solvers.krylov.PASS_COST` and by the rows of each pass relative to B_g: a complex-step
product on B_H counts 4 |B_H|/|B_g|, a forward-only loss on B_g counts 1/2).

State (flat, HDF5-exact): ``damping``, ``alpha``, ``radius``, ``p_prev`` (last CG solution,
for the warm start), ``k``.
"""

from __future__ import annotations

import math

import numpy

from engine.curvature import KroneckerBlockOperator, kron_factors

from .base import Hyper, nonnegative, positive, register
from .krylov import CURVATURES, EXIT_REASONS, PASS_COST
from .newton_cg import GradientStart, LineSearch, NewtonCG, RadiusRule, adapt_damping, adapt_radius, backtracking

__all__ = ["NewtonKrylov", "kfac_preconditioner", "EXIT_REASONS"]


def _choice(default, help, options):
    return Hyper(default, help, lambda v: v in options, f"one of {', '.join(map(repr, options))}", str)


def _fraction(help, default):
    return Hyper(default, help, lambda v: 0 < v <= 1, "in (0, 1]", float)


def _above_one(help, default):
    return Hyper(default, help, lambda v: v > 1, "> 1", float)


def _below_one(help, default):
    return Hyper(default, help, lambda v: 0 < v < 1, "in (0, 1)", float)


def kfac_preconditioner(model, captures, damping: float):
    """M^{-1} r for M = block-diag (G + d I) (x) (A + d I), the K-FAC curvature of ``captures``.

    A = (1/N) sum a~ a~^T and G = (1/N) sum g g^T from :func:`engine.curvature.kron_factors`
    (Martens & Grosse 2015, eq. 1 and section 3); ``damping`` is d, added to both factors.
    Parameters of layers without a Kronecker view pass through unchanged.
    """
    if not captures:
        raise ValueError(f"{model.name} has no layer with a Kronecker view; use preconditioner='none'")
    factors = kron_factors(captures, which=("A", "G"))
    op = KroneckerBlockOperator.from_kron_factors(model, factors, damping=damping, missing="identity")
    op.precompute_inverses()
    return op.solve


@register
class NewtonKrylov(NewtonCG):
    name = "newton_krylov"
    summary = "truncated Newton-CG on complex-step Hessian-vector products in a Steihaug-Toint trust region (Taylor-ratio radius)"
    hyperparameters = {
        # curvature
        "curvature": _choice("cs", "curvature for CG: cs (complex step), fd-forward, fd-central, rop (exact R-operator), gn (Gauss-Newton)", CURVATURES),
        "h": nonnegative("step of the cs/fd product (0 = operator default: 1e-30 cs float64, sqrt/cbrt(eps(1+||w||)) fd)", 0.0),
        "curvature_fraction": _fraction("curvature batch = first ceil(fraction |B_g|) rows of the minibatch", 1.0),
        "curvature_batch_size": nonnegative("curvature batch rows (overrides curvature_fraction when > 0)", 0, int),
        # damping (Levenberg-Marquardt, Martens 2010 constants)
        "damping": nonnegative("initial Tikhonov damping lambda in (H + lambda I) p = -g", 1.0),
        "damping_rule": _choice("constant", "lambda of CG: constant (the adapted lambda) or gradient (the adapted lambda "
                                "times ||g||, a regularised Newton method)", ("constant", "gradient")),
        "damping_min": nonnegative("lower bound of lambda", 1e-8),
        "damping_max": positive("upper bound of lambda", 1e8),
        "damping_increase": _above_one("lambda factor when rho < rho_low (Martens: 3/2)", 1.5),
        "damping_decrease": _below_one("lambda factor when rho > rho_high (Martens: 2/3)", 2.0 / 3.0),
        "rho_low": Hyper(0.25, "rho below this: shrink the step (raise lambda, shrink alpha/Delta)", lambda v: v < 1, "< 1", float),
        "rho_high": Hyper(0.75, "rho above this: enlarge the step (lower lambda, grow alpha/Delta)", lambda v: v > 0, "> 0", float),
        "adapt": _choice("damping", "what rho adapts: damping, step, both, none", ("damping", "step", "both", "none")),
        # step length and trust radius
        "alpha": positive("initial step length alpha", 1.0),
        "alpha_min": positive("lower bound of the adapted initial alpha", 1e-4),
        "alpha_max": positive("upper bound of the adapted initial alpha", 1.0),
        "step_increase": _above_one("alpha factor when rho > rho_high (adapt=step/both)", 2.0),
        "step_decrease": _below_one("alpha factor when rho < rho_low (adapt=step/both)", 0.5),
        "trust_radius": nonnegative("initial trust radius Delta on ||p|| (0 = no trust region, Levenberg-Marquardt only)", 1.0),
        "trust_radius_max": positive("upper bound of Delta", 1e3),
        "trust_region": _choice("steihaug", "how Delta > 0 bounds the step: steihaug (Steihaug-Toint CG stops at the "
                                "boundary and follows negative curvature to it) or scale (the CG step scaled back to Delta)",
                                ("steihaug", "scale")),
        # acceptance and backtracking
        "accept": _choice("rho", "acceptance test: rho (rho > eta) or armijo (sufficient decrease)", ("rho", "armijo")),
        "eta": Hyper(0.0, "accept when rho > eta (Nocedal & Wright: eta in [0, 1/4))", lambda v: 0 <= v < 1, "in [0, 1)", float),
        "armijo_c": _below_one("Armijo constant c in L(w + a p) <= L(w) + c a g^T p", 1e-4),
        "backtrack_factor": _below_one("alpha <- factor alpha on rejection (Martens: 0.8)", 0.8),
        "max_backtracks": nonnegative("reductions of alpha before the step is rejected (Martens: 60)", 60, int),
        "rho_damped": Hyper(False, "use p^T (H + lambda I) p in Delta_pred instead of the undamped p^T H p"),
        "rho_noise": positive("Delta_pred below rho_noise eps |L| is treated as unresolvable by the loss", 100.0),
        # CG
        "cg_max_iter": positive("CG iteration cap (docs/complex-step.md section 6.3: 10-50 stochastic, 250 deterministic)", 250, int),
        "cg_rtol": nonnegative("CG residual rule ||r|| <= eta ||g||, eta = min(cg_rtol, sqrt(||g||)) when adaptive", 0.5),
        "cg_adaptive_rtol": Hyper(True, "forcing term eta = min(cg_rtol, sqrt(||g||)) (else eta = cg_rtol)"),
        "cg_forcing_exponent": positive("e of the forcing term eta = min(cg_rtol, ||g||^e) (1/2 superlinear, 1 quadratic)", 0.5),
        "cg_curvature_threshold": nonnegative("exit CG on d^T (H + lambda I) d <= threshold ||d||^2", 0.0),
        "negative_curvature": _choice("stop", "at a negative-curvature exit after the first CG iteration: stop (the iterate) or "
                                      "step (the iterate plus the step along the disturbing direction)", ("stop", "step")),
        "cg_model_check": Hyper(False, "also exit CG when the quadratic model stalls (Martens 2010 section 4.4)"),
        "cg_model_eps": positive("epsilon of Martens' model-progress rule", 5e-4),
        "warm_start_beta": Hyper(0.0, "start CG from beta p_{k-1} (0 = from zero; Martens HF: 0.95)", lambda v: 0 <= v <= 1, "in [0, 1]", float),
        "preconditioner": _choice("none", "CG preconditioner: none or kfac (Kronecker factors of the gradient pass)", ("none", "kfac")),
        "kfac_damping": nonnegative("damping d of the K-FAC factors (0 = sqrt(lambda + tau))", 0.0),
        "kfac_targets": _choice("sampled", "K-FAC G factor from targets sampled from the model on B_H (true Fisher, as "
                                "K-FAC does) or from the observed targets of the gradient pass (empirical Fisher)",
                                ("sampled", "empirical")),
        "kfac_seed": nonnegative("seed of the K-FAC target sampling (draws at step k use seed (kfac_seed, k))", 0, int),
    }

    zero_gradient_info = {"cg_iters": 0, "cg_exit": -1, "rho": math.nan, "alpha": 0.0, "accepted": 0, "backtracks": 0,
                          "pred_decrease": 0.0, "actual_decrease": 0.0, "step_norm": 0.0, "n_hvp": 0}
    nonfinite_advice = "raise the damping or lower alpha"

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"alpha_min ({self.alpha_min}) must not exceed alpha_max ({self.alpha_max})")
        if self.damping_min > self.damping_max:
            raise ValueError(f"damping_min ({self.damping_min}) must not exceed damping_max ({self.damping_max})")
        if self.h and self.curvature in ("rop", "gn"):
            raise ValueError(f"h applies to the cs and fd curvatures, not {self.curvature!r}; leave h=0")

    # --- contract -----------------------------------------------------------------------
    def init(self, params):
        return {"damping": float(min(max(self.damping, self.damping_min), self.damping_max)),
                "alpha": float(min(self.alpha, self.alpha_max)), "radius": float(self.trust_radius),
                "p_prev": self.model.flatten(params) * 0, "k": 0}

    def wants_captures(self) -> bool:
        # the empirical Fisher reads the Kronecker captures of the gradient pass on B_g
        return self.preconditioner == "kfac" and self.kfac_targets == "empirical"

    def step_info(self, state) -> dict:
        return {"trust_radius": float(state["radius"])}

    def newton_step(self, params, state, x, y, start: GradientStart):
        """Steps 2-5 of the module docstring after the prologue of :meth:`NewtonCG.step`."""
        if self.damping_rule == "gradient":  # lambda = mu ||g||, mu the adapted state (Li et al. 2004)
            start.damping = float(state["damping"]) * start.grad_norm
            start.info["damping"] = start.damping
        op = self.build_operator(params, x, y, start, self.h)
        precond = self._preconditioner(params, state, x, start)
        x0 = None
        if self.warm_start_beta > 0 and state["k"] > 0:
            x0 = self.warm_start_beta * state["p_prev"]
        radius = float(state["radius"])
        steihaug = radius > 0 and self.trust_region == "steihaug"
        cg = self.solve(op, start, x0, precond, max_iter=self.cg_max_iter, rtol=self.cg_rtol,
                        adaptive_rtol=self.cg_adaptive_rtol, forcing_exponent=self.cg_forcing_exponent,
                        curvature_threshold=self.cg_curvature_threshold, negative_curvature=self.negative_curvature,
                        model_decrease_check=self.cg_model_check, model_eps=self.cg_model_eps,
                        radius=radius if steihaug else 0.0)
        p, gTp = cg.x, cg.gTp
        pHp = cg.pHp if self.rho_damped else cg.curvature
        p_norm = math.sqrt(cg.step_sq_norm)
        hit_boundary = radius > 0 and p_norm >= radius * (1 - 1e-6)
        if radius > 0 and p_norm > radius:  # scale the step back to the trust radius ("scale")
            s = radius / p_norm
            p = p * s
            gTp, pHp, p_norm = gTp * s, pHp * s * s, radius

        search, update, pred, act = self._taylor_check(params, state, x, y, start, p, gTp, pHp)
        if search.accepted:
            self.assign(params, search.outcome[0])  # w + alpha p of the accepted trial
        verdict = update.verdict
        state["damping"] = update.damping if self.adapt in ("damping", "both") else float(state["damping"])
        state["alpha"] = self._next_alpha(state, search, verdict)
        if radius > 0:  # Delta from the ratio of the last trial and the length it tried
            full = search.backtracks == 0 and search.outcome is not None
            rule = RadiusRule(self.rho_low, self.rho_high, radius_max=self.trust_radius_max)
            tried = search.alpha * p_norm if search.outcome is not None else 0.0
            radius = adapt_radius(update.effective_rho, radius if full else min(radius, tried), tried,
                                  full and hit_boundary, rule)[0]
        state["radius"] = radius
        state["p_prev"] = p if gTp < 0 else p * 0  # never warm-start from an ascent direction
        state["k"] += 1
        info = start.info
        info.update({"cg_iters": cg.iterations, "cg_exit": cg.exit_code,
                     "rho": update.rho if search.outcome is not None else math.nan,
                     "alpha": search.alpha if search.accepted else 0.0, "accepted": int(search.accepted),
                     "backtracks": search.backtracks, "pred_decrease": pred, "actual_decrease": act,
                     "step_norm": search.alpha * p_norm if search.accepted else 0.0, "n_hvp": cg.n_matvec,
                     "n_grad_passes": start.passes})
        return params, state, info

    def _preconditioner(self, params, state, x, start: GradientStart):
        """M^{-1} of the K-FAC preconditioner (module docstring, step 3), or None."""
        if self.preconditioner != "kfac":
            return None
        model = self.model
        d = self.kfac_damping or math.sqrt(start.damping + model.weight_decay)
        if self.kfac_targets == "empirical":
            captures = start.captures
        else:
            # one forward for the predictive distribution, one pass at the sampled targets (B_H);
            # the generator depends only on (seed, k), so a resumed run draws the same targets
            rng = numpy.random.default_rng((self.kfac_seed, int(state["k"])))
            xh = x[:start.n_h]
            y_sampled = model.loss_fn.sample_targets(model.predict(params, xh), rng)
            captures = model.loss_and_grad(params, xh, y_sampled, regularized=False, capture=True)[2]
            start.passes += (PASS_COST["loss"] + PASS_COST["gradient"]) * start.weight_h
        return kfac_preconditioner(model, captures, d)

    def _taylor_check(self, params, state, x, y, start: GradientStart, p, gTp: float, pHp: float):
        """Step 4: the Taylor check with backtracking on B_g; (search, rho update, Delta_pred, Delta_act).

        Delta_pred(alpha) = -(alpha g^T p + 1/2 alpha^2 p^T H p), Delta_act(alpha) = L(w) - L(w + alpha p)
        (-inf if that loss is not finite). A measured rho is accepted by ``accept``; an unresolved
        one (:func:`solvers.newton_cg.adapt_damping`) when the loss did not rise beyond the noise.
        Without a descent direction (g^T p >= 0) no trial is made, and the step is rejected.
        """
        w = self.model.flatten(params)
        alpha = float(state["alpha"])
        noise = self.rho_noise * float(numpy.finfo(numpy.dtype(w.dtype)).eps) * max(abs(start.loss), 1e-300)
        rule = self.rho_rule()
        damping = float(state["damping"])  # lambda, or mu of lambda = mu ||g|| (damping_rule)

        def trial(alpha, _):
            w_trial = w + alpha * p
            loss1 = self.loss_at(w_trial, x, y)
            start.passes += PASS_COST["loss"]
            pred = -(alpha * gTp + 0.5 * alpha * alpha * pHp)
            act = start.loss - loss1 if math.isfinite(loss1) else -math.inf
            update = adapt_damping(pred, act, damping, rule, noise)
            if update.case == "measured":
                ok = (update.rho > self.eta) if self.accept == "rho" else (act >= -self.armijo_c * alpha * gTp)
            else:
                ok = update.case == "unresolved" and act >= -noise
            return ok, (w_trial, update, pred, act)

        if not gTp < 0:  # not a descent direction: no trial, nothing predicted; rho is unmeasurable
            return LineSearch(False, alpha, 0), adapt_damping(0.0, 0.0, damping, rule, noise), 0.0, 0.0
        search = backtracking(trial, alpha, self.backtrack_factor, self.max_backtracks)
        _, update, pred, act = search.outcome  # of the last trial
        return search, update, pred, act

    def _next_alpha(self, state, search: LineSearch, verdict: str) -> float:
        """The next initial step length: adapted from rho with ``adapt`` = step or both, else kept."""
        if self.adapt not in ("step", "both"):
            return float(state["alpha"])
        base = search.alpha if search.accepted else float(state["alpha"])
        factor = {"shrink": self.step_decrease, "grow": self.step_increase}.get(verdict)
        next_alpha = base * factor if factor is not None else base
        return min(max(next_alpha, self.alpha_min), self.alpha_max)
