"""Truncated Newton-Krylov on complex-step Hessian-vector products (Shen et al. 2020, reconstructed).

Shen, Shao, Zhou, Jiang, Luo, Yang, "Second-order Neural Network Training Using Complex-step
Directional Derivative", arXiv:2009.07098. Only the abstract is public (complex-step.md 6.1): a
stochastic Krylov iteration on complex-step (CSFD) Hessian-vector products that stops "as soon
as a disturbing direction is found", and a step size adjusted by "monitor[ing] the approximation
error in the Taylor expansion". The loop below is this project's reconstruction from standard
published rules (complex-step.md 6.3); **none of its constants are the paper's settings**.

Per iteration k, on the minibatch B_g given to :meth:`NewtonKrylov.step`:

1. **Gradient.** L_k = L_{B_g}(w_k), g_k = grad L_{B_g}(w_k) (regularised: + 0.5 tau ||w||^2).
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
   or, when that is 0, sqrt(lambda + tau). With ``trust_radius`` > 0 the step is scaled back to
   ||p|| <= Delta.
4. **Taylor check.** For a step length alpha (``alpha``, 1 by default):
   Delta_pred(alpha) = -(alpha g^T p + 1/2 alpha^2 p^T H p)  (p^T H p from the CG recurrences,
   undamped unless ``rho_damped``), Delta_act(alpha) = L_{B_g}(w) - L_{B_g}(w + alpha p),
   rho = Delta_act / Delta_pred (Nocedal & Wright 2006, eq. 4.4). The step is accepted if
   rho > ``eta`` (``accept="rho"``) or if L(w + alpha p) <= L(w) + c alpha g^T p
   (``accept="armijo"``, c = ``armijo_c``); otherwise alpha <- ``backtrack_factor`` alpha, at most
   ``max_backtracks`` times, after which the step is rejected (w unchanged).
   When Delta_pred is below ``rho_noise`` eps |L(w)| the two losses cannot resolve it (rounding
   of L is ~eps |L|): the ratio is then not measurable, the step is accepted if the loss did not
   rise by more than that noise, and it counts as rho = 1 for the adaptation (it happens only
   near a minimiser, where the quadratic model is exact to rounding).
5. **Adaptation** from the rho of the last trial, with thresholds ``rho_low`` = 0.25 and
   ``rho_high`` = 0.75 (Nocedal & Wright Alg. 4.1; Martens 2010 section 4.1):
   ``adapt`` = "damping": lambda <- lambda ``damping_increase`` (3/2) if rho < rho_low or rho is
   NaN, lambda <- lambda ``damping_decrease`` (2/3) if rho > rho_high (Levenberg-Marquardt, Martens'
   constants), clipped to [``damping_min``, ``damping_max``]; "step": the next initial alpha is the
   accepted alpha times ``step_decrease`` (1/2) or ``step_increase`` (2), clipped to
   [``alpha_min``, ``alpha_max``]; "both": both; "none": neither. The trust radius, when on,
   follows Nocedal & Wright Alg. 4.1: Delta/4 if rho < rho_low, min(2 Delta, Delta_max) if
   rho > rho_high and the step reached the boundary.

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

from engine.backend import array_module, to_host

from .base import Hyper, Solver, nonnegative, positive, register
from .krylov import (CURVATURES, EXIT_REASONS, OPERATOR_SETUP_COST, PASS_COST, curvature_operator,
                     curvature_rows, truncated_cg)

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
    from engine.curvature import KroneckerBlockOperator, kron_factors  # noqa: PLC0415

    if not captures:
        raise ValueError(f"{model.name} has no layer with a Kronecker view; use preconditioner='none'")
    factors = kron_factors(captures, which=("A", "G"))
    op = KroneckerBlockOperator.from_kron_factors(model, factors, damping=damping, missing="identity")
    op.precompute_inverses()
    return op.solve


@register
class NewtonKrylov(Solver):
    name = "newton_krylov"
    summary = "truncated Newton-CG on complex-step Hessian-vector products with a Taylor-ratio step control"
    hyperparameters = {
        # curvature
        "curvature": _choice("cs", "curvature for CG: cs (complex step), fd-forward, fd-central, rop (exact R-operator), gn (Gauss-Newton)", CURVATURES),
        "h": nonnegative("step of the cs/fd product (0 = operator default: 1e-30 cs float64, sqrt/cbrt(eps(1+||w||)) fd)", 0.0),
        "curvature_fraction": _fraction("curvature batch = first ceil(fraction |B_g|) rows of the minibatch", 1.0),
        "curvature_batch_size": nonnegative("curvature batch rows (overrides curvature_fraction when > 0)", 0, int),
        # damping (Levenberg-Marquardt, Martens 2010 constants)
        "damping": nonnegative("initial Tikhonov damping lambda in (H + lambda I) p = -g", 1.0),
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
        "trust_radius": nonnegative("initial trust radius Delta on ||p|| (0 = no trust region)", 0.0),
        "trust_radius_max": positive("upper bound of Delta", 1e3),
        # acceptance and backtracking
        "accept": _choice("rho", "acceptance test: rho (rho > eta) or armijo (sufficient decrease)", ("rho", "armijo")),
        "eta": Hyper(0.0, "accept when rho > eta (Nocedal & Wright: eta in [0, 1/4))", lambda v: 0 <= v < 1, "in [0, 1)", float),
        "armijo_c": _below_one("Armijo constant c in L(w + a p) <= L(w) + c a g^T p", 1e-4),
        "backtrack_factor": _below_one("alpha <- factor alpha on rejection (Martens: 0.8)", 0.8),
        "max_backtracks": nonnegative("reductions of alpha before the step is rejected (Martens: 60)", 60, int),
        "rho_damped": Hyper(False, "use p^T (H + lambda I) p in Delta_pred instead of the undamped p^T H p"),
        "rho_noise": positive("Delta_pred below rho_noise eps |L| is treated as unresolvable by the loss", 100.0),
        # CG
        "cg_max_iter": positive("CG iteration cap (complex-step.md 6.3: 10-50 stochastic, 250 deterministic)", 50, int),
        "cg_rtol": nonnegative("CG residual rule ||r|| <= eta ||g||, eta = min(cg_rtol, sqrt(||g||)) when adaptive", 0.5),
        "cg_adaptive_rtol": Hyper(True, "forcing term eta = min(cg_rtol, sqrt(||g||)) (else eta = cg_rtol)"),
        "cg_curvature_threshold": nonnegative("exit CG on d^T (H + lambda I) d <= threshold ||d||^2", 0.0),
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

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        if self.rho_low >= self.rho_high:
            raise ValueError(f"rho_low ({self.rho_low}) must be below rho_high ({self.rho_high})")
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

    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(x, *params)
        n_g = x.shape[0]
        n_h = curvature_rows(n_g, self.curvature_fraction, self.curvature_batch_size)
        weight_h = n_h / n_g
        lam = float(state["damping"])
        passes = 0.0

        # 1. gradient on B_g (with the Kronecker captures when K-FAC preconditions CG)
        want_captures = self.preconditioner == "kfac" and self.kfac_targets == "empirical"
        out = model.loss_and_grad(params, x, y, capture=want_captures)
        loss0_d, grads = out[0], out[1]
        passes += PASS_COST["gradient"]
        g = model.flatten(grads)
        loss0, g_sq = (float(s) for s in to_host(xp.stack([loss0_d, g @ g])))
        grad_norm = math.sqrt(g_sq)
        if not math.isfinite(loss0) or not math.isfinite(grad_norm):
            raise FloatingPointError(f"the minibatch loss or gradient is {loss0}/{grad_norm} at iteration {state['k']}; "
                                     "raise the damping or lower alpha")
        info = {"loss": loss0, "grad_norm": grad_norm, "damping": lam, "trust_radius": float(state["radius"])}
        if g_sq == 0.0:
            state["k"] += 1
            return params, state, {**info, "cg_iters": 0, "cg_exit": -1, "rho": math.nan, "alpha": 0.0, "accepted": 0,
                                   "backtracks": 0, "pred_decrease": 0.0, "actual_decrease": 0.0, "step_norm": 0.0,
                                   "n_hvp": 0, "n_grad_passes": passes}

        # 2. curvature operator on B_H (nothing below depends on which one it is)
        op = curvature_operator(self.curvature, model, params, x[:n_h], y[:n_h], self.h)
        passes += OPERATOR_SETUP_COST[self.curvature] * weight_h
        precond = None
        if self.preconditioner == "kfac":
            d = self.kfac_damping or math.sqrt(lam + model.weight_decay)
            if self.kfac_targets == "empirical":
                captures = out[2]
            else:
                # one forward for the predictive distribution, one pass at the sampled targets (B_H);
                # the generator depends only on (seed, k), so a resumed run draws the same targets
                rng = numpy.random.default_rng((self.kfac_seed, int(state["k"])))
                xh = x[:n_h]
                y_sampled = model.loss_fn.sample_targets(model.predict(params, xh), rng)
                captures = model.loss_and_grad(params, xh, y_sampled, regularized=False, capture=True)[2]
                passes += (PASS_COST["loss"] + PASS_COST["gradient"]) * weight_h
            precond = kfac_preconditioner(model, captures, d)

        # 3. truncated CG on (H + lambda I) p = -g
        x0 = None
        if self.warm_start_beta > 0 and state["k"] > 0:
            x0 = self.warm_start_beta * state["p_prev"]
        cg = truncated_cg(op.matvec, -g, x0, damping=lam, max_iter=self.cg_max_iter, rtol=self.cg_rtol,
                          adaptive_rtol=self.cg_adaptive_rtol, curvature_threshold=self.cg_curvature_threshold,
                          model_decrease_check=self.cg_model_check, model_eps=self.cg_model_eps,
                          preconditioner=precond)
        passes += PASS_COST[self.curvature] * weight_h * cg.n_matvec
        p, gTp = cg.x, cg.gTp
        pHp = cg.pHp if self.rho_damped else cg.curvature
        p_norm = math.sqrt(cg.step_sq_norm)
        radius = float(state["radius"])
        hit_boundary = False
        if radius > 0 and p_norm > radius:
            s = radius / p_norm
            p = p * s
            gTp, pHp, p_norm = gTp * s, pHp * s * s, radius
            hit_boundary = True

        # 4. Taylor check with backtracking on B_g
        w = model.flatten(params)
        alpha = float(state["alpha"])
        noise = self.rho_noise * float(numpy.finfo(numpy.dtype(w.dtype)).eps) * max(abs(loss0), 1e-300)
        accepted, rho, backtracks = False, math.nan, 0
        pred = act = 0.0
        trial = None
        if gTp < 0:
            for backtracks in range(self.max_backtracks + 1):
                if backtracks:
                    alpha *= self.backtrack_factor
                trial = w + alpha * p
                loss1 = float(to_host(model.loss(model.unflatten(trial), x, y)))
                passes += PASS_COST["loss"]
                pred = -(alpha * gTp + 0.5 * alpha * alpha * pHp)
                act = loss0 - loss1 if math.isfinite(loss1) else -math.inf
                resolved = pred > noise
                if resolved:
                    rho = act / pred
                    ok = (rho > self.eta) if self.accept == "rho" else (act >= -self.armijo_c * alpha * gTp)
                elif pred > 0:  # below the loss's rounding: the comparison cannot judge the step
                    rho = act / pred
                    ok = act >= -noise
                else:  # the model predicts an increase at this alpha: shorten
                    rho, ok = -math.inf, False
                if ok:
                    accepted = True
                    break
        rho_adapt = 1.0 if accepted and not resolved else rho

        if accepted:
            for prm, t in zip(params, model.unflatten(trial)):
                prm[...] = t
        step_norm = alpha * p_norm if accepted else 0.0

        # 5. adaptation from rho
        shrink = not (rho_adapt >= self.rho_low)  # NaN and -inf shrink
        grow = rho_adapt > self.rho_high
        if self.adapt in ("damping", "both"):
            if shrink:
                lam = min(lam * self.damping_increase, self.damping_max)
            elif grow:
                lam = max(lam * self.damping_decrease, self.damping_min)
        next_alpha = float(state["alpha"])
        if self.adapt in ("step", "both"):
            base = alpha if accepted else float(state["alpha"])
            if shrink:
                next_alpha = base * self.step_decrease
            elif grow:
                next_alpha = base * self.step_increase
            else:
                next_alpha = base
            next_alpha = min(max(next_alpha, self.alpha_min), self.alpha_max)
        if radius > 0:
            if shrink:
                radius = radius / 4
            elif grow and hit_boundary:
                radius = min(2 * radius, self.trust_radius_max)

        state["damping"] = lam
        state["alpha"] = next_alpha
        state["radius"] = radius
        state["p_prev"] = p if gTp < 0 else p * 0  # never warm-start from an ascent direction
        state["k"] += 1
        info.update({"cg_iters": cg.iterations, "cg_exit": cg.exit_code, "rho": rho, "alpha": alpha if accepted else 0.0,
                     "accepted": int(accepted), "backtracks": backtracks, "pred_decrease": pred,
                     "actual_decrease": act, "step_norm": step_norm, "n_hvp": cg.n_matvec, "n_grad_passes": passes})
        return params, state, info
