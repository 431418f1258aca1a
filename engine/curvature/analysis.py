"""Curvature analysis on the operator interface: trace and diagonal estimators, per-layer
restrictions and Rayleigh quotients (the Lanczos eigensolver and the spectral density are in
:mod:`engine.curvature.spectral`, which builds on the helpers here).

Everything works through ``matvec``, ``shape``, ``dtype`` and ``xp`` alone (DESIGN.md
convention 4), so the same call analyses :class:`HessianCS`, :class:`HessianFD`,
:class:`HessianRop`, :class:`GaussNewton`, :class:`Fisher`, :class:`EmpiricalFisher`, a
:class:`KroneckerBlockOperator` or a :class:`BlockRestriction` of any of them.

Conventions shared by every function of this module and of ``spectral``:

* ``seed``: random probes are drawn on the host with NumPy's PCG64 and moved to the operator's
  array module in ONE copy, so a NumPy run and a CuPy run of the same call use the same probes.
  Rademacher probes travel as int8 (one byte per entry) and are cast on the device.
* ``progress``: called as ``progress(done, total)`` once per operator product (``done`` products
  so far out of ``total`` planned), e.g. ``lambda done, total: bar.update(1)`` for a tqdm bar.
* Vector work stays on the device; host numbers are read once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from ..backend import is_device_array, to_host
from .base import CurvatureOperator

__all__ = ["TraceEstimate", "DiagonalEstimate", "hutchinson_trace", "hutchpp_trace", "hutchinson_diagonal",
           "BlockRestriction", "restrict", "layer_blocks", "rayleigh_quotients"]


# --- shared helpers (also used by engine.curvature.spectral) ------------------------------------
def check_operator(op, who: str) -> None:
    """Refuse, in one sentence, anything that is not a real square operator of the interface."""
    shape = getattr(op, "shape", None)
    if not (hasattr(op, "matvec") and hasattr(op, "xp") and shape is not None and len(shape) == 2):
        raise TypeError(f"{who} needs a curvature operator (matvec, shape, dtype, xp; engine.curvature), got {type(op).__name__}")
    if shape[0] != shape[1] or shape[0] < 1:
        raise ValueError(f"{who} needs a non-empty square operator, got shape {tuple(shape)}")
    if numpy.dtype(op.dtype).kind != "f":
        raise TypeError(f"{who} analyses real operators, got dtype {op.dtype}")


def check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class ProductCounter:
    """``op.matvec`` that counts its products and reports each one to ``progress(done, total)``."""

    def __init__(self, op, progress=None, total: int | None = None):
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable progress(done, total), got {type(progress).__name__}")
        self.op, self.progress, self.total, self.count = op, progress, total, 0

    def __call__(self, v):
        out = self.op.matvec(v)
        self.count += 1
        if self.progress is not None:
            self.progress(self.count, self.total)
        return out


def host_generator(seed) -> numpy.random.Generator:
    """NumPy's PCG64 generator on the host: the one source of every probe."""
    return numpy.random.Generator(numpy.random.PCG64(seed))


def rademacher_rows(op, rows: int, seed):
    """A ``rows`` x n matrix of independent +-1 signs, drawn on the host and moved in one copy.

    Returned as int8 on ``op.xp`` (row i is probe i, contiguous); cast a row with
    ``.astype(op.dtype)`` where it is used.
    """
    signs = host_generator(seed).integers(0, 2, size=(rows, op.shape[0]), dtype=numpy.int8)
    signs *= 2
    signs -= 1
    return op.xp.asarray(signs)


# --- trace and diagonal estimators --------------------------------------------------------------
@dataclass
class TraceEstimate:
    """A stochastic trace estimate.

    ``estimate`` = ``exact_part`` + mean(``samples``); ``std_error`` = std(samples, ddof=1) /
    sqrt(len(samples)), the standard error of the estimate (for Hutch++, conditional on its
    sketch: the sketched part is deterministic given it, and the estimator is unbiased for any
    sketch). ``samples`` (host) are the probe quadratic forms z^T A z (of the deflated operator,
    for Hutch++).
    """

    estimate: float
    std_error: float
    samples: numpy.ndarray
    n_products: int
    exact_part: float = 0.0


@dataclass
class DiagonalEstimate:
    """``estimate`` and per-entry ``std_error`` (arrays of ``op.xp``, length n)."""

    estimate: object
    std_error: object
    n_products: int


def _summary(samples, exact_part, n_products) -> TraceEstimate:
    s = to_host(samples).astype(numpy.float64)  # the one host transfer
    return TraceEstimate(float(exact_part + s.mean()), float(s.std(ddof=1) / numpy.sqrt(s.size)), s, n_products,
                         float(exact_part))


def hutchinson_trace(op, n_probes: int = 30, seed=0, progress=None) -> TraceEstimate:
    """Hutchinson's estimator with Rademacher probes z_i (Hutchinson 1989):

        tr(A) ~ (1/m) sum_i z_i^T A z_i,   E[z z^T] = I,
        Var[z^T A z] = 2 (||A||_F^2 - sum_i A_ii^2)  for symmetric A,

    with the sample standard error std(z_i^T A z_i) / sqrt(m). Costs m products; one host
    transfer (the m quadratic forms) at the end.
    """
    check_operator(op, "hutchinson_trace")
    m = check_count(n_probes, "n_probes", 2)
    xp, dtype = op.xp, op.dtype
    apply = ProductCounter(op, progress, m)
    Z = rademacher_rows(op, m, seed)
    samples = xp.empty(m, dtype=dtype)
    for i in range(m):
        z = Z[i].astype(dtype)
        samples[i] = z @ apply(z)
    return _summary(samples, 0.0, apply.count)


def hutchpp_trace(op, n_products: int = 30, seed=0, progress=None) -> TraceEstimate:
    """Hutch++ (Meyer, Musco, Musco, Woodruff, SOSA 2021, Algorithm 1) with Rademacher sketches:

        S, G: n x s and n x g of +-1 (s = m // 3, g = m - 2 s; the paper's m/3 each),
        Q = orth(A S),
        tr(A) ~ tr(Q^T A Q) + (1/g) tr(G^T (I - Q Q^T) A (I - Q Q^T) G).

    The first term is exact given S; the second is Hutchinson's estimator on the deflated
    operator, whose standard error is reported. Unbiased for every S (tr((I-QQ^T) A (I-QQ^T)) =
    tr(A) - tr(Q^T A Q)); for a spectrum that decays, its variance is far below Hutchinson's at
    the same m products (s for A S, s for A Q, g for the residual). Needs m >= 4.
    """
    check_operator(op, "hutchpp_trace")
    m = check_count(n_products, "n_products", 4)
    xp, dtype = op.xp, op.dtype
    s = m // 3
    g = m - 2 * s
    apply = ProductCounter(op, progress, m)
    signs = rademacher_rows(op, s + g, seed)
    AS = xp.stack([apply(signs[i].astype(dtype)) for i in range(s)])  # s x n
    Q = xp.ascontiguousarray(xp.linalg.qr(AS.T)[0].T)  # rows: an orthonormal basis of range(A S)
    exact = xp.zeros((), dtype=dtype)
    for i in range(Q.shape[0]):
        exact += Q[i] @ apply(Q[i])
    G = signs[s:].astype(dtype)
    G -= (G @ Q.T) @ Q  # rows (I - Q Q^T) g_i
    samples = xp.empty(g, dtype=dtype)
    for i in range(g):
        samples[i] = G[i] @ apply(G[i])
    both = to_host(xp.concatenate([exact.reshape(1), samples]))  # the one host transfer
    return _summary(both[1:], float(both[0]), apply.count)


def hutchinson_diagonal(op, n_probes: int = 30, seed=0, progress=None) -> DiagonalEstimate:
    """The diagonal by Rademacher probes (Bekas, Kokiopoulou, Saad, "An estimator for the diagonal
    of a matrix", Appl. Numer. Math. 2007; Hutchinson's idea applied entrywise):

        diag(A) ~ (1/m) sum_k z_k * (A z_k),     (z_k * A z_k)_i = A_ii + sum_{j != i} A_ij z_ki z_kj,

    unbiased with per-entry variance sum_{j != i} A_ij^2. The mean and the sample variance are
    accumulated on the device with Welford's update (no cancellation, no host sync); the
    standard error is sqrt(M2 / (m - 1) / m).
    """
    check_operator(op, "hutchinson_diagonal")
    m = check_count(n_probes, "n_probes", 2)
    xp, dtype = op.xp, op.dtype
    apply = ProductCounter(op, progress, m)
    Z = rademacher_rows(op, m, seed)
    mean = xp.zeros(op.shape[0], dtype=dtype)
    m2 = xp.zeros(op.shape[0], dtype=dtype)
    for k in range(m):
        z = Z[k].astype(dtype)
        x = z * apply(z)
        delta = x - mean
        mean += delta / (k + 1)
        m2 += delta * (x - mean)
    return DiagonalEstimate(mean, xp.sqrt(m2 / ((m - 1) * m)), apply.count)


# --- per-layer restriction ---------------------------------------------------------------------
class BlockRestriction(CurvatureOperator):
    """The diagonal block P^T C P of an operator C on the coordinates ``start:stop``.

    P is the injection of those coordinates into the full vector (zeros elsewhere), so
    ``matvec(u) = (C P u)[start:stop]``: one product of C per product of the block. Every
    analysis of this module and of :mod:`engine.curvature.spectral` applies to it unchanged.
    """

    def __init__(self, op, start: int, stop: int, name: str | None = None):
        check_operator(op, "BlockRestriction")
        n = op.shape[0]
        if not 0 <= start < stop <= n:
            raise ValueError(f"a block needs 0 <= start < stop <= {n}, got {start}:{stop}")
        super().__init__(stop - start, op.dtype, op.xp)
        self.op, self.start, self.stop = op, int(start), int(stop)
        self.name = name or f"{start}:{stop}"

    def __repr__(self) -> str:
        return f"BlockRestriction({self.op!r}, {self.name}, shape={self.shape})"

    @property
    def symmetric(self) -> bool:
        return self.op.symmetric

    def embed(self, u):
        """P u: the block vector placed in a zero full-length vector."""
        full = self.xp.zeros(self.op.shape[0], dtype=self.dtype)
        full[self.start:self.stop] = u
        return full

    def _matvec(self, u):
        return self.op.matvec(self.embed(u))[self.start:self.stop]

    def _rmatvec(self, u):
        return self.op.rmatvec(self.embed(u))[self.start:self.stop]


def restrict(op, model, layer: int) -> BlockRestriction:
    """The block of ``op`` on the parameters of ``model.layers[layer]`` (contiguous in the flat
    vector: ``model.offsets[model.layer_param_index[layer]]`` onwards, as many entries as the
    layer's ``param_shapes()`` hold)."""
    check_operator(op, "restrict")
    if op.shape[0] != model.n_params:
        raise ValueError(f"the operator has shape {op.shape} but {model.name} has {model.n_params} parameters; restrict an operator of that model")
    if isinstance(layer, bool) or not isinstance(layer, (int, numpy.integer)) or not 0 <= layer < len(model.layers):
        raise ValueError(f"layer must be an index 0..{len(model.layers) - 1} of {model.name}'s layers, got {layer!r}")
    n_arrays = len(model.layers[layer].param_shapes())
    if not n_arrays:
        raise ValueError(f"layer {layer} ({model.layers[layer]!r}) has no parameters; layers with parameters: {sorted(layer_ranges(model))}")
    first = model.layer_param_index[layer]
    return BlockRestriction(op, model.offsets[first], model.offsets[first + n_arrays], name=f"layer {layer}")


def layer_ranges(model) -> dict[int, tuple[int, int]]:
    """{layer index: (start, stop)} in the flat parameter vector, for the layers with parameters."""
    out = {}
    for li, layer in enumerate(model.layers):
        k = len(layer.param_shapes())
        if k:
            first = model.layer_param_index[li]
            out[li] = (model.offsets[first], model.offsets[first + k])
    return out


def layer_blocks(op, model) -> dict[int, BlockRestriction]:
    """{layer index: :func:`restrict` (op, model, layer)} for every layer with parameters."""
    return {li: restrict(op, model, li) for li in layer_ranges(model)}


# --- Rayleigh quotients ------------------------------------------------------------------------
def rayleigh_quotients(op, vectors, progress=None) -> numpy.ndarray:
    """rho_i = v_i^T B v_i / v_i^T v_i for the columns v_i of ``vectors`` (n x k, or one vector).

    With B another curvature (a K-FAC / K-BFGS block operator, the Gauss-Newton matrix) and v_i
    the top eigenvectors of the Hessian from :func:`engine.curvature.spectral.lanczos`, rho_i /
    lambda_i says how well B matches the Hessian along them. k products; the k quotients come back
    to the host in one transfer (host float64 array).
    """
    check_operator(op, "rayleigh_quotients")
    xp = op.xp
    if xp is numpy and is_device_array(vectors):
        raise TypeError("rayleigh_quotients: the operator computes with NumPy and got CuPy vectors; pass engine.backend.to_host(...) of them")
    V = xp.asarray(vectors)
    V = V.reshape(-1, 1) if V.ndim == 1 else V
    if V.ndim != 2 or V.shape[0] != op.shape[0] or V.dtype.kind != "f":
        raise ValueError(f"rayleigh_quotients needs real vectors of shape ({op.shape[0]}, k), got {tuple(V.shape)} {V.dtype}")
    k = V.shape[1]
    apply = ProductCounter(op, progress, k)
    rho = xp.empty(k, dtype=op.dtype)
    for i in range(k):
        v = xp.ascontiguousarray(V[:, i]).astype(op.dtype)
        rho[i] = (v @ apply(v)) / (v @ v)
    return to_host(rho).astype(numpy.float64)
