"""Independent references for tests: high precision (mpmath, pure Python, no engine code), and
the NumPy run of a test body as the reference of its CuPy run.

The model is read only for its *structure* (layer kinds, sizes, activation and loss names);
the arithmetic below is written from the textbook formulas in plain Python on mpmath numbers, so
an error in the engine's forward or backward pass cannot be reproduced here.

:func:`numpy_twin` is CuPy's ``numpy_cupy_allclose`` pattern: the test body ``run(xp)`` runs under
the module under test and, for CuPy, once more under NumPy; the two must agree.
"""

from __future__ import annotations

import mpmath
import numpy

from engine.backend import to_host
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


def _host_tree(value):
    """``value`` with every array (device or host, any nesting of lists/tuples/dicts) on the host."""
    if isinstance(value, dict):
        return {k: _host_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_host_tree(v) for v in value)
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        return numpy.asarray(to_host(value))
    return value


def _assert_close(got, want, rtol, atol, where="result"):
    if isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            _assert_close(got[k], want[k], rtol, atol, f"{where}[{k!r}]")
        return
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for k, (g, w) in enumerate(zip(got, want)):
            _assert_close(g, w, rtol, atol, f"{where}[{k}]")
        return
    if want is None or isinstance(want, (str, bool)):
        assert got == want, where
        return
    g, w = numpy.asarray(got), numpy.asarray(want)
    assert g.shape == w.shape and g.dtype == w.dtype, f"{where}: {g.dtype}{g.shape} on CuPy, {w.dtype}{w.shape} on NumPy"
    if w.dtype.kind in "biu":
        numpy.testing.assert_array_equal(g, w, err_msg=where)
        return
    # norm-wise: components far below the norm may differ in their last bits between libraries
    err, size = float(numpy.linalg.norm(g - w)), float(numpy.linalg.norm(w))
    assert err <= rtol * size + atol, f"{where}: CuPy run differs from the NumPy run by {err / max(size, 1e-300):.2e} relative"


def numpy_twin(xp, run, rtol: float = 1e-13, atol: float = 0.0):
    """``run(xp)`` with its arrays moved to the host; for CuPy, ``run(numpy)`` too, compared.

    ``run`` builds its problem from host seeds on the module it is given and returns arrays
    (any nesting of lists, tuples and dicts; ints, bools and strings compare exactly). Floating
    arrays must agree norm-wise to ``rtol`` (1e-13: float64 libraries differ only in summation
    order) and in dtype and shape. Returns the host results of ``run(xp)``.
    """
    got = _host_tree(run(xp))
    if xp is not numpy:
        _assert_close(got, _host_tree(run(numpy)), rtol, atol)
    return got
