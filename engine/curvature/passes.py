"""Real-arithmetic passes shared by the R-operator and Gauss-Newton operators.

Both need the forward caches at fixed parameters and the network's Jacobian-vector product
R{out} = J v through the layers' ``jvp`` (Pearlmutter 1994, R-forward); neither touches
complex numbers.
"""

from __future__ import annotations

__all__ = ["forward_caches", "r_forward", "first_param_layer"]


def forward_caches(model, params, x):
    """(network output, per-layer caches) at ``params`` (the ordinary forward pass)."""
    return model.forward(params, x)


def r_forward(model, params, caches, rparams, xp, out_like):
    """(R{input} of every layer, R{out}) for the parameter direction ``rparams``.

    R{x} = 0 for the data; parameter-free layers before the first weight layer keep it 0
    (recorded as ``None``, which the layers' ``jvp`` accept for the first weight layer).
    """
    r = None
    r_inputs = []
    for i, layer in enumerate(model.layers):
        r_inputs.append(r)
        lp = model.layer_params(params, i)
        if r is None and not lp:
            continue
        r = layer.jvp(lp, caches[i], r, model.layer_params(rparams, i))
    if r is None:
        r = xp.zeros_like(out_like)
    return r_inputs, r


def first_param_layer(model) -> int:
    """Index of the first layer with parameters: backward sweeps stop there (nothing below it
    has parameters, and R{x} = 0 for the data)."""
    for i, layer in enumerate(model.layers):
        if layer.param_shapes():
            return i
    return len(model.layers)
