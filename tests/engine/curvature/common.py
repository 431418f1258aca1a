"""Shared tiny models, batches and cached high-precision references for the curvature tests."""

from __future__ import annotations

from functools import lru_cache

import numpy

from engine.backend import to_host
from nets import mlp
from tests.reference import mp_dense_hessian

LOSSES = ["sigmoid_xent", "half_mse", "softmax_xent"]
ACTS = ["tanh", "relu"]


def tiny(act, loss, weight_decay=1e-2):
    """3-4-3 MLP: 31 parameters (a 40-digit dense Hessian takes ~2 s)."""
    return mlp([3, 4, 3], [act, "linear"], loss, weight_decay=weight_decay)


def batch(model, xp, n=4, seed=4):
    rng = numpy.random.default_rng(seed)
    x = rng.standard_normal((n, model.input_shape[0]))
    d_out = model.output_shape[0]
    y = rng.integers(0, d_out, size=n) if model.loss_fn.classification else rng.random((n, d_out))
    return xp.asarray(x), xp.asarray(y)


def setup(act, loss, xp, weight_decay=1e-2):
    model = tiny(act, loss, weight_decay)
    params = model.init(seed=3, xp=xp)
    x, y = batch(model, xp)
    return model, params, x, y


@lru_cache(maxsize=None)
def mp_hessian(act, loss, weight_decay=1e-2):
    """The 40-digit dense Hessian of :func:`setup`'s problem (host float64), computed once."""
    model, params, x, y = setup(act, loss, numpy, weight_decay)
    return mp_dense_hessian(model, params, x, y)


def rel(a, b):
    """||a - b|| / ||b||, scaled by max|b| first so that vectors near 1e-300 or 1e+300 do not under/overflow."""
    a, b = to_host(a), to_host(b)
    s = numpy.abs(b).max()
    return float(numpy.linalg.norm((a - b) / s) / numpy.linalg.norm(b / s))
