"""Martens' Hessian-free optimisation (Martens, "Deep learning via Hessian-free optimization", ICML 2010).

The established baseline for :mod:`solvers.newton_krylov`, with the constants of Martens' public
demo code (``nnet_train_2.m`` / ``conjgrad_1.m``; complex-step.md section 6.2, cross-checked with
``drasmuss/hessianfree`` and ``ltatzel/PyTorchHessianFree``):

1. **Gradient** g and loss L on the minibatch B_g given to :meth:`HessianFree.step` (Martens uses
   the full training set; in the stochastic setting the minibatch plays that role).
2. **Curvature**: Gauss-Newton products G v (:class:`engine.curvature.GaussNewton`; "you should
   probably only ever use 'gn'") of the regularised loss on B_H, the first
   ``curvature_batch_size`` (or ceil(``curvature_fraction`` |B_g|)) rows of B_g (Martens: one
   mini-batch "chunk" per outer iteration), damped as G + lambda I (Levenberg-Marquardt /
   Tikhonov, section 4.1). ``curvature`` can name another operator for experiments.
3. **CG** (:func:`solvers.krylov.truncated_cg`) from x0 = ``cg_decay`` x_{k-1} (0.95 times the
   last CG iterate of the previous step, section 4.5), at most ``cg_max_iter`` = 250 iterations
   (the ICML value; 150 for CURVES and ~100 for FACES are noted as better), at least 1, stopped
   by Martens' relative-progress rule (section 4.4: i > k, phi_i < 0 and
   (phi_i - phi_{i-k}) / phi_i < k eps, k = max(10, 0.1 i), eps = 5e-4); no residual rule unless
   ``cg_rtol`` > 0. Negative curvature (impossible for G + lambda I in exact arithmetic) ends CG
   as in :mod:`solvers.krylov`. Preconditioner (``preconditioner="martens"``, section 4.7):
   M = (diag(F_emp) + lambda + tau)^xi, xi = 3/4, with diag(F_emp) = (1/N) sum_n (grad l_n)^2 the
   mean of the squared per-example gradients of B_g (formed from the layer captures of the
   gradient pass, (g^2)^T (a^2) per Dense layer, no per-example gradients materialised), and tau
   the weight decay, since our curvature includes tau I.
4. **CG backtracking** (section 4.6): CG iterates are stored at i = ceil(5 * 1.3^j) and at exit;
   walking back from the last one, an earlier iterate replaces the current one while
   L_{B_g}(w + x_earlier) <= L_{B_g}(w + x_current).
5. **Reduction ratio** rho = [L(w) - L(w + p)] / -(g^T p + 1/2 p^T G p), with damping switched
   off (p^T G p from the CG recurrences, undamped), on the curvature batch B_H as in Martens' code
   (``rho_batch="curvature"``), or on B_g (``rho_batch="gradient"``, free: it reuses the losses of
   step 4). lambda <- 3/2 lambda if rho < 1/4 or rho is NaN, lambda <- 2/3 lambda if rho > 3/4
   (initial lambda = 45).
6. **Armijo line search** on B_g: the largest alpha in {1, 0.8, 0.8^2, ...} with
   L(w + alpha p) <= L(w) + c alpha g^T p, c = 1e-2, at most 60 reductions; otherwise the step is
   rejected (alpha = 0).

Info per step: ``loss``, ``grad_norm``, ``cg_iters``, ``cg_exit`` (index into
:data:`solvers.krylov.EXIT_REASONS`), ``cg_chosen`` (the CG iteration of the iterate kept by
backtracking), ``rho``, ``alpha``, ``damping`` (lambda of this step's CG), ``accepted``,
``backtracks``, ``step_norm``, ``n_hvp``, ``n_grad_passes`` (gradient equivalents, weights in
:data:`solvers.krylov.PASS_COST`, scaled by the rows of each pass relative to B_g).

State (flat, HDF5-exact): ``damping``, ``cg_x`` (last CG iterate, for the warm start), ``k``.
"""

from __future__ import annotations

import math

from engine.backend import array_module, to_host
from engine.layers import Dense

from .base import Hyper, Solver, nonnegative, positive, register
from .krylov import (CURVATURES, OPERATOR_SETUP_COST, PASS_COST, curvature_operator, curvature_rows,
                     truncated_cg)

__all__ = ["HessianFree", "squared_gradient_diagonal"]


def squared_gradient_diagonal(model, captures, n: int):
    """diag(F_emp) = (1/N) sum_n (grad l_n)^2 on the flat parameter vector, from layer captures.

    For a Dense layer grad_W l_n = g_n a_n^T and grad_b l_n = g_n (g_n = ``Capture.g``, the
    per-example pre-activation gradient), so sum_n (grad_W l_n)^2 = (g*g)^T (a*a) elementwise and
    sum_n (grad_b l_n)^2 = sum_n g_n*g_n: two GEMMs per layer, no per-example gradients.
    """
    xp = array_module(*[c.a for c in captures])
    dtype = captures[0].a.dtype
    parts = [None] * len(model.shapes)
    for c in captures:
        layer = model.layers[c.layer]
        if not isinstance(layer, Dense) or c.a.shape[0] != n:
            raise ValueError(f"Martens' diagonal preconditioner needs per-example Dense-layer captures; layer {c.layer} "
                             f"({layer!r}) has none: use preconditioner='none'")
        gg = c.g * c.g
        parts[c.param_index] = (gg.T @ (c.a * c.a)) / n
        parts[c.param_index + 1] = gg.sum(axis=0) / n
    for k, s in enumerate(model.shapes):
        if parts[k] is None:
            raise ValueError(f"parameter {k} of {model.name} belongs to no captured Dense layer; use preconditioner='none'")
    return xp.concatenate([p.reshape(-1) for p in parts]).astype(dtype, copy=False)


@register
class HessianFree(Solver):
    name = "hessian_free"
    summary = "Martens (2010) Hessian-free: Gauss-Newton CG, LM damping, CG backtracking, Armijo line search"
    hyperparameters = {
        "curvature": Hyper("gn", "curvature for CG (Martens: gn; others for experiments)", lambda v: v in CURVATURES,
                           f"one of {', '.join(CURVATURES)}", str),
        "curvature_fraction": Hyper(1.0, "curvature batch = first ceil(fraction |B_g|) rows of the minibatch",
                                    lambda v: 0 < v <= 1, "in (0, 1]", float),
        "curvature_batch_size": nonnegative("curvature batch rows (overrides curvature_fraction when > 0)", 0, int),
        "damping": positive("initial damping lambda (Martens: initlambda = 45)", 45.0),
        "damping_increase": Hyper(1.5, "lambda factor when rho < rho_low (Martens: boost = 3/2)", lambda v: v > 1, "> 1", float),
        "damping_decrease": Hyper(2.0 / 3.0, "lambda factor when rho > rho_high (Martens: drop = 2/3)", lambda v: 0 < v < 1, "in (0, 1)", float),
        "damping_min": nonnegative("lower bound of lambda (Martens: none)", 0.0),
        "rho_low": Hyper(0.25, "rho threshold below which lambda grows", lambda v: v < 1, "< 1", float),
        "rho_high": Hyper(0.75, "rho threshold above which lambda shrinks", lambda v: v > 0, "> 0", float),
        "rho_batch": Hyper("curvature", "batch of the actual reduction in rho: curvature (Martens) or gradient",
                           lambda v: v in ("curvature", "gradient"), "'curvature' or 'gradient'", str),
        "cg_max_iter": positive("CG iteration cap (Martens: 250; 150 CURVES, ~100 FACES noted as better)", 250, int),
        "cg_min_iter": positive("CG iterations before any exit test (Martens: miniters = 1)", 1, int),
        "cg_decay": Hyper(0.95, "CG warm start x0 = cg_decay * previous CG iterate (Martens: 0.95)", lambda v: 0 <= v <= 1, "in [0, 1]", float),
        "cg_model_eps": positive("epsilon of Martens' CG progress rule", 5e-4),
        "cg_rtol": nonnegative("optional residual rule ||r|| <= cg_rtol ||g|| (Martens: none, 0)", 0.0),
        "preconditioner": Hyper("martens", "CG preconditioner: martens ((diag F_emp + lambda + tau)^xi) or none",
                                lambda v: v in ("martens", "none"), "'martens' or 'none'", str),
        "precond_exponent": positive("exponent xi of Martens' preconditioner (3/4)", 0.75),
        "cg_backtracking": Hyper(True, "walk back through stored CG iterates (Martens 2010 section 4.6)"),
        "armijo_c": Hyper(1e-2, "Armijo constant c (Martens: 1e-2)", lambda v: 0 < v < 1, "in (0, 1)", float),
        "backtrack_factor": Hyper(0.8, "step factor per line-search reduction (Martens: 0.8)", lambda v: 0 < v < 1, "in (0, 1)", float),
        "max_backtracks": nonnegative("line-search reductions before the step is rejected (Martens: 60)", 60, int),
    }

    def __init__(self, model, **hyper):
        super().__init__(model, **hyper)
        if self.rho_low >= self.rho_high:
            raise ValueError(f"rho_low ({self.rho_low}) must be below rho_high ({self.rho_high})")

    def init(self, params):
        return {"damping": float(self.damping), "cg_x": self.model.flatten(params) * 0, "k": 0}

    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(x, *params)
        n_g = x.shape[0]
        n_h = curvature_rows(n_g, self.curvature_fraction, self.curvature_batch_size)
        weight_h = n_h / n_g
        lam = float(state["damping"])
        passes = 0.0

        want_captures = self.preconditioner == "martens"
        out = model.loss_and_grad(params, x, y, capture=want_captures)
        passes += PASS_COST["gradient"]
        g = model.flatten(out[1])
        loss0, g_sq = (float(s) for s in to_host(xp.stack([out[0], g @ g])))
        grad_norm = math.sqrt(g_sq)
        if not math.isfinite(loss0) or not math.isfinite(grad_norm):
            raise FloatingPointError(f"the minibatch loss or gradient is {loss0}/{grad_norm} at iteration {state['k']}; "
                                     "raise the initial damping")
        info = {"loss": loss0, "grad_norm": grad_norm, "damping": lam}
        if g_sq == 0.0:
            state["k"] += 1
            return params, state, {**info, "cg_iters": 0, "cg_exit": -1, "cg_chosen": 0, "rho": math.nan, "alpha": 0.0,
                                   "accepted": 0, "backtracks": 0, "step_norm": 0.0, "n_hvp": 0, "n_grad_passes": passes}

        op = curvature_operator(self.curvature, model, params, x[:n_h], y[:n_h])
        passes += OPERATOR_SETUP_COST[self.curvature] * weight_h
        precond = None
        if want_captures:
            diag = squared_gradient_diagonal(model, out[2], n_g)
            m_inv = (diag + (lam + model.weight_decay)) ** (-self.precond_exponent)
            precond = lambda r: m_inv * r  # noqa: E731

        x0 = self.cg_decay * state["cg_x"] if state["k"] > 0 and self.cg_decay > 0 else None
        cg = truncated_cg(op.matvec, -g, x0, damping=lam, max_iter=self.cg_max_iter, min_iter=self.cg_min_iter,
                          rtol=self.cg_rtol, adaptive_rtol=False, model_decrease_check=True,
                          model_eps=self.cg_model_eps, preconditioner=precond, keep_iterates=True)
        passes += PASS_COST[self.curvature] * weight_h * cg.n_matvec
        n_hvp = cg.n_matvec

        # CG backtracking over the stored iterates, on B_g
        w = model.flatten(params)

        def batch_loss(step, xb, yb):
            return float(to_host(model.loss(model.unflatten(w + step), xb, yb)))

        chain = cg.iterates
        j = len(chain) - 1
        loss_p = batch_loss(chain[j].x, x, y)
        passes += PASS_COST["loss"]
        if self.cg_backtracking:
            while j > 0:
                loss_prev = batch_loss(chain[j - 1].x, x, y)
                passes += PASS_COST["loss"]
                if not loss_prev <= loss_p:  # the later iterate is better (NaN counts as worse)
                    break
                j -= 1
                loss_p = loss_prev
        chosen = chain[j]
        p = chosen.x
        gTp, pGp = (float(s) for s in to_host(xp.stack([chosen.gTp, chosen.curvature])))

        # reduction ratio with damping off
        denom = gTp + 0.5 * pGp
        if self.rho_batch == "gradient":
            rho = (loss_p - loss0) / denom if denom != 0 else math.nan
        else:
            xh, yh = x[:n_h], y[:n_h]
            lh0 = float(to_host(model.loss(params, xh, yh)))
            lh1 = batch_loss(p, xh, yh)
            passes += 2 * PASS_COST["loss"] * weight_h
            rho = (lh1 - lh0) / denom if denom != 0 else math.nan
        if not math.isfinite(rho) and not math.isnan(rho):
            rho = math.nan

        # Armijo line search on B_g (the loss at alpha = 1 is known from the backtracking)
        alpha, accepted, backtracks = 1.0, False, 0
        loss_a = loss_p
        for backtracks in range(self.max_backtracks + 1):
            if backtracks:
                alpha *= self.backtrack_factor
                loss_a = batch_loss(alpha * p, x, y)
                passes += PASS_COST["loss"]
            if loss_a <= loss0 + self.armijo_c * alpha * gTp:
                accepted = True
                break
        if accepted:
            new_w = w + alpha * p
            for prm, t in zip(params, model.unflatten(new_w)):
                prm[...] = t

        if not (rho >= self.rho_low):  # includes NaN
            lam = lam * self.damping_increase
        elif rho > self.rho_high:
            lam = max(lam * self.damping_decrease, self.damping_min)

        state["damping"] = lam
        state["cg_x"] = cg.x  # Martens warm-starts from the last CG iterate, not the backtracked one
        state["k"] += 1
        step_sq = float(to_host(p @ p))
        info.update({"cg_iters": cg.iterations, "cg_exit": cg.exit_code, "cg_chosen": chosen.iteration, "rho": rho,
                     "alpha": alpha if accepted else 0.0, "accepted": int(accepted), "backtracks": backtracks,
                     "step_norm": alpha * math.sqrt(step_sq) if accepted else 0.0, "n_hvp": n_hvp,
                     "n_grad_passes": passes})
        return params, state, info
