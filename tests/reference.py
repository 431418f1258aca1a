"""Independent high-precision references for tests (mpmath, pure Python, no engine code).

The model is read only for its *structure* (layer kinds, sizes, activation and loss names);
the arithmetic below is written from the textbook formulas in plain Python on mpmath numbers, so
an error in the engine's forward or backward pass cannot be reproduced here.
"""

from __future__ import annotations

import mpmath
import numpy

from engine.layers import Dense


def _act(name, v):
    if name == "relu":
        return v if v > 0 else mpmath.mpf(0)
    if name == "tanh":
        return mpmath.tanh(v)
    if name == "sigmoid":
        return 1 / (1 + mpmath.exp(-v))
    if name == "identity":
        return v
    raise ValueError(name)


def _loss(name, out, target):
    n = len(out)
    total = mpmath.mpf(0)
    for i, row in enumerate(out):
        if name == "sigmoid_xent":
            total += sum(mpmath.log(1 + mpmath.exp(z)) - mpmath.mpf(t) * z for z, t in zip(row, target[i]))
        elif name == "half_mse":
            total += sum((z - mpmath.mpf(t)) ** 2 for z, t in zip(row, target[i])) / 2
        elif name == "softmax_xent":
            lse = mpmath.log(sum(mpmath.exp(z) for z in row))
            total += lse - row[int(target[i])]
        else:
            raise ValueError(name)
    return total / n


def mp_loss(model, flat, x, y):
    """The model's loss (with 0.5 tau ||theta||^2) at the flat parameter list ``flat`` (mpf)."""
    h = [[mpmath.mpf(float(v)) for v in row] for row in numpy.asarray(x, dtype=float)]
    pos = 0
    for layer in model.layers:
        if isinstance(layer, Dense):
            w = [flat[pos + r * layer.d_in: pos + (r + 1) * layer.d_in] for r in range(layer.d_out)]
            pos += layer.d_in * layer.d_out
            b = flat[pos: pos + layer.d_out]
            pos += layer.d_out
            h = [[mpmath.fsum(wr[c] * row[c] for c in range(layer.d_in)) + b[r] for r, wr in enumerate(w)] for row in h]
        else:
            h = [[_act(layer.name, v) for v in row] for row in h]
    yy = numpy.asarray(y)
    value = _loss(model.loss_fn.name, h, yy)
    if model.weight_decay:
        value += mpmath.mpf(model.weight_decay) / 2 * mpmath.fsum(p * p for p in flat)
    return value


def mp_dense_hessian(model, params, x, y, dps: int = 40, t: str = "1e-12") -> numpy.ndarray:
    """Dense Hessian of the regularised loss by mixed central differences in ``dps`` digits.

    H_jk = [f(w + t e_j + t e_k) - f(w + t e_j - t e_k) - f(w - t e_j + t e_k) + f(w - t e_j - t e_k)] / (4 t^2).
    At 40 digits with t = 1e-12 the truncation error is O(t^2) ~ 1e-24 and rounding ~1e-16 of
    the entries: far below the 1e-12 the tests ask of the engine.
    """
    with mpmath.workdps(dps):
        w0 = [mpmath.mpf(float(v)) for p in params for v in numpy.asarray(p, dtype=float).ravel()]
        n = len(w0)
        tt = mpmath.mpf(t)
        H = numpy.zeros((n, n))
        f = lambda w: mp_loss(model, w, x, y)  # noqa: E731

        def shifted(j, sj, k, sk):
            w = list(w0)
            w[j] += sj * tt
            w[k] += sk * tt
            return f(w)

        for j in range(n):
            for k in range(j, n):
                val = (shifted(j, 1, k, 1) - shifted(j, 1, k, -1) - shifted(j, -1, k, 1) + shifted(j, -1, k, -1)) / (4 * tt * tt)
                H[j, k] = H[k, j] = float(val)
        return H


def mp_gradient(model, params, x, y, dps: int = 40, t: str = "1e-15") -> numpy.ndarray:
    """Gradient of the regularised loss by central differences in ``dps`` digits."""
    with mpmath.workdps(dps):
        w0 = [mpmath.mpf(float(v)) for p in params for v in numpy.asarray(p, dtype=float).ravel()]
        tt = mpmath.mpf(t)
        g = numpy.zeros(len(w0))
        for j in range(len(w0)):
            wp, wm = list(w0), list(w0)
            wp[j] += tt
            wm[j] -= tt
            g[j] = float((mp_loss(model, wp, x, y) - mp_loss(model, wm, x, y)) / (2 * tt))
        return g
