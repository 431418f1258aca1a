"""Independent references for the convolutional layers: direct loops and an mpmath CNN.

Nothing here calls engine code for arithmetic: the convolution, pooling and patch extraction
are written as the textbook loops over output pixels, and the high-precision loss walks the
network in plain Python on mpmath numbers. The model is read only for its structure (layer
kinds, sizes, hyper-parameters, activation and loss names).
"""

from __future__ import annotations

import itertools

import mpmath
import numpy

from engine.conv import AvgPool2d, Conv2d, Flatten, MaxPool2d, Unflatten, Upsample2d
from engine.layers import Dense
from tests.reference import _act, _loss


def _padded(x, ph, pw, value=0.0):
    n, c, h, w = x.shape
    out = numpy.full((n, c, h + 2 * ph, w + 2 * pw), value, dtype=x.dtype)
    out[:, :, ph:ph + h, pw:pw + w] = x
    return out


def conv2d_loop(x, w, b, stride=(1, 1), padding=(0, 0)):
    """y[n,o,h,w] = b[o] + sum_{c,i,j} W[o,c,i,j] x_pad[n,c,s h+i,s w+j], one output at a time."""
    x, w, b = (numpy.asarray(a) for a in (x, w, b))
    xp_ = _padded(x, *padding)
    n, c, hp, wp = xp_.shape
    co, _, kh, kw = w.shape
    ho, wo = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    y = numpy.zeros((n, co, ho, wo), dtype=numpy.result_type(x, w, b))
    for e, o, r, s in itertools.product(range(n), range(co), range(ho), range(wo)):
        acc = b[o]
        for ci, i, j in itertools.product(range(c), range(kh), range(kw)):
            acc = acc + w[o, ci, i, j] * xp_[e, ci, stride[0] * r + i, stride[1] * s + j]
        y[e, o, r, s] = acc
    return y


def pool_loop(x, kernel, stride, padding, kind):
    """Max (arg-max of the real parts, first on ties, -inf padding) or average (zero padding counted)."""
    x = numpy.asarray(x)
    xp_ = _padded(x, *padding, value=-numpy.inf if kind == "max" else 0.0)
    n, c, hp, wp = xp_.shape
    kh, kw = kernel
    ho, wo = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    y = numpy.zeros((n, c, ho, wo), dtype=x.dtype)
    for e, ci, r, s in itertools.product(range(n), range(c), range(ho), range(wo)):
        window = [xp_[e, ci, stride[0] * r + i, stride[1] * s + j] for i in range(kh) for j in range(kw)]
        if kind == "max":
            best = window[0]
            for v in window[1:]:
                if v.real > best.real:
                    best = v
            y[e, ci, r, s] = best
        else:
            y[e, ci, r, s] = sum(window) / (kh * kw)
    return y


def patches_loop(x, kernel, stride, padding):
    """Rows [x_pad[n, c, s h + i, s w + j] for (c, i, j)], one row per (n, h, w) in that order."""
    x = numpy.asarray(x)
    xp_ = _padded(x, *padding)
    n, c, hp, wp = xp_.shape
    kh, kw = kernel
    ho, wo = (hp - kh) // stride[0] + 1, (wp - kw) // stride[1] + 1
    rows = []
    for e, r, s in itertools.product(range(n), range(ho), range(wo)):
        rows.append([xp_[e, ci, stride[0] * r + i, stride[1] * s + j]
                     for ci in range(c) for i in range(kh) for j in range(kw)])
    return numpy.array(rows)


# --- mpmath network ---------------------------------------------------------------------------
# An example is either a flat list (vector) or a list of channels, each a list of rows of mpf.

def _mp_pad(img, ph, pw, value):
    out = []
    for ch in img:
        wid = len(ch[0]) + 2 * pw
        rows = [[value] * wid for _ in range(ph)]
        rows += [[value] * pw + list(r) + [value] * pw for r in ch]
        rows += [[value] * wid for _ in range(ph)]
        out.append(rows)
    return out


def _mp_conv(layer, img, w, b):
    xp_ = _mp_pad(img, *layer.padding, mpmath.mpf(0))
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    ho, wo = (len(xp_[0]) - kh) // sh + 1, (len(xp_[0][0]) - kw) // sw + 1
    out = []
    for o in range(layer.c_out):
        out.append([[mpmath.fsum([w[o][c][i][j] * xp_[c][sh * r + i][sw * s + j]
                                  for c in range(layer.c_in) for i in range(kh) for j in range(kw)]) + b[o]
                     for s in range(wo)] for r in range(ho)])
    return out


def _mp_pool(layer, img, kind):
    fill = mpmath.mpf("-inf") if kind == "max" else mpmath.mpf(0)
    xp_ = _mp_pad(img, *layer.padding, fill)
    (kh, kw), (sh, sw) = layer.kernel, layer.stride
    ho, wo = (len(xp_[0]) - kh) // sh + 1, (len(xp_[0][0]) - kw) // sw + 1
    out = []
    for ch in xp_:
        rows = []
        for r in range(ho):
            row = []
            for s in range(wo):
                window = [ch[sh * r + i][sw * s + j] for i in range(kh) for j in range(kw)]
                row.append(max(window) if kind == "max" else mpmath.fsum(window) / (kh * kw))
            rows.append(row)
        out.append(rows)
    return out


def _split_params(model, flat):
    """Per-layer nested parameter lists read from the flat mpf list in the model's order."""
    out, pos = [], 0
    for layer in model.layers:
        if isinstance(layer, Conv2d):
            kh, kw = layer.kernel
            w = [[[[flat[pos + ((o * layer.c_in + c) * kh + i) * kw + j] for j in range(kw)] for i in range(kh)]
                  for c in range(layer.c_in)] for o in range(layer.c_out)]
            pos += layer.c_out * layer.c_in * kh * kw
            b = flat[pos:pos + layer.c_out]
            pos += layer.c_out
            out.append((w, b))
        elif isinstance(layer, Dense):
            w = [flat[pos + r * layer.d_in: pos + (r + 1) * layer.d_in] for r in range(layer.d_out)]
            pos += layer.d_in * layer.d_out
            b = flat[pos:pos + layer.d_out]
            pos += layer.d_out
            out.append((w, b))
        else:
            out.append(None)
    return out


def _mp_example(model, params, row):
    h = [mpmath.mpf(float(v)) for v in row]
    for layer, p in zip(model.layers, params):
        if isinstance(layer, Unflatten):
            c, hh, ww = layer.shape
            h = [[h[(ci * hh + r) * ww: (ci * hh + r + 1) * ww] for r in range(hh)] for ci in range(c)]
        elif isinstance(layer, Conv2d):
            h = _mp_conv(layer, h, *p)
        elif isinstance(layer, MaxPool2d):
            h = _mp_pool(layer, h, "max")
        elif isinstance(layer, AvgPool2d):
            h = _mp_pool(layer, h, "avg")
        elif isinstance(layer, Upsample2d):
            sh, sw = layer.scale
            h = [[[r[s // sw] for s in range(len(r) * sw)] for r in ch for _ in range(sh)] for ch in h]
        elif isinstance(layer, Flatten):
            h = [v for ch in h for r in ch for v in r]
        elif isinstance(layer, Dense):
            w, b = p
            h = [mpmath.fsum([wr[c] * h[c] for c in range(layer.d_in)]) + b[r] for r, wr in enumerate(w)]
        elif isinstance(h[0], list):  # activation on an image
            h = [[[_act(layer.name, v) for v in r] for r in ch] for ch in h]
        else:
            h = [_act(layer.name, v) for v in h]
    return h


def mp_cnn_loss(model, flat, x, y):
    """The CNN's regularised mean loss at the flat mpf parameter list ``flat``."""
    params = _split_params(model, flat)
    outs = [_mp_example(model, params, row) for row in numpy.asarray(x, dtype=float).reshape(len(x), -1)]
    value = _loss(model.loss_fn.name, outs, numpy.asarray(y))
    if model.weight_decay:
        value += mpmath.mpf(model.weight_decay) / 2 * mpmath.fsum(p * p for p in flat)
    return value


def mp_cnn_dense_hessian(model, params, x, y, dps: int = 40, t: str = "1e-12") -> numpy.ndarray:
    """Dense Hessian by mixed central differences in ``dps`` digits (the scheme of tests.reference).

    H_jk = [f(w + t e_j + t e_k) - f(w + t e_j - t e_k) - f(w - t e_j + t e_k) + f(w - t e_j - t e_k)] / (4 t^2):
    truncation O(t^2) ~ 1e-24, rounding ~ 10^-dps / t^2 = 1e-16 of the loss; the pooling arg-max and
    the ReLU masks do not change within t of a random point.
    """
    with mpmath.workdps(dps):
        w0 = [mpmath.mpf(float(v)) for p in params for v in numpy.asarray(p, dtype=float).ravel()]
        n = len(w0)
        tt = mpmath.mpf(t)
        H = numpy.zeros((n, n))

        def f(j, sj, k, sk):
            w = list(w0)
            w[j] += sj * tt
            w[k] += sk * tt
            return mp_cnn_loss(model, w, x, y)

        for j in range(n):
            for k in range(j, n):
                val = (f(j, 1, k, 1) - f(j, 1, k, -1) - f(j, -1, k, 1) + f(j, -1, k, -1)) / (4 * tt * tt)
                H[j, k] = H[k, j] = float(val)
        return H
