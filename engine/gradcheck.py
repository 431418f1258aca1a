"""A generic gradient checker for layers and losses (in the spirit of HIPS autograd's check_grads).

A layer's backward pass is checked on the scalar probe ``L(params, x) = sum(forward(params, x) * R)``
for a fixed random ``R``: the directional derivative ``<grad L, v>`` from the hand-written
backward pass is compared with

* the complex step ``Im L(theta + i h v) / h`` (h = 1e-30; agrees to ~1e-15 when the forward pass
  is complex-analytic), and
* the central difference ``(L(theta + t v) - L(theta - t v)) / (2 t)`` (t ~ 1e-6; ~1e-9).

The two references share no code with ``backward``, so a wrong rule cannot agree with both.
"""

from __future__ import annotations

import numpy

from .backend import array_module, complex_dtype

__all__ = ["complex_step", "central_difference", "layer_directional_errors", "loss_directional_errors"]


def complex_step(f, x, v, h: float = 1e-30):
    """Im f(x + i h v) / h for real x, v (perturbation built in an explicit complex dtype)."""
    xc = x.astype(complex_dtype(x.dtype)) + (1j * h) * v.astype(complex_dtype(x.dtype))
    return f(xc).imag / h


def central_difference(f, x, v, t: float = 1e-6):
    """(f(x + t v) - f(x - t v)) / (2 t)."""
    return (f(x + t * v) - f(x - t * v)) / (2 * t)


def _rel(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-300)


def layer_directional_errors(layer, params, x, seed: int = 0, h: float = 1e-30, t: float = 1e-6) -> dict:
    """Relative errors of the backward pass of ``layer`` along random directions.

    Returns ``{"cs_params", "fd_params", "cs_input", "fd_input"}``: the directional derivative
    of the probe w.r.t. all parameters at once, and w.r.t. the input, each against the complex
    step and the central difference. ``params`` and ``x`` are real float64 arrays.
    """
    xp = array_module(x, *params)
    rng = numpy.random.default_rng(seed)
    y, cache = layer.forward(params, x)
    r = xp.asarray(rng.standard_normal(y.shape))
    _, dparams = layer.backward(params, cache, r)
    dx, _ = layer.backward(params, cache, r, need_dx=True)
    out = {}
    if params:
        vs = [xp.asarray(rng.standard_normal(p.shape)) for p in params]
        flat_p = xp.concatenate([p.ravel() for p in params])
        flat_v = xp.concatenate([v.ravel() for v in vs])
        sizes = numpy.cumsum([0] + [p.size for p in params])

        def probe_p(flat):
            ps = [flat[sizes[k]:sizes[k + 1]].reshape(p.shape) for k, p in enumerate(params)]
            return (layer.forward(ps, x.astype(flat.dtype))[0] * r).sum()

        exact = sum((d * v).sum() for d, v in zip(dparams, vs))
        out["cs_params"] = _rel(complex_step(probe_p, flat_p, flat_v, h), exact)
        out["fd_params"] = _rel(central_difference(probe_p, flat_p, flat_v, t), exact)
    vx = xp.asarray(rng.standard_normal(x.shape))

    def probe_x(xx):
        ps = [p.astype(xx.dtype) for p in params]
        return (layer.forward(ps, xx)[0] * r).sum()

    exact_x = (dx * vx).sum()
    out["cs_input"] = _rel(complex_step(probe_x, x, vx, h), exact_x)
    out["fd_input"] = _rel(central_difference(probe_x, x, vx, t), exact_x)
    return out


def loss_directional_errors(loss, out, target, seed: int = 0, h: float = 1e-30, t: float = 1e-6) -> dict:
    """Relative errors of ``loss.value_and_grad``'s gradient along a random direction of ``out``."""
    xp = array_module(out)
    rng = numpy.random.default_rng(seed)
    v = xp.asarray(rng.standard_normal(out.shape))
    _, grad = loss.value_and_grad(out, target)
    exact = (grad * v).sum()
    f = lambda o: loss.value(o, target)  # noqa: E731
    return {"cs": _rel(complex_step(f, out, v, h), exact), "fd": _rel(central_difference(f, out, v, t), exact)}
