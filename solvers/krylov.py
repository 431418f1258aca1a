"""Truncated conjugate gradient on a curvature operator, shared by the Newton-Krylov solvers.

Solves the damped Newton system

    (H + lambda I) p = b,        b = -g,

by (preconditioned) conjugate gradient and stops early as soon as a direction appears that the
quadratic model cannot use (docs/complex-step.md sections 6.2-6.3; Nocedal & Wright 2006, Alg. 7.1;
Martens 2010, section 4):

* **"negative_curvature"** - a search direction d with d^T (H + lambda I) d <= threshold ||d||^2
  (the "disturbing" direction of Shen et al. 2020, read as non-positive curvature; the threshold
  is 0 by default). At the first iteration the steepest-descent step of SciPy's Newton-CG is
  returned, p = (r^T z / |d^T A d|) d with d = M^{-1} b, i.e. (g^T g / |curv|) (-g) without a
  preconditioner; later the current iterate, which is a descent direction (g^T p < 0 because
  phi(p) < phi(0) = 0 along the positive-curvature directions taken so far).
* **"converged"** - the residual rule ||r|| <= eta ||g|| with the forcing term
  eta = min(rtol, sqrt(||g||)) (Eisenstat-Walker / Nocedal-Wright eq. 7.3, the choice SciPy's
  Newton-CG makes in the 1-norm; ``adaptive_rtol=False`` uses eta = rtol). Also when r^T M^{-1} r
  vanishes in the working precision: a heavily damped float32 system (Hessian-free starts at
  lambda = 45) shrinks the residual by orders of magnitude per iteration, r^T z underflows to 0
  within ten iterations, before the progress rule may act, and the next beta would be 0/0.
* **"model_stalled"** (optional, ``model_decrease_check=True``) - Martens' relative-progress rule
  (Martens 2010, section 4.4): stop at iteration i when i > k, phi(x_i) < 0 and
  (phi(x_i) - phi(x_{i-k})) / phi(x_i) < k eps, with k = max(k_min, ceil(k_frac i)), k_min = 10,
  k_frac = 0.1, eps = 5e-4. phi(x) = 1/2 x^T (H + lambda I) x - b^T x is the quadratic model.
* **"max_iter"** - the iteration cap.
* **"boundary"** (Steihaug-Toint, ``radius`` = Delta > 0) - the next iterate would leave the trust
  region ||x|| <= Delta: x + tau d with tau >= 0 and ||x + tau d|| = Delta is returned
  (Steihaug 1983; Toint 1981; Nocedal & Wright 2006, Alg. 7.2). With a radius, a
  negative-curvature exit also follows d to the boundary (at every iteration, the first
  included: there d = M^{-1} b and the step is the Cauchy-like point Delta d/||d||), and
  ``negative_curvature`` is not consulted. The norm is the Euclidean one; with a preconditioner
  the iterates' norms need not grow monotonically (they do in the M-norm), and the first crossing
  ends the solve.

Quantities along the step come from the recurrences, without extra operator products: the
solver keeps H x (undamped) next to x, so at exit g^T p = -b^T x, p^T H p = x^T (H x) and
p^T (H + lambda I) p = x^T (H x) + lambda x^T x are exact for the returned x (up to rounding),
even after a warm start.

Host synchronisation. Everything is computed on the operator's array module (NumPy or CuPy);
each iteration moves exactly one small vector of scalars to the host (curvature, ||d||^2,
||r||^2, phi, r^T M^{-1} r) to take the exit decisions, so a CuPy run pays one device-to-host sync per
matrix-vector product, plus two before the loop (||b|| and ||r_0||, three with the progress
rule) and one at exit; with a radius the same transfer also carries x^T x, x^T d and the next
||x||^2 (plus one before the loop after a warm start). The update of iteration i is computed before the sync and dropped if the
curvature test fails, which is what lets the decisions share one transfer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

from engine.backend import array_module, to_host
from engine.curvature import GaussNewton, HessianCS, HessianFD, HessianRop

__all__ = ["CGResult", "CGIterate", "truncated_cg", "EXIT_REASONS", "exit_code", "martens_schedule", "boundary_step"]

#: Exit reasons in the order of their integer codes (run histories store the code).
EXIT_REASONS = ("converged", "negative_curvature", "max_iter", "model_stalled", "boundary")


def exit_code(reason: str) -> int:
    """The integer code of an exit reason (its index in :data:`EXIT_REASONS`)."""
    try:
        return EXIT_REASONS.index(reason)
    except ValueError:
        raise ValueError(f"unknown CG exit reason {reason!r}; known: {', '.join(EXIT_REASONS)}") from None


@dataclass
class CGIterate:
    """A stored CG iterate (for Hessian-free CG backtracking, Martens 2010 section 4.6).

    ``iteration`` is the number of CG updates it took; ``gTp`` = -b^T x, ``curvature`` =
    x^T H x (undamped) and ``model_value`` = phi(x) are 0-d device arrays (no host sync).
    """

    iteration: int
    x: object
    gTp: object
    curvature: object
    model_value: object


@dataclass
class CGResult:
    """What :func:`truncated_cg` returns.

    ``x``: the step p. ``model_value``: phi(p) = 1/2 p^T (H + lambda I) p + g^T p.
    ``pHp``: p^T (H + lambda I) p (damped); ``curvature``: p^T H p (undamped); ``gTp``: g^T p;
    ``step_sq_norm``: p^T p (all host floats). ``iterations``: CG updates applied to x (the
    direction that triggered a negative-curvature or boundary exit is not counted); ``n_matvec``: operator
    products spent, including the one for a warm start and the one that found negative
    curvature. ``residual_norm``: ||r|| of the recurrence at exit. ``iterates``: stored
    :class:`CGIterate` records (with ``keep_iterates``), the returned x always last.
    """

    x: object
    model_value: float
    pHp: float
    curvature: float
    gTp: float
    step_sq_norm: float
    iterations: int
    exit_reason: str
    n_matvec: int
    residual_norm: float
    iterates: list = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return exit_code(self.exit_reason)


def martens_schedule(start: float = 5.0, ratio: float = 1.3):
    """Yield the CG iterations at which Martens' HF stores iterates: ceil(5), ceil(6.5), ... .

    ``conjgrad_1`` in Martens' HF code: ``inext = 5; imult = 1.3`` and x is saved whenever
    ``i == ceil(inext)``, then ``inext = inext * imult`` (iterations 5, 7, 9, 11, 15, 19, ...).
    """
    nxt = float(start)
    while True:
        yield math.ceil(nxt)
        nxt *= ratio


def _residual_target(b, max_iter: int, damping: float, rtol: float, adaptive_rtol: bool, exponent: float = 0.5):
    """Check the system; (||b||, (eta ||b||)^2) with the forcing term eta (one host sync).

    eta = min(rtol, ||b||^exponent) (Nocedal & Wright 2006, eq. 7.3; exponent 1/2 is the choice
    of Alg. 7.1, superlinear; 1 is quadratic) or eta = rtol; ||b|| sets the residual target for
    the whole solve.
    """
    xp = array_module(b)
    if b.ndim != 1:
        raise ValueError(f"truncated_cg needs a 1-d right-hand side, got shape {tuple(b.shape)}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    if damping < 0 or not math.isfinite(damping):
        raise ValueError(f"damping must be finite and >= 0, got {damping}")
    b_norm = float(to_host(xp.sqrt(b @ b)))
    if not math.isfinite(b_norm):
        raise ValueError("the right-hand side (the gradient) contains NaN or Inf; check the loss and the step size")
    eta = min(rtol, b_norm ** exponent) if adaptive_rtol else rtol
    return b_norm, (eta * b_norm) ** 2


@dataclass
class _Trial:
    """CG iteration i along d, computed before the exit decisions and committed only if the
    curvature test passes (module docstring): device arrays, then the host floats of its one sync."""

    Hd: object
    Ad: object
    x: object
    Hx: object
    r: object
    z: object
    rz: object
    curv_h: float
    dd_h: float
    rr_h: float
    phi_h: float
    rz_h: float
    xx_h: float = 0.0
    xd_h: float = 0.0
    xnew_h: float = 0.0


def boundary_step(xx: float, xd: float, dd: float, radius: float) -> float:
    """tau >= 0 with ||x + tau d|| = radius, from x^T x, x^T d, d^T d (host floats; ||x|| <= radius).

    The positive root of dd tau^2 + 2 xd tau + (xx - radius^2) = 0, in the form that avoids
    cancellation; 0 when x is on (or, by rounding, outside) the boundary or d = 0.
    """
    gap = radius * radius - xx
    if gap <= 0.0 or dd <= 0.0:
        return 0.0
    root = math.sqrt(xd * xd + dd * gap)
    return gap / (xd + root) if xd > 0 else (root - xd) / dd


class _Recurrence:
    """The CG recurrences on A = H + damping I: the iterate x, H x (undamped, carried next to x
    so that g^T p and p^T H p need no extra product) and the residual r = b - A x."""

    def __init__(self, matvec: Callable, b, x0, damping: float, radius: float = 0.0):
        xp = array_module(b)
        self.matvec, self.b, self.damping, self.xp, self.radius = matvec, b, damping, xp, radius
        self.n_matvec = 0
        if x0 is None:
            self.x = xp.zeros_like(b)
            self.Hx = xp.zeros_like(b)
            self.r = b.copy()
            return
        if x0.shape != b.shape:
            raise ValueError(f"warm start x0 has shape {tuple(x0.shape)}, the system has {tuple(b.shape)}")
        self.x = xp.asarray(x0, dtype=b.dtype).copy()
        self.Hx = self.product(self.x)
        if radius > 0:  # a warm start outside the trust region is scaled back onto its boundary
            norm = math.sqrt(float(to_host(self.x @ self.x)))
            if norm > radius:
                self.x *= radius / norm
                self.Hx *= radius / norm
        self.r = b - self.Hx
        if damping:
            self.r -= damping * self.x

    def product(self, v):
        """H v (undamped), counted."""
        self.n_matvec += 1
        return self.matvec(v)

    def phi(self, x, r):
        """phi(x) = 1/2 x^T A x - b^T x; with A x = b - r this is -1/2 (b + r)^T x (no product)."""
        return -0.5 * ((self.b + r) @ x)

    def trial(self, d, rz, preconditioner: Callable | None, model_check: bool) -> _Trial:
        """The update along d with alpha = r^T z / d^T A d, and one transfer of (curv, ||d||^2,
        ||r||^2, phi, r^T M^{-1} r) for all of the iteration's exit decisions."""
        xp, damping = self.xp, self.damping
        Hd = self.product(d)
        Ad = Hd + damping * d if damping else Hd
        curv = d @ Ad
        dd = d @ d
        alpha = rz / xp.where(curv > 0, curv, 1)
        x = self.x + alpha * d
        Hx = self.Hx + alpha * Hd
        r = self.r - alpha * Ad
        z = preconditioner(r) if preconditioner is not None else r
        rz_new = r @ z
        rr = r @ r if preconditioner is not None else rz_new
        phi = self.phi(x, r) if model_check else rr
        scalars = [curv, dd, rr, phi, rz_new]
        if self.radius > 0:  # for the trust-region tests (Steihaug-Toint)
            scalars += [self.x @ self.x, self.x @ d, x @ x]
        host = (float(s) for s in to_host(xp.stack(scalars)))
        return _Trial(Hd, Ad, x, Hx, r, z, rz_new, *host)

    def commit(self, t: _Trial):
        self.x, self.Hx, self.r = t.x, t.Hx, t.r

    def steepest_descent(self, t: _Trial, d, rz):
        """SciPy Newton-CG's fallback at the first iteration: x + (r^T z / |curv|) d. A direction of
        exactly zero curvature gets no scale from it; it keeps the unit step."""
        scale = rz / abs(t.curv_h) if t.curv_h != 0 else 1.0
        self.move(t, d, scale)

    def curvature_step(self, t: _Trial, d, rz):
        """The step along the disturbing direction d: x + (r^T z / d^T (|H| + lambda I) d) d, the
        minimiser of the model along d with the curvature's sign reversed (saddle-free Newton,
        Dauphin et al. 2014) and the damping kept; |d^T H d| + lambda ||d||^2 >= 2 lambda ||d||^2 at
        a negative-curvature exit. Without damping and at exactly zero curvature: the unit step."""
        curv = abs(t.curv_h - self.damping * t.dd_h) + self.damping * t.dd_h
        self.move(t, d, rz / curv if curv > 0 else 1.0)

    def to_boundary(self, t: _Trial, d):
        """x <- x + tau d on the trust-region boundary (:func:`boundary_step`), tau >= 0."""
        self.move(t, d, boundary_step(t.xx_h, t.xd_h, t.dd_h, self.radius))

    def move(self, t: _Trial, d, scale):
        """x <- x + scale d with H x and r kept exact from the trial's products."""
        self.x = self.x + scale * d
        self.Hx = self.Hx + scale * t.Hd
        self.r = self.r - scale * t.Ad

    def result(self, reason: str, iterations: int, store: _IterateStore | None) -> CGResult:
        """The :class:`CGResult` of the current x (one host sync)."""
        b, x = self.b, self.x
        bx = b @ x
        xHx = x @ self.Hx
        xx = x @ x
        rr = self.r @ self.r
        bx_h, xHx_h, xx_h, rr_h = (float(s) for s in to_host(self.xp.stack([bx, xHx, xx, rr])))
        pHp = xHx_h + self.damping * xx_h
        iterates = store.close(iterations, self, bx, xHx) if store is not None else []
        return CGResult(x=x, model_value=0.5 * pHp - bx_h, pHp=pHp, curvature=xHx_h, gTp=-bx_h,
                        step_sq_norm=xx_h, iterations=iterations, exit_reason=reason, n_matvec=self.n_matvec,
                        residual_norm=math.sqrt(max(rr_h, 0.0)), iterates=iterates)


class _IterateStore:
    """Copies of x at Martens' schedule (:func:`martens_schedule`) and at exit, as 0-d device
    scalars (no host sync), for Hessian-free's CG backtracking (Martens 2010 section 4.6)."""

    def __init__(self, start: float, ratio: float):
        self.iterates: list = []
        self._schedule = martens_schedule(start, ratio)
        self._next = next(self._schedule)

    def offer(self, done: int, run: _Recurrence):
        """Store x after ``done`` updates if the schedule asks for it."""
        if done != self._next:
            return
        x = run.x
        self.iterates.append(CGIterate(done, x.copy(), -(run.b @ x), x @ run.Hx, run.phi(x, run.r)))
        while self._next <= done:
            self._next = next(self._schedule)

    def close(self, iterations: int, run: _Recurrence, bx, xHx) -> list:
        """Store the returned x (b^T x and x^T H x given) unless it is stored already; the list."""
        if not self.iterates or self.iterates[-1].iteration != iterations:
            self.iterates.append(CGIterate(iterations, run.x.copy(), -bx, xHx, run.phi(run.x, run.r)))
        return self.iterates


def _stalled(phis: list, phi: float, done: int, min_iter: int, eps: float, k_min: int, k_frac: float) -> bool:
    """Martens' relative-progress rule (Martens 2010 section 4.4) after ``done`` updates:
    i > k, phi_i < 0 and (phi_i - phi_{i-k}) / phi_i < k eps, k = max(k_min, ceil(k_frac i))."""
    phis.append(phi)
    k = max(k_min, math.ceil(k_frac * done))
    return done >= min_iter and done > k and phi < 0 and (phi - phis[done - k]) / phi < k * eps


def truncated_cg(matvec: Callable, b, x0=None, *, damping: float = 0.0, max_iter: int = 250, min_iter: int = 1,
                 rtol: float = 0.5, adaptive_rtol: bool = True, forcing_exponent: float = 0.5,
                 curvature_threshold: float = 0.0, negative_curvature: str = "stop", radius: float = 0.0,
                 model_decrease_check: bool = False, model_eps: float = 5e-4, model_k_min: int = 10,
                 model_k_frac: float = 0.1, preconditioner: Callable | None = None,
                 keep_iterates: bool = False, iterate_start: float = 5.0, iterate_ratio: float = 1.3) -> CGResult:
    """Truncated (preconditioned) CG for (H + damping I) x = b; see the module docstring.

    ``matvec(v)`` applies H (undamped; damping is added here) to a real vector of b's array
    module. ``b`` is -g. ``x0``: warm start (e.g. beta p_{k-1}); costs one extra product.
    ``rtol``/``adaptive_rtol``: residual rule ||r|| <= eta ||b||, eta = min(rtol, sqrt(||b||))
    (adaptive) or rtol; ``rtol=0`` disables it except for an exactly zero residual.
    ``forcing_exponent``: e of eta = min(rtol, ||b||^e) (adaptive).
    ``curvature_threshold``: exit on d^T (H + damping I) d <= threshold ||d||^2;
    ``negative_curvature``: what that exit returns after the first iteration: "stop" (the current
    iterate) or "step" (the iterate plus the step along d, :meth:`_Recurrence.curvature_step`).
    ``radius``: Delta > 0 makes it Steihaug-Toint CG on ||x|| <= Delta (module docstring, exit
    "boundary"; negative curvature then goes to the boundary); 0 = no trust region.
    ``model_decrease_check``: Martens' progress rule with ``model_eps``, ``model_k_min``,
    ``model_k_frac``. ``min_iter``: no residual/progress exit before this many updates (Martens'
    miniters = 1). ``preconditioner(r)`` applies M^{-1} (symmetric positive definite).
    ``keep_iterates``: store copies of x at Martens' schedule (``iterate_start``,
    ``iterate_ratio``; see :func:`martens_schedule`) and at exit.
    """
    if negative_curvature not in ("stop", "step"):
        raise ValueError(f"negative_curvature must be 'stop' or 'step', got {negative_curvature!r}")
    if not (radius >= 0 and math.isfinite(radius)):
        raise ValueError(f"radius must be finite and >= 0 (0 = no trust region), got {radius}")
    b_norm, r_target_sq = _residual_target(b, max_iter, damping, rtol, adaptive_rtol, forcing_exponent)
    run = _Recurrence(matvec, b, x0, damping, radius)
    store = _IterateStore(iterate_start, iterate_ratio) if keep_iterates else None
    z = preconditioner(run.r) if preconditioner is not None else run.r
    rz = run.r @ z
    d = z.copy() if preconditioner is not None else run.r.copy()
    rr0 = float(to_host(run.r @ run.r))
    if b_norm == 0.0 or (rr0 <= r_target_sq and min_iter <= 0) or rr0 == 0.0:
        return run.result("converged", 0, store)
    phis = [float(to_host(run.phi(run.x, run.r)))] if model_decrease_check else None

    for i in range(max_iter):
        t = run.trial(d, rz, preconditioner, model_decrease_check)
        if not math.isfinite(t.curv_h):
            raise FloatingPointError(f"the curvature product returned NaN/Inf at CG iteration {i}; check the operator and its step size h")
        if t.curv_h <= curvature_threshold * t.dd_h:
            if radius > 0:
                run.to_boundary(t, d)
            elif negative_curvature == "step":
                run.curvature_step(t, d, rz)
            elif i == 0:
                run.steepest_descent(t, d, rz)
            return run.result("negative_curvature", i, store)
        if radius > 0 and t.xnew_h >= radius * radius:
            run.to_boundary(t, d)
            return run.result("boundary", i, store)
        run.commit(t)
        done = i + 1
        if store is not None:
            store.offer(done, run)
        if done >= min_iter and t.rr_h <= r_target_sq:
            return run.result("converged", done, store)
        if not t.rz_h > 0.0:
            # r^T M^{-1} r vanished in the working precision (it underflows in float32 when a heavily
            # damped system converges fast): the residual is at rounding level, and one more step
            # would divide 0 by 0
            return run.result("converged", done, store)
        if phis is not None and _stalled(phis, t.phi_h, done, min_iter, model_eps, model_k_min, model_k_frac):
            return run.result("model_stalled", done, store)
        if done == max_iter:
            break
        beta = t.rz / rz
        d = t.z + beta * d
        rz = t.rz
    return run.result("max_iter", max_iter, store)


# --- pieces shared by the Newton-Krylov solvers ---------------------------------------------

#: Curvature sources a Newton-Krylov solver can run CG on (``curvature=`` option).
CURVATURES = ("cs", "fd-forward", "fd-central", "rop", "gn")

#: Cost of one pass in gradient equivalents (one real forward + backward over the same rows = 1).
#: The weights follow the arithmetic of each pass and were checked on the reference 2-core CPU
#: (NumPy 2.4 / OpenBLAS, CURVES autoencoder, batch 1000, float64; measured in brackets):
#: a forward-only loss is 1/2 (0.42-0.53); a complex-step product is one complex128 gradient,
#: 4 real multiply-adds per complex one (4.06; docs/complex-step.md section 8 measured 3.4 on a wider
#: MLP); forward FD is one extra gradient (1.3-1.5 with the vector work), central FD two
#: (2.0-3.0); the R-operator runs an R-forward and an R-backward next to cached forward/backward
#: data (1.8-1.9), the Gauss-Newton product an R-forward and one backward (1.2-1.8).
PASS_COST = {"loss": 0.5, "gradient": 1.0, "cs": 4.0, "fd-forward": 1.0, "fd-central": 2.0, "rop": 2.0, "gn": 1.5}

#: One-time cost of building each operator (its own forward/backward data), in gradient
#: equivalents: forward FD computes g(w) on the curvature batch, the R-operator a forward and a
#: backward pass, Gauss-Newton a forward pass.
OPERATOR_SETUP_COST = {"cs": 0.0, "fd-forward": 1.0, "fd-central": 0.0, "rop": 1.0, "gn": 0.5}


def curvature_operator(curvature: str, model, params, x, y, h: float = 0.0):
    """The curvature operator named ``curvature`` (:data:`CURVATURES`) of the regularised loss.

    "cs": :class:`engine.curvature.HessianCS`; "fd-forward"/"fd-central":
    :class:`engine.curvature.HessianFD`; "rop": :class:`engine.curvature.HessianRop` (exact);
    "gn": :class:`engine.curvature.GaussNewton`. ``h`` (CS and FD only; 0 = the operator's
    default step) is rejected for the others.
    """
    step = None if not h else float(h)
    if curvature == "cs":
        return HessianCS(model, params, x, y, h=step)
    if curvature in ("fd-forward", "fd-central"):
        return HessianFD(model, params, x, y, scheme=curvature[3:], h=step)
    if step is not None:
        raise ValueError(f"a step h applies to the 'cs' and 'fd-*' curvatures, not {curvature!r}; set h=0")
    if curvature == "rop":
        return HessianRop(model, params, x, y)
    if curvature == "gn":
        return GaussNewton(model, params, x, y)
    raise ValueError(f"unknown curvature {curvature!r}; choose one of {', '.join(CURVATURES)}")


def curvature_rows(n_batch: int, fraction: float, size: int) -> int:
    """Rows of the minibatch used for curvature: ``size`` if > 0, else ceil(fraction n_batch).

    The minibatch is a slice of a random permutation, so its first rows are a uniformly random
    subset; taking them keeps the curvature batch deterministic without an RNG in the state.
    """
    rows = int(size) if size else math.ceil(fraction * n_batch)
    if rows < 1:
        raise ValueError(f"the curvature batch would be empty ({rows} rows of a {n_batch}-row minibatch); raise curvature_fraction")
    return min(rows, n_batch)
