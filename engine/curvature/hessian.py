"""Hessian-vector products three ways: complex step, finite differences, R-operator.

* :class:`HessianCS` - H v = ||v|| Im g(w + i h v^) / h, v^ = v / ||v|| (docs/complex-step.md
  sections 2-3): no subtraction, so h can be tiny and the product is exact to rounding; the real
  part of the same pass is the gradient.
* :class:`HessianFD` - forward (g(w + h v^) - g(w)) / h or central (g(w + h v^) - g(w - h v^)) / 2h
  differences of the gradient (docs/complex-step.md section 7.1): the comparison method.
* :class:`HessianRop` - Pearlmutter (1994), "Fast exact multiplication by the Hessian": the
  R-operator R{.} = d/dr (.)(w + r v)|_{r=0} applied to the forward and backward equations,
  in real arithmetic through the layers' ``jvp`` / ``backward_rop`` and the loss's
  ``hessian_vp``: the independent reference, sharing nothing with the complex step beyond the
  layer definitions.
"""

from __future__ import annotations

import numpy

from ..backend import complex_dtype
from ..products import complex_step
from .base import ModelOperator, split_norm

__all__ = ["HessianCS", "HessianFD", "HessianRop", "DEFAULT_CS_STEP"]

#: Default complex step per real precision (see :class:`HessianCS`).
DEFAULT_CS_STEP = {numpy.dtype(numpy.float64): 1e-30, numpy.dtype(numpy.float32): 1e-12}


class HessianCS(ModelOperator):
    """Hessian-vector products by the complex step of the gradient.

        H v = ||v|| Im[ grad L(w + i h v^) ] / h,   v^ = v / ||v||,
        grad L(w) = Re[ grad L(w + i h v^) ] + O(h^2)

    (docs/complex-step.md sections 2.1-2.2; Squire & Trapp 1998 for the step, applied to the
    gradient). The normalisation makes the step size independent of the scale of v: ||v|| is
    computed with a max-scaling (:func:`engine.curvature.base.split_norm`), so directions with
    components from 1e-200 to 1e+50 neither underflow nor overflow, and the perturbation
    h v^ is built in an explicitly complex array (NEP 50: a float32 + Python complex would be
    silently complex64, docs/complex-step.md 4.4). Nothing is conjugated.

    Default h (``h=None``):

    * float64 models run in complex128 with h = 1e-30 (the authors' group's value,
      docs/complex-step.md section 3): the h^2 truncation is ~1e-60 relative, and the imaginary parts,
      about h |v^_i| (local derivative), stay normal (> 2.2e-308) for components down to ~1e-250.
    * float32 models run in complex64 with h = 1e-12. complex64's exponent range is narrow: the
      smallest normal is 1.2e-38 (and GPUs flush float32 subnormals to zero), so the imaginary
      parts, h |v^_i| times products of small derivatives (1/N loss scaling, saturated units,
      weights ~1e-2), need many orders of headroom; with h = 1e-12 a unit-norm v^ keeps ~26
      orders above the floor. The truncation, (h^2/6) |grad^4 L[v,v,v]| / |Hv| ~ 1e-25 C, is far
      below float32 rounding (6e-8) for any plausible curvature ratio C. The test suite checks
      float32 products against float64 ones for h from 1e-4 to 1e-20 (measured flat, ~1e-7
      relative, from 1e-4 down to 1e-35 on a CPU that keeps subnormals).

    ``matvec_and_grad(v)`` returns (Hv, gradient) from one complex pass (what a Newton-CG
    iteration that needs both pays); ``matvec`` is the same pass.
    """

    def __init__(self, model, params, x, y, h: float | None = None, regularized: bool = True):
        super().__init__(model, params, x, y, regularized)
        self.h = float(DEFAULT_CS_STEP[self.dtype] if h is None else h)
        if not (self.h > 0 and numpy.isfinite(self.h)):
            raise ValueError(f"the complex step h must be a positive finite number, got {h}")
        tiny = float(numpy.finfo(self.dtype).tiny)
        if self.h < tiny:  # h v^ would be subnormal or zero in the parameters' precision
            raise ValueError(f"the complex step h = {self.h:g} underflows in {self.dtype} (smallest normal number "
                             f"{tiny:.3g}), where the imaginary part h v loses its digits; use h between {tiny:.3g} and "
                             f"1e-8 (default {DEFAULT_CS_STEP[self.dtype]:g})")
        self.complex_dtype = complex_dtype(self.dtype)
        self._w = model.flatten(self.params)

    def _complex_pass(self, v):
        """(Hv, gradient) from one complex pass at w + i h v^."""
        xp, model = self.xp, self.model
        vhat, norm = split_norm(v)
        h = self.dtype.type(self.h)
        wc = self._w.astype(self.complex_dtype)  # explicit complex dtype (NEP 50), then the step
        vhat *= h
        wc.imag = vhat
        # Weight decay rides along: grad of 0.5 tau ||w||^2 at w + i h v^ is tau (w + i h v^).
        with complex_step(self.h):  # a pure perturbation of size h: products drop the O(h^2) term
            _, gc = model.loss_and_grad(model.unflatten(wc), self.x, self.y, regularized=self.regularized)
        hv = xp.empty(self.shape[0], dtype=self.dtype)
        g = xp.empty(self.shape[0], dtype=self.dtype)
        for gk, hk, rk in zip(gc, model.unflatten(hv), model.unflatten(g)):
            xp.divide(gk.imag, h, out=hk)  # divide first: ||v|| / h could overflow, Im g / h cannot
            rk[...] = gk.real
        hv *= norm
        return hv, g

    def _matvec(self, v):
        return self._complex_pass(v)[0]

    def matvec_and_grad(self, v):
        """(H v, gradient at w) from one complex pass; the gradient is Re of the same pass."""
        hv, g = self._complex_pass(self._as_vector(v))
        if self._grad is None:
            self._grad = g
        return hv, g


class HessianFD(ModelOperator):
    """Hessian-vector products by finite differences of the gradient along v^ = v / ||v||.

        forward:  H v ~ ||v|| (g(w + h v^) - g(w)) / h                  1 extra gradient per product
        central:  H v ~ ||v|| (g(w + h v^) - g(w - h v^)) / (2 h)         2 gradients per product

    g(w) for the forward scheme is computed once, at construction, and reused.

    Default step (Pernice & Walker 1998, NITSOL; Knoll & Keyes 2004, JFNK review, section 2.2,
    for a directional difference along a unit direction): h = sqrt(eps (1 + ||w||)) forward and
    h = (eps (1 + ||w||))^(1/3) central, the classical optima sqrt(eps) and eps^(1/3)
    (docs/complex-step.md section 7.1) scaled by the size of the point. For a tiny float64 MLP that is
    ~3e-8 and ~1e-5, the measured optima of docs/complex-step.md 7.3 (relative errors ~1e-8 and
    ~1e-10); in float32 ~7e-4 and ~8e-3.
    """

    def __init__(self, model, params, x, y, scheme: str = "central", h: float | None = None, regularized: bool = True):
        if scheme not in ("central", "forward"):
            raise ValueError(f"scheme must be 'central' or 'forward', got {scheme!r}")
        super().__init__(model, params, x, y, regularized)
        self.scheme = scheme
        self._w = model.flatten(self.params)
        if h is None:
            eps = float(numpy.finfo(self.dtype).eps)
            _, wnorm = split_norm(self._w)
            scale = eps * (1.0 + float(wnorm))  # the step is a host number: one sync, at construction only
            h = scale ** 0.5 if scheme == "forward" else scale ** (1.0 / 3.0)
        self.h = float(h)
        if not (self.h > 0 and numpy.isfinite(self.h)):
            raise ValueError(f"the finite-difference step h must be a positive finite number, got {h}")
        if scheme == "forward":
            self.gradient()

    def _grad_at(self, w):
        _, g = self.model.loss_and_grad(self.model.unflatten(w), self.x, self.y, regularized=self.regularized)
        return self.model.flatten(g)

    def _matvec(self, v):
        step, norm = split_norm(v)
        step *= self.dtype.type(self.h)  # h v^, in place on split_norm's fresh array
        g_plus = self._grad_at(self._w + step)
        if self.scheme == "forward":
            hv = g_plus - self._grad
            hv /= self.dtype.type(self.h)
        else:
            hv = g_plus - self._grad_at(self._w - step)
            hv /= self.dtype.type(2 * self.h)
        hv *= norm
        return hv


class HessianRop(ModelOperator):
    """Exact Hessian-vector products by Pearlmutter's R-operator, in real arithmetic.

    With R{.} = d/dr (.)(w + r v)|_{r=0} (Pearlmutter 1994, section 3):

    1. forward:   h_l = f_l(h_{l-1}; w_l)                   (cached once, at construction)
    2. R-forward: R{h_l} = layer.jvp(R{h_{l-1}}, v_l)       (R{x} = 0 for the data)
    3. loss:      dL/dout from the loss; R{dL/dout} = H_out R{out}  (``loss.hessian_vp``)
    4. backward:  dh_{l-1}, dw_l = layer.backward(dh_l)                    (cached)
                  R{dh_{l-1}}, R{dw_l} = layer.backward_rop(dh_l, R{dh_l}, R{h_{l-1}}, v_l)
    5. H v = (R{dw_l})_l  (+ tau v with weight decay)

    The forward pass and the backward deltas do not depend on v, so they are computed once when
    the operator is built; each product then costs one R-forward and one R-backward sweep.
    """

    def __init__(self, model, params, x, y, regularized: bool = True):
        super().__init__(model, params, x, y, regularized)
        self._prepare()

    def _prepare(self):
        model = self.model
        self._fwd = model.forward_pass(self.params, self.x, self.y)
        model.loss_fn.check_target(self._fwd.out, self.y)
        _, dy = model.loss_fn.value_and_grad(self._fwd.out, self.y)
        # deltas[i] = dL/d(output of layer i); the gradient comes for free on the way down.
        back = model.backward(self.params, self._fwd, dy, keep_deltas=True)
        self._deltas = back.deltas
        g = model.flatten(model.parallel.mean(back.grads))  # data parallel: the global batch's
        if self.tau:
            g += self.tau * model.flatten(self.params)
        self._grad = g

    def _matvec(self, v):
        model = self.model
        rparams = model.unflatten(v)
        r_inputs, r_out = model.r_forward(self.params, self._fwd, rparams)
        rdy = model.loss_fn.hessian_vp(self._fwd.out, self.y, r_out)
        hv = model.backward_rop(self.params, self._fwd, self._deltas, rdy, r_inputs, rparams)
        return self._add_weight_decay(model.flatten(model.parallel.mean(hv)), v)  # summed over the ranks' shards
