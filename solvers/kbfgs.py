"""K-BFGS and K-BFGS(L): Kronecker-factored quasi-Newton (Goldfarb, Ren, Bahamou, "Practical
Quasi-Newton Methods for Training Deep Neural Networks", NeurIPS 2020, arXiv:2006.08877), exactly
as the authors' code runs them (docs/kbfgs.md sections 4 and 5).

Per Kronecker layer (Dense; Conv2d as below), with homogeneous weights W~ = [W | b] and momentum M^ = [m_W | m_b]:

    W~ <- W~ - alpha H_g M^ H_a

* H_a ((d_in+1)^2) approximates (A + sqrt(lambda) I)^{-1}, A an EMA (0.9) of the homogeneous
  input second moment, warm-started by one pass over the data; H_a = inv(A + sqrt(lambda) I)
  once at k = 0, then one Hessian-action BFGS update per iteration (section 4.5).
* H_g (d_out^2) approximates the inverse Hessian w.r.t. the pre-activations: one BFGS inverse
  update per iteration from s = mean(z) - mean(z+), y = mean(g) - mean(g+) measured on the same
  minibatch at theta_k and theta_k + alpha p (g = N dL/dz), EMA'd (0.9), then double-damped
  (Powell with mu1 = 0.2 on H_g, then B = I with mu2 = sqrt(lambda)) (sections 4.3, 4.4, 4.6).
* K-BFGS(L): H_g is the compact L-BFGS operator of the last ``memory`` damped pairs with
  H0 = gamma I, gamma = 1 (section 5); H_a stays dense.

One iteration (section 4.3): (a) forward+backward at theta_k (regularised), m <- 0.9 m + 0.1 g;
(b) per layer A <- EMA (not at k = 0), direction P = H_g M^ H_a, theta <- theta - alpha P in place;
(c) forward+backward of the unregularised loss on the same batch at theta_{k+1} = theta_trial
(only the pre-activations and their gradients: no weight-gradient products); (d) G-side and
A-side updates. No model copy is made.

State (flat, HDF5-friendly; :class:`solvers.kronecker_solver.KroneckerSolver`): ``k``,
``warm_started``, ``m`` (flat momentum) and per Kronecker layer i (index in ``model.layers``)
``layer{i}/A``, ``layer{i}/H_a``, ``layer{i}/s_ema``, ``layer{i}/y_ema`` and ``layer{i}/H_g``
(K-BFGS) or ``layer{i}/lbfgs/{S,Y,Rinv,YY,D,L,Rm,count,head}`` (K-BFGS(L); ``count`` and ``head`` are 0-d integer
arrays), keys built by :func:`solvers.kronecker_solver.layer_key`. Parameters that belong to no
Kronecker layer get the plain momentum step -alpha m.

The step is applied through the block operator of the inverse factors,
:class:`engine.curvature.KroneckerBlockOperator` with blocks (H_g, H_a) in the order H_g (M^ H_a)
(``block_order = "right_first"``; K-BFGS(L)'s H_g is the L-BFGS operator itself), which is also
what :meth:`curvature_operator` returns.

Convolutional layers (KF-QN-CNN: Ren, Bahamou, Goldfarb, "Kronecker-factored Quasi-Newton
Methods for Deep Learning", arXiv:2102.06737). A Conv2d layer is handled like a Dense layer on its
Kronecker view (:class:`engine.conv.Conv2d`): one row per (example n, output location t), N L rows
with L = H_out W_out, patches a (d_in = C_in kh kw) and pre-activations z (d_out = C_out). So

* A = E_{n,t}[a~ a~^T] (the statistics divide by the number of rows, N L), H_a as for Dense;
* H_g approximates the inverse of G = E_n[sum_t Ds_t Ds_t^T] (KFC's Gamma summed over
  locations; the capture rows are g = sqrt(L) Ds, Ds_t = d loss_n / dz_t), so the pair is
  s = mean_{n,t}(z) - mean_{n,t}(z+) and y = sum_t mean_n(Ds_t - Ds+_t) = sqrt(L) (mean_rows(g)
  - mean_rows(g+)), and the skip rule's reference gradient is sqrt(L) mean_rows(g) likewise;
  L = ``Conv2d.locations(rows, batch size)`` (:func:`engine.curvature.kronecker.secant_pair`);
* damping: Powell on s with H_g (mu1, step 1 of the double damping), then "LM damping on
  H^{-1}", y~ = y + sqrt(lambda) s~ (docs/kbfgs.md section 4.4, last paragraph; :func:`powell_lm_damping`),
  instead of the B = I Powell step. This is the damping the KF-QN-CNN paper prescribes for conv
  layers: (s~, y~) is the secant pair of B_g + sqrt(lambda) I for the curvature B_g = inv(H_g) seen
  by (s~, y), i.e. the same Tikhonov term sqrt(lambda) I that A gets, and it gives
  s~^T y~ >= sqrt(lambda) s~^T s~ since s~^T y >= 0 after Powell. It is applied every iteration and
  counted in ``lm_damping``. Dense layers keep the NeurIPS-2020 double damping exactly.

Info per step: ``loss`` (regularised minibatch loss at theta_k), ``trial_loss`` (unregularised loss
of the same batch at theta_{k+1}, from the second pass), ``grad_norm``, ``step_norm``
(||theta_{k+1} - theta_k||), and counts over the layers of ``powell_damping`` and ``lm_damping``
firings and of ``skipped_H_g`` / ``skipped_H_a`` updates (for K-BFGS(L): pairs not stored).

Host synchronisation: none in a step of either solver (DESIGN.md convention 5). The skip and
damping decisions are device-side ``where``; K-BFGS(L)'s "store this pair?" decision and the
memory's fill count stay on the device too (:meth:`solvers.lbfgs.CompactLBFGS.push`), and the
info counts are 0-d device arrays that the caller converts once per step.
"""

from __future__ import annotations

import math

import numpy

from engine.backend import array_module
from engine.curvature.kronecker import (KroneckerBlockOperator, KronFactors, ema_, ema_homogeneous_second_moment_, flush_subnormals_,
                                        column_mean, homogeneous_mean, kron_factors, secant_means)
from engine.fuse import device_arange, fused

from .base import Hyper, positive, register, unit_interval
from .bfgs import SKIP_CONSTANT, bfgs_inverse_update, matvec, symmetrize
from .damping import double_damping, lm_coefficients, powell_coefficients, powell_damping
from .hessian_action import HESSIAN_ACTION_VARIANTS, hessian_action_update, hessian_action_vector
from .kronecker_solver import FLUSH_EVERY, KroneckerSolver, layer_key
from .lbfgs import CompactLBFGS, advance_formula

__all__ = ["KBFGS", "KBFGSL", "powell_lm_damping"]

def powell_lm_damping(s, y, H, mu1: float = 0.2, *, mu2: float):
    """KF-QN-CNN damping of a conv layer's pair (arXiv:2102.06737; docs/kbfgs.md section 4.4, last paragraph).

    Powell damping in inverse form on s with ``H`` (a matrix or a callable ``v -> H v``), as step 1
    of :func:`solvers.damping.double_damping`, then "LM damping on H^{-1}": y~ = y + mu2 s~, so
    s~^T y~ = s~^T y + mu2 s~^T s~ >= mu2 s~^T s~ (s~^T y >= mu1 y^T H y >= 0 after step 1).
    The inputs are not modified. Returns ``(s~, y~, powell_fired, lm_fired)``; the LM shift is
    applied every time, so ``lm_fired`` is always true.
    """
    xp = array_module(s, y)
    Hy = H(y) if callable(H) else matvec(H, y)
    s_damped, powell_fired = powell_damping(s, y, Hy, mu1)
    y_damped = y + mu2 * s_damped
    return s_damped, y_damped, powell_fired, xp.ones((), dtype=bool)  # a device constant, no host copy


#: the per-step counts over the layers, in the order they are stacked and summed (one reduction)
_COUNTS = ("powell_damping", "lm_damping", "skipped_H_g", "skipped_H_a")


def _counted(flags, xp) -> dict:
    """The per-step counts of the layers' 0-d flags, stacked and summed in one reduction (zeros for
    a rank that updated no layer under KAISA)."""
    stacked = [flag for name in _COUNTS for flag in flags[name]]
    if not stacked:
        return {name: xp.zeros((), dtype=xp.int64) for name in _COUNTS}
    counts = xp.stack(stacked).reshape(len(_COUNTS), -1).sum(axis=1)
    return {name: counts[j] for j, name in enumerate(_COUNTS)}


@fused
def _pair_ema_(xp, s_ema, y_ema, s, y, y_scale, decay, weight, threshold):
    """(s, y) EMAs in place (y scaled by ``y_scale``; weight = 1 - decay), then the subnormal flush."""
    s_ema *= decay
    s_ema += weight * s
    s_ema[...] = xp.where(xp.absolute(s_ema) < threshold, 0, s_ema)
    y_ema *= decay
    y_ema += weight * (y * y_scale)
    y_ema[...] = xp.where(xp.absolute(y_ema) < threshold, 0, y_ema)


@fused
def _lbfgs_products(xp, sel, s, y, Lu, g, gamma):
    """(s^T s, s^T y, y^T H y, s^T H y, ||H y||^2, g^T g, y^T y) with H y = L (Rm y) + gamma y, one reduction."""
    Hy = Lu + gamma * y  # as CompactLBFGS.apply adds it
    prod = xp.where(sel == 0, s * s, xp.where(sel == 1, s * y, xp.where(sel == 2, y * Hy, xp.where(
        sel == 3, s * Hy, xp.where(sel == 4, Hy * Hy, xp.where(sel == 5, g * g, y * y))))))
    return xp.sum(prod, axis=1)


def _powell_stage(xp, ss, sy, yHy, sHy, HyHy, mu1, one_minus_mu1):
    """Powell's (fired, theta1) and, of s~ = theta1 s + (1 - theta1) H y, s~^T s~ and s~^T y from the
    inner products of s, y and H y (a formula)."""
    fired, th = powell_coefficients(xp, sy, yHy, mu1, one_minus_mu1)
    ph = 1 - th
    ss2 = xp.where(fired, th * th * ss + 2 * (th * ph) * sHy + ph * ph * HyHy, ss)
    return fired, th, ss2, xp.where(fired, th * sy + ph * yHy, sy)


def _lbfgs_pair_kernels(spatial: bool):
    """(vectors, scalars): K-BFGS(L)'s damped pair (Powell, then B = I for Dense or LM on H^{-1} for
    Conv2d, as :func:`solvers.damping.double_damping` / :func:`powell_lm_damping`) and its scalars."""

    @fused
    def damped_pair(xp, s, y, Lu, sy, yHy, ss, sHy, HyHy, gamma, mu1, one_minus_mu1, mu2, one_minus_mu2):
        fired, th, ss2, sy2 = _powell_stage(xp, ss, sy, yHy, sHy, HyHy, mu1, one_minus_mu1)
        s_d = xp.where(fired, th * s + (1 - th) * (Lu + gamma * y), s)
        if spatial:
            return s_d, y + mu2 * s_d
        lm, convex, th2, shift = lm_coefficients(xp, ss2, sy2, mu2, one_minus_mu2)
        return s_d, xp.where(convex, th2 * y + (1 - th2) * s_d, xp.where(lm, y + shift * s_d, y))

    @fused
    def pair_scalars(xp, ss, sy, yHy, sHy, HyHy, gg, yy, mu1, one_minus_mu1, mu2, one_minus_mu2, c, count, head, p):
        fired, _, ss2, sy2 = _powell_stage(xp, ss, sy, yHy, sHy, HyHy, mu1, one_minus_mu1)
        if spatial:  # y~ = y + mu2 s~
            lm = ss2 == ss2
            sy_d, yy_d = sy2 + mu2 * ss2, yy + 2 * (mu2 * sy2) + mu2 * (mu2 * ss2)
        else:  # y~ = a y + b s~
            lm, convex, th2, shift = lm_coefficients(xp, ss2, sy2, mu2, one_minus_mu2)
            a = xp.where(convex, th2, 1)
            b = xp.where(convex, 1 - th2, xp.where(lm, shift, 0))
            sy_d, yy_d = a * sy2 + b * ss2, a * a * yy + 2 * (a * b) * sy2 + b * b * ss2
        store = (sy_d > c * ss2 * xp.sqrt(gg)) & xp.isfinite(ss2) & xp.isfinite(sy_d) & (sy_d > 0)
        w = advance_formula(xp, count, head, store, p)
        return fired, lm | spatial, store, ~store, sy_d, yy_d, w

    return damped_pair, pair_scalars


_DENSE_PAIR, _SPATIAL_PAIR = _lbfgs_pair_kernels(False), _lbfgs_pair_kernels(True)


def _kbfgs_hyperparameters() -> dict[str, Hyper]:
    return {
        "lr": positive("learning rate alpha", 0.3),
        "damping": positive("damping lambda: sqrt(lambda) is added to A and is mu2 of the double damping", 0.3),
        "momentum": unit_interval("gradient momentum rho (EMA form m = rho m + (1 - rho) g, no bias correction)", 0.9),
        "A_decay": unit_interval("EMA decay of the input second moment A", 0.9),
        "sy_decay": unit_interval("EMA decay of the pre-activation pair (s, y); 0 for full batch", 0.9),
        "mu1": Hyper(0.2, "Powell damping constant mu1 of the double damping", lambda v: 0 < v < 1, "in (0, 1)"),
        "hessian_action": Hyper("V2", "Hessian-action vector: V2 (a_bar ends with 1, reference HEAD) or V1 (ends with the mean)",
                                lambda v: v in HESSIAN_ACTION_VARIANTS, "V2 or V1"),
        "skip_constant": positive("c of the BFGS skip rule s^T y <= c s^T s ||g_ref||", SKIP_CONSTANT),
        "flush_subnormals": Hyper(True, "flush subnormal entries of the EMA'd factors and of the momentum to zero (docs/kbfgs.md pitfall 19)"),
    }


class _KroneckerQuasiNewton(KroneckerSolver):
    """The shared K-BFGS iteration; subclasses choose the pre-activation-side inverse H_g."""

    block_order = "right_first"  # H_g (M^ H_a), as the reference code multiplies
    #: ``--cuda-graph`` (engine.cuda_graph): the steps past k = 0 update the state in place, with one
    #: control flow where ``k % graph_period == 0`` (the flushes) and one elsewhere
    graph_period = FLUSH_EVERY

    # --- G side (overridden) -----------------------------------------------------------------
    def init_g_side(self, d_out, xp, dtype) -> dict:
        raise NotImplementedError

    def g_factor(self, state, i):
        """H_g of layer ``i`` as the block operator's left inverse factor (a matrix or an operator)."""
        raise NotImplementedError

    def _g_update(self, state, i, s, y, g_ref, flags):
        raise NotImplementedError

    def _symmetrize_g_side(self, state, i):
        """Re-symmetrise a dense H_g (a no-op when it is exactly symmetric already)."""

    def _damp(self, i, s, y, H):
        """(s~, y~, powell fired, lm fired): double damping for Dense, Powell + LM on H^{-1} for Conv2d."""
        if i in self.spatial:
            return powell_lm_damping(s, y, H, self.mu1, mu2=self.sqrt_damping)
        return double_damping(s, y, H, self.mu1, mu2=self.sqrt_damping)

    # --- KroneckerSolver hooks ----------------------------------------------------------------
    def init_layer(self, layer, xp, dtype) -> dict:
        d_a, d_out = layer.d_in + 1, layer.d_out
        return {"A": xp.zeros((d_a, d_a), dtype=dtype), "H_a": xp.zeros((d_a, d_a), dtype=dtype),  # H_a set at k = 0
                "s_ema": xp.zeros(d_out, dtype=dtype), "y_ema": xp.zeros(d_out, dtype=dtype),
                **self.init_g_side(d_out, xp, dtype)}

    def batch_statistics(self, params, x) -> list[dict]:
        """A of one batch from a forward pass only (the rows: inputs for Dense, patches for Conv2d),
        which stops at the last Kronecker layer's input and keeps no caches."""
        caps = self.model.input_captures(params, x)
        return [{"A": f.A} for f in kron_factors(caps, which="A")]

    def step_factors(self, state, i) -> tuple:
        return self.g_factor(state, i), state[layer_key(i, "H_a")]

    def step_keys(self, state, i) -> list:
        g_side = layer_key(i, "lbfgs/")
        return [layer_key(i, "H_a")] + [k for k in state if k == layer_key(i, "H_g") or k.startswith(g_side)]

    # --- the iteration (docs/kbfgs.md section 4.3) -------------------------------------------------
    def step(self, params, state, x, y):
        model = self.model
        xp = array_module(*params)
        k = int(state["k"])
        n = x.shape[0]
        flags = {name: [] for name in _COUNTS}  # 0-d device flags, counted together at the end

        # (a) gradient at theta_k (with tau theta), momentum, Kronecker rows of this batch (unscaled:
        # only their means are used, docs/kbfgs.md section 4.3)
        loss, grads, captures = model.loss_and_grad(params, x, y, regularized=True, capture=True, per_example=False)
        m_views, grad_sq = self.momentum_(state, grads)
        parallel = model.parallel
        # data parallel: A every step (the EMA needs the global batch's A, not this shard's rows)
        with_a = (k == 0 and not state["warm_started"]) or parallel.active
        factors = [self._batch_means(c, n, with_A=with_a) for c in captures]
        parallel.mean_fields(factors, ("A", "a_mean", "g_mean"))  # the global batch's (data parallel)
        old = {c.layer: c for c in captures}

        # (b) step 1: A <- EMA, H_a <- inv(A + sqrt(lambda) I) at k = 0; theta <- theta - alpha H_g M^ H_a
        self._update_a_side(state, factors, captures, k)
        step_norm = self.apply_step_(params, m_views, self.step_operator(state))

        # (c) the same batch at theta_{k+1} = theta_k + alpha p: unregularised loss, and the secant
        # pair from the rows z+ and g+ against this batch's first rows (no weight-gradient products;
        # the sweep stops at the first Kronecker layer)
        fwd = model.forward_pass(params, x, kron_outputs=True)
        trial_loss, dout = model.loss_fn.value_and_grad(fwd.out, y)
        pairs = {}
        model.backward(params, fwd, dout, param_grads=False, per_example=False,
                       capture=lambda c: pairs.__setitem__(c.layer, secant_means(old[c.layer], c, n)))
        trial_loss, pairs = parallel.mean_tree((trial_loss, pairs))

        # (d) step 2: G side (EMA, damping, BFGS) and A side (Hessian action); under KAISA by each
        # layer's owner, who shares the result (solvers/kaisa.py)
        plan = self.factor_plan()
        for f in factors:
            if plan is None or plan.owns(f.layer):
                self._update_pairs(state, f, pairs[f.layer], old[f.layer].z.shape[0], n, flags)
        if plan is not None:
            plan.share_factors(state, lambda i: self.step_keys(state, i))

        state["k"] = k + 1
        info = _counted(flags, xp)
        if plan is not None:  # KAISA: each rank counted its own layers
            plan.sum_counts(info, _COUNTS, xp)
        info.update(loss=loss, trial_loss=trial_loss, grad_norm=xp.sqrt(grad_sq), step_norm=step_norm)
        return params, state, info

    @staticmethod
    def _batch_means(capture, n: int, with_A: bool) -> KronFactors:
        """The statistics step (a) needs from a capture with unscaled rows: a_mean = [mean a, 1] and
        g_mean = mean_rows(g) (and A when there is no warm start), one fused reduction each."""
        f = kron_factors([capture], which="A")[0] if with_A else KronFactors(capture.layer, capture.param_index)
        f.a_mean = homogeneous_mean(capture.a)
        f.g_mean = column_mean(capture.g, n / capture.g.shape[0])
        return f

    def _update_a_side(self, state, factors, captures, k: int):
        """Step (b) on the factors: A's EMA (not at k = 0; the first batch's A without a warm start),
        H_a = inv(A + sqrt(lambda) I) at k = 0, and the periodic flush and re-symmetrisation."""
        rows = {c.layer: c for c in captures}
        for f in factors:
            i = f.layer
            A = state[layer_key(i, "A")]
            if k > 0:
                if self.model.parallel.active:
                    ema_(A, f.A, self.A_decay)  # the global batch's A, reduced over the ranks
                else:
                    ema_homogeneous_second_moment_(A, rows[i].a, self.A_decay, f.a_mean)
                if self.flush_subnormals and k % FLUSH_EVERY == 0:
                    flush_subnormals_(A)
            elif not state["warm_started"]:
                A[...] = f.A  # no warm start: the first batch's statistics stand in for it
            if k == 0:
                xp = array_module(A)
                A_lm = A + self.sqrt_damping * xp.eye(A.shape[0], dtype=A.dtype)
                state[layer_key(i, "H_a")] = symmetrize(xp.linalg.inv(A_lm))
            elif k % FLUSH_EVERY == 0:  # docs/kbfgs.md pitfall 16: guard against any BLAS-order asymmetry
                H_a = state[layer_key(i, "H_a")]
                H_a[...] = symmetrize(H_a)  # in place: a captured step (engine.cuda_graph) keeps its addresses
                self._symmetrize_g_side(state, i)

    def _update_pairs(self, state, f, pair, rows: int, n: int, flags):
        """Step (d) for one layer: the EMA'd secant pair, the G-side update, the Hessian action on H_a.

        The pair (docs/kbfgs.md section 4.3 (d)): s = mean_rows(z) - mean_rows(z+), y = mean_rows(g) -
        mean_rows(g+) (:func:`engine.curvature.kronecker.secant_means`), y scaled by sqrt(L) for a spatial
        layer (as :func:`engine.curvature.kronecker.secant_pair`), EMA'd and flushed in one fused pass;
        g_ref = mean_rows(g) (times sqrt(L)) for the skip rule.
        """
        i = f.layer
        layer = self.model.layers[i]
        root_l = math.sqrt(layer.locations(rows, n)) if layer.spatial else 1.0
        s_ema, y_ema = state[layer_key(i, "s_ema")], state[layer_key(i, "y_ema")]
        tiny = float(numpy.finfo(s_ema.dtype).tiny) if self.flush_subnormals else 0.0
        _pair_ema_(s_ema, y_ema, pair[0], pair[1], root_l, self.sy_decay, 1 - self.sy_decay, tiny)
        g_ref = root_l * f.g_mean if layer.spatial else f.g_mean
        self._g_update(state, i, s_ema, y_ema, g_ref, flags)
        a_bar = f.a_mean if self.hessian_action == "V2" else hessian_action_vector(f.a_mean[:-1], self.hessian_action)
        key = layer_key(i, "H_a")
        state[key], skipped = hessian_action_update(state[key], state[layer_key(i, "A")], self.sqrt_damping, a_bar,
                                                    self.skip_constant, inplace=True)
        flags["skipped_H_a"].append(skipped)

    @staticmethod
    def _count(flags, powell, lm, skipped):
        flags["powell_damping"].append(powell)
        flags["lm_damping"].append(lm)
        flags["skipped_H_g"].append(skipped)

    # --- inspection -------------------------------------------------------------------------
    def g_side_inverse(self, state, i):
        """The d_out x d_out matrix H_g of Kronecker layer ``i`` (dense; the L-BFGS operator densified)."""
        raise NotImplementedError

    def curvature_operator(self, state) -> KroneckerBlockOperator:
        """The block curvature inv(H_g) (x) inv(H_a) as a :class:`KroneckerBlockOperator`: the step's own.

        ``solve`` applies the blocks H_g M H_a the solver preconditions with (on the flat vector);
        ``matvec`` the curvature itself. Parameters outside Kronecker layers pass through unchanged.
        """
        return self.step_operator(state)


@register
class KBFGS(_KroneckerQuasiNewton):
    name = "kbfgs"
    summary = "K-BFGS: Kronecker-factored BFGS with double damping (Goldfarb, Ren, Bahamou 2020)"
    hyperparameters = _kbfgs_hyperparameters()

    def init_g_side(self, d_out, xp, dtype) -> dict:
        return {"H_g": xp.eye(d_out, dtype=dtype)}

    def g_factor(self, state, i):
        return state[layer_key(i, "H_g")]

    def _symmetrize_g_side(self, state, i):
        H_g = state[layer_key(i, "H_g")]
        H_g[...] = symmetrize(H_g)

    def _g_update(self, state, i, s, y, g_ref, flags):
        key = layer_key(i, "H_g")
        s_d, y_d, powell, lm = self._damp(i, s, y, state[key])
        state[key], skipped = bfgs_inverse_update(state[key], s_d, y_d, g_ref, self.skip_constant, inplace=True)
        self._count(flags, powell, lm, skipped)

    def g_side_inverse(self, state, i):
        return state[layer_key(i, "H_g")]


@register
class KBFGSL(_KroneckerQuasiNewton):
    name = "kbfgs_l"
    summary = "K-BFGS(L): K-BFGS with a limited-memory (compact L-BFGS) pre-activation factor"
    hyperparameters = {
        **_kbfgs_hyperparameters(),
        "memory": positive("number of (s, y) pairs p kept per layer", 100, type=int),
        "lbfgs_gamma": positive("initial matrix gamma I of the L-BFGS operator (the reference fixes gamma = 1)", 1.0),
    }

    def _lbfgs(self, state, i) -> CompactLBFGS:
        return CompactLBFGS.from_state(state, layer_key(i, "lbfgs/"), self.lbfgs_gamma)

    def init_g_side(self, d_out, xp, dtype) -> dict:
        return CompactLBFGS.empty(d_out, self.memory, dtype, xp, self.lbfgs_gamma).to_state("lbfgs/")

    def g_factor(self, state, i):
        return self._lbfgs(state, i)

    def _g_update(self, state, i, s, y, g_ref, flags):
        """The damping of :meth:`_damp` and the section 5 store rule (y~^T s~ > c s~^T s~ ||mean g||,
        s~^T s~ finite) in three kernels: one reduction of s, y, H y = gamma y + L (Rm y) and g_ref
        (H y never formed), the damped pair, and the scalars (flags, s~^T y~ and y~^T y~ from the
        reduction, the memory's count and head advanced); then the in-place push."""
        op = self._lbfgs(state, i)
        xp = array_module(s, y)
        Lu = matvec(op.L, matvec(op.Rm, y))
        dots = _lbfgs_products(device_arange(xp, 7)[:, None], s[None, :], y[None, :], Lu[None, :], g_ref[None, :], op.gamma)
        ss, sy, yHy, sHy, HyHy, gg, yy = (dots[j] for j in range(7))
        spatial = i in self.spatial
        vectors, scalars = _SPATIAL_PAIR if spatial else _DENSE_PAIR
        mu = (self.mu1, 1 - self.mu1, self.sqrt_damping, 1 - self.sqrt_damping)
        s_d, y_d = vectors(s, y, Lu, sy, yHy, ss, sHy, HyHy, op.gamma, *mu)
        powell, lm, store, skipped, delta, yy_d, w = scalars(ss, sy, yHy, sHy, HyHy, gg, yy, *mu, self.skip_constant,
                                                             op.count, op.head, op.memory)
        op.push(s_d, y_d, store, delta=delta, yy=yy_d, slot=w)
        state.update(op.to_state(layer_key(i, "lbfgs/")))
        self._count(flags, powell, lm, skipped)

    def g_side_inverse(self, state, i):
        return self._lbfgs(state, i).dense()
