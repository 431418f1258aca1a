"""Martens' Hessian-free optimisation (Martens, "Deep learning via Hessian-free optimization", ICML 2010).

The established baseline for :mod:`solvers.newton_krylov`, with the constants of Martens' public
demo code (``nnet_train_2.m`` / ``conjgrad_1.m``; docs/complex-step.md section 6.2, cross-checked with
``drasmuss/hessianfree`` and ``ltatzel/PyTorchHessianFree``; docs/newton-krylov.md section 7). Steps
1-3 and the damping rule of step 5 are those of the Newton-CG base,
:class:`solvers.newton_cg.NewtonCG`, shared with Newton-Krylov:

1. **Gradient** g and loss L on the minibatch B_g given to ``HessianFree.step`` (Martens uses
   the full training set; in the stochastic setting the minibatch plays that role); a zero
   gradient ends the step (``cg_exit`` = -1).
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
   gradient pass, (g^2)^T (a^2) per layer with one capture row per example, i.e. Dense layers; no
   per-example gradients materialised), and tau
   the weight decay, since our curvature includes tau I.
4. **CG backtracking** (section 4.6): CG iterates are stored at i = ceil(5 * 1.3^j) and at exit;
   walking back from the last one, an earlier iterate replaces the current one while
   L_{B_g}(w + x_earlier) <= L_{B_g}(w + x_current).
5. **Reduction ratio** rho = [L(w) - L(w + p)] / -(g^T p + 1/2 p^T G p), with damping switched
   off (p^T G p from the CG recurrences, undamped), on the curvature batch B_H as in Martens' code
   (``rho_batch="curvature"``), or on B_g (``rho_batch="gradient"``, free: it reuses the losses of
   step 4). lambda <- 3/2 lambda if rho < 1/4 or rho is NaN, lambda <- 2/3 lambda if rho > 3/4
   (initial lambda = 45; :func:`solvers.newton_cg.adapt_damping` with Martens' plain ratio).
6. **Armijo line search** on B_g: the largest alpha in {1, 0.8, 0.8^2, ...} with
   L(w + alpha p) <= L(w) + c alpha g^T p, c = 1e-2, at most 60 reductions
   (:func:`solvers.newton_cg.backtracking`); otherwise the step is rejected (alpha = 0).

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

from .base import Hyper, nonnegative, positive, register
from .krylov import CURVATURES, PASS_COST
from .newton_cg import GradientStart, NewtonCG, RhoUpdate, adapt_damping, backtracking

__all__ = ["HessianFree", "squared_gradient_diagonal"]


def squared_gradient_diagonal(model, captures, n: int):
    """diag(F_emp) = (1/N) sum_n (grad l_n)^2 on the flat parameter vector, from layer captures.

    For a Kronecker layer whose capture has one row per example (a Dense layer; a convolution
    has one per example and location, and is refused) grad_W l_n = g_n a_n^T and grad_b l_n =
    g_n (g_n = ``Capture.g``, the per-example pre-activation gradient), so sum_n (grad_W l_n)^2 =
    (g*g)^T (a*a) elementwise and sum_n (grad_b l_n)^2 = sum_n g_n*g_n: two GEMMs per layer, no
    per-example gradients (Martens 2010, section 4.7).
    """
    xp = array_module(*[c.a for c in captures])
    dtype = captures[0].a.dtype
    parts = [None] * len(model.shapes)
    for c in captures:
        if c.a.shape[0] != n:
            raise ValueError(f"Martens' diagonal preconditioner needs one capture row per example; layer {c.layer} "
                             f"({model.layers[c.layer]!r}) has {c.a.shape[0]} rows for {n} examples: "
                             "use preconditioner='none'")
        gg = c.g * c.g
        parts[c.param_index] = (gg.T @ (c.a * c.a)) / n
        parts[c.param_index + 1] = gg.sum(axis=0) / n
    for k, s in enumerate(model.shapes):
        if parts[k] is None:
            raise ValueError(f"parameter {k} of {model.name} belongs to no captured Kronecker layer; use preconditioner='none'")
    return xp.concatenate([p.reshape(-1) for p in parts]).astype(dtype, copy=False)


@register
class HessianFree(NewtonCG):
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

    zero_gradient_info = {"cg_iters": 0, "cg_exit": -1, "cg_chosen": 0, "rho": math.nan, "alpha": 0.0, "accepted": 0,
                          "backtracks": 0, "step_norm": 0.0, "n_hvp": 0}
    nonfinite_advice = "raise the initial damping"

    def init(self, params):
        return {"damping": float(self.damping), "cg_x": self.model.flatten(params) * 0, "k": 0}

    def wants_captures(self) -> bool:
        return self.preconditioner == "martens"

    def newton_step(self, params, state, x, y, start: GradientStart):
        """Steps 2-6 of the module docstring after the prologue of :meth:`NewtonCG.step`."""
        op = self.build_operator(params, x, y, start)
        precond = None
        if self.preconditioner == "martens":
            diag = squared_gradient_diagonal(self.model, start.captures, start.n_g)
            m_inv = (diag + (start.damping + self.model.weight_decay)) ** (-self.precond_exponent)
            precond = lambda r: m_inv * r  # noqa: E731
        x0 = self.cg_decay * state["cg_x"] if state["k"] > 0 and self.cg_decay > 0 else None
        cg = self.solve(op, start, x0, precond, max_iter=self.cg_max_iter, min_iter=self.cg_min_iter,
                        rtol=self.cg_rtol, adaptive_rtol=False, model_decrease_check=True,
                        model_eps=self.cg_model_eps, keep_iterates=True)

        w = self.model.flatten(params)
        chosen, loss_p = self._cg_backtracking(w, cg.iterates, x, y, start)
        p = chosen.x
        gTp, pGp = (float(s) for s in to_host(start.xp.stack([chosen.gTp, chosen.curvature])))
        update = self._reduction_ratio(params, w, p, gTp, pGp, loss_p, x, y, start)

        # Armijo line search on B_g (the loss at alpha = 1 is known from the CG backtracking)
        def armijo(alpha, j):
            loss_a = loss_p
            if j:
                loss_a = self.loss_at(w + alpha * p, x, y)
                start.passes += PASS_COST["loss"]
            return loss_a <= start.loss + self.armijo_c * alpha * gTp, None

        search = backtracking(armijo, 1.0, self.backtrack_factor, self.max_backtracks)
        if search.accepted:
            self.assign(params, w + search.alpha * p)

        state["damping"] = update.damping
        state["cg_x"] = cg.x  # Martens warm-starts from the last CG iterate, not the backtracked one
        state["k"] += 1
        step_sq = float(to_host(p @ p))
        info = start.info
        info.update({"cg_iters": cg.iterations, "cg_exit": cg.exit_code, "cg_chosen": chosen.iteration,
                     "rho": update.rho, "alpha": search.alpha if search.accepted else 0.0,
                     "accepted": int(search.accepted), "backtracks": search.backtracks,
                     "step_norm": search.alpha * math.sqrt(step_sq) if search.accepted else 0.0,
                     "n_hvp": cg.n_matvec, "n_grad_passes": start.passes})
        return params, state, info

    def _cg_backtracking(self, w, chain: list, x, y, start: GradientStart):
        """Step 4 (Martens 2010, section 4.6): walking back from the last stored CG iterate, an
        earlier one replaces the current one while L(w + x_earlier) <= L(w + x_current) on B_g
        (NaN counts as worse). Returns the chosen :class:`solvers.krylov.CGIterate` and its loss."""
        j = len(chain) - 1
        loss_p = self.loss_at(w + chain[j].x, x, y)
        start.passes += PASS_COST["loss"]
        if self.cg_backtracking:
            while j > 0:
                loss_prev = self.loss_at(w + chain[j - 1].x, x, y)
                start.passes += PASS_COST["loss"]
                if not loss_prev <= loss_p:  # the later iterate is better (NaN counts as worse)
                    break
                j -= 1
                loss_p = loss_prev
        return chain[j], loss_p

    def _reduction_ratio(self, params, w, p, gTp: float, pGp: float, loss_p: float, x, y,
                         start: GradientStart) -> RhoUpdate:
        """Step 5: rho with damping switched off, [L(w + p) - L(w)] / (g^T p + 1/2 p^T G p), on B_H
        (Martens) or on B_g (reusing the backtracking's loss), and lambda updated from it."""
        predicted = -(gTp + 0.5 * pGp)
        if self.rho_batch == "gradient":
            actual = -(loss_p - start.loss)
        else:
            xh, yh = x[:start.n_h], y[:start.n_h]
            lh0 = float(to_host(self.model.loss(params, xh, yh)))
            lh1 = self.loss_at(w + p, xh, yh)
            start.passes += 2 * PASS_COST["loss"] * start.weight_h
            actual = -(lh1 - lh0)
        return adapt_damping(predicted, actual, start.damping, self.rho_rule())
