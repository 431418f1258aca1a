"""Forward/backward passes that Kronecker-factored solvers need beyond ``Model.loss_and_grad``.

* :func:`forward_pass` keeps the layer caches and each Kronecker layer's pre-activation, so
  several backward passes can share one forward (K-FAC back-propagates the true targets and the
  sampled targets from the same forward, kbfgs.md section 6).
* :func:`backward_pass` back-propagates d(loss)/d(output) and returns per Kronecker layer the
  :class:`engine.model.Capture` rows (input a, pre-activation z, g = N dL/dz), and optionally
  the parameter gradients; a Conv2d layer gives one row per (example, location), N L rows, with
  g = N sqrt(L) dL/dz (:meth:`engine.conv.Conv2d.kron_rows`). Without parameter gradients it
  skips the weight-gradient GEMMs (dW = dz^T a) and stops at the first Kronecker layer: that is the second
  pass of K-BFGS, which needs only batch means of z and g (kbfgs.md section 4.3 (c)), at 2/3
  of the cost of a full backward.

The rows are read through ``layer.kron_rows`` exactly as ``Model.loss_and_grad(capture=True)``
does, so the statistics agree with the curvature interface (``engine.curvature.kron_factors``).
"""

from __future__ import annotations

from engine.layers import Dense
from engine.model import Capture

__all__ = ["forward_pass", "backward_pass"]


def forward_pass(model, params, x):
    """(output, caches, {layer index: pre-activation}) for one forward pass."""
    model._check_input(x)
    caches, zs = [], {}
    h = x
    for i, layer in enumerate(model.layers):
        h, cache = layer.forward(model.layer_params(params, i), h)
        caches.append(cache)
        if layer.kronecker:
            zs[i] = h
    return h, caches, zs


def _input_gradient(layer, params, cache, dy):
    """dL/d(layer input) only: no weight-gradient products (Dense: dy W; Conv2d: its
    ``input_gradient``, col2im of dY W_m without the im2col of the input)."""
    if isinstance(layer, Dense):
        return dy @ params[0]
    input_gradient = getattr(layer, "input_gradient", None)
    if input_gradient is not None:
        return input_gradient(params, cache, dy)
    return layer.backward(params, cache, dy, need_dx=True)[0]


def backward_pass(model, params, caches, zs, dout, n: int, param_grads: bool = True, per_example: bool = True):
    """Back-propagate ``dout`` = dL/d(output); returns (grads or None, captures in layer order).

    ``n`` is the batch size used for the per-example scale g = n dL/dz (pitfall 3). With
    ``per_example=False`` the captures hold the layer's unscaled rows (dL/dz for Dense,
    sqrt(L) dL/dz for Conv2d; no scaled copy): a caller that only needs the mean of the g rows
    takes sum_rows(rows) n / (number of rows) and saves a pass.
    """
    grads = [None] * len(params) if param_grads else None
    first_kron = min(zs) if zs else 0
    first_param = getattr(model, "first_param_layer", 0)  # nothing below it needs dL/dx
    captures = []
    dy = dout
    for i in range(len(model.layers) - 1, first_param - 1, -1):
        layer = model.layers[i]
        lp = model.layer_params(params, i)
        if layer.kronecker:
            a, z, g = layer.kron_rows(caches[i], zs[i], dy)
            captures.append(Capture(i, model.layer_param_index[i], a, z, g * n if per_example else g))
        if param_grads:
            dy, dparams = layer.backward(lp, caches[i], dy, need_dx=i > first_param)
            start = model.layer_param_index[i]
            grads[start:start + len(dparams)] = dparams
        else:
            if i <= first_kron:
                break
            dy = _input_gradient(layer, lp, caches[i], dy)
    captures.reverse()
    return grads, captures
