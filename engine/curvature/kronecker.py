"""Kronecker factors of dense layers and the Kronecker-factored block-diagonal operator.

Statistics (Martens & Grosse 2015, K-FAC, section 3; Goldfarb, Ren & Bahamou 2020, K-BFGS,
section 3; kbfgs.md sections 2 and 4). For a layer with homogeneous weight matrix
M = [W | b] (d_out x (d_in + 1)), input rows a_n, pre-activation rows z_n and per-example
pre-activation gradients g_n = N dL/dz_n (``engine.model.Capture``), with N the number of rows:

    A = (1/N) sum_n a~_n a~_n^T,  a~_n = [a_n, 1]         ((d_in + 1) x (d_in + 1))
    G = (1/N) sum_n g_n g_n^T                              (d_out x d_out)
    a_mean = mean_n a~_n (last entry 1), z_mean = mean_n z_n, g_mean = mean_n g_n

The batch means are what K-BFGS's H_g update differences between two passes (kbfgs.md 4.2).

Block operator. One block per layer, acting on the layer's homogeneous matrix:

    C_l : M  ->  L_l M R_l          i.e.  (L_l (x) R_l^T) vec(M)  for row-major vec,

so K-FAC's Fisher block A (x) G in the column-major convention of the paper is the block with
L = G, R = A. Parameters are laid out as the model's flat vector, not as vec(M); the operator
converts with ``layer.to_matrix`` / ``layer.from_matrix``.

Two ways to give a block, one operator type:

* **curvature factors** (default; K-FAC): (L, R) are the factors of C, e.g. (G, A) with
  ``damping=sqrt(lambda)`` giving (G + sqrt(lambda) I) (x) (A + sqrt(lambda) I) (kbfgs.md 5).
  ``matvec`` multiplies by the factors; ``solve`` applies inv(L) M inv(R), with the inverses
  cached (Cholesky for symmetric positive definite factors, LU otherwise).
* **inverse factors** (``inverse=True`` or :meth:`KroneckerBlockOperator.from_inverse_factors`;
  K-BFGS, K-BFGS(L)): the given (H_g, H_a) approximate the *inverse* factors, so the curvature is
  C = inv(H_g) (x) inv(H_a): ``solve`` is the cheap H_g M H_a the solvers apply every step, and
  ``matvec`` is the inverse application (used for checks and quadratic models).

Either way ``matvec`` is the curvature C and ``solve`` is C^{-1}; only which side costs a
factorisation differs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from ..backend import array_module, to_host
from .base import CurvatureOperator

__all__ = ["homogeneous", "KronFactors", "kron_factors", "KroneckerBlockOperator", "factor_inverse", "factor_inverses"]


def homogeneous(a):
    """Rows [a_n, 1]: the N x (d + 1) homogeneous input, same dtype and array module as ``a``."""
    xp = array_module(a)
    return xp.concatenate([a, xp.ones((a.shape[0], 1), dtype=a.dtype)], axis=1)


@dataclass
class KronFactors:
    """Kronecker statistics of one layer (see the module docstring for the formulas).

    ``layer``: index in ``model.layers``; ``param_index``: index of its first parameter.
    Fields not requested from :func:`kron_factors` stay ``None``.
    """

    layer: int
    param_index: int
    A: object = None
    G: object = None
    a_mean: object = None
    z_mean: object = None
    g_mean: object = None


_WHICH = {"A", "G", "means", "a_mean", "z_mean", "g_mean"}


def kron_factors(captures, which=("A", "G", "means")) -> list[KronFactors]:
    """One :class:`KronFactors` per captured layer, computing only what ``which`` asks.

    ``captures`` come from ``model.loss_and_grad(..., capture=True)``. ``which`` holds any of
    "A", "G", "means" (all three means) or "a_mean", "z_mean", "g_mean" singly.
    A is assembled blockwise, [[a^T a / N, mean a], [mean a^T, 1]], which equals a~^T a~ / N
    without materialising the homogeneous copy of a.
    """
    if isinstance(which, str):
        which = (which,)
    which = set(which)
    unknown = which - _WHICH
    if unknown:
        raise ValueError(f"kron_factors: unknown statistic(s) {sorted(unknown)}; choose from {sorted(_WHICH)}")
    means = "means" in which
    out = []
    for c in captures:
        xp = array_module(c.a, c.g)
        f = KronFactors(c.layer, c.param_index)
        n = c.a.shape[0]
        a_mean = None
        if "A" in which or means or "a_mean" in which:
            a_mean = c.a.sum(axis=0) / n
        if "A" in which:
            d = c.a.shape[1]
            A = xp.empty((d + 1, d + 1), dtype=c.a.dtype)
            aa = c.a.T @ c.a
            aa /= n
            A[:d, :d] = aa
            A[:d, d] = a_mean
            A[d, :d] = a_mean
            A[d, d] = 1
            f.A = A
        if "G" in which:
            G = c.g.T @ c.g
            G /= n
            f.G = G
        if means or "a_mean" in which:
            f.a_mean = xp.concatenate([a_mean, xp.ones(1, dtype=a_mean.dtype)])
        if means or "z_mean" in which:
            f.z_mean = c.z.sum(axis=0) / n
        if means or "g_mean" in which:
            f.g_mean = c.g.sum(axis=0) / n
        out.append(f)
    return out


def _solve_triangular(xp):
    if xp is numpy:
        from scipy.linalg import solve_triangular  # noqa: PLC0415
    else:
        from cupyx.scipy.linalg import solve_triangular  # noqa: PLC0415
    return solve_triangular


#: A factor is treated as symmetric when max|F - F^T| <= SYMMETRY_TOL eps max|F| (BFGS-updated
#: factors are symmetric only to rounding).
SYMMETRY_TOL = 1e3

# status codes of the Cholesky attempt (one device integer per factor)
_CHOLESKY_OK, _NOT_FINITE, _ZERO, _USE_LU = 0, 1, 2, 3


def _symmetry_flag(F):
    """max|F - F^T| <= SYMMETRY_TOL eps max|F|, as a 0-d device boolean (no host sync)."""
    xp = array_module(F)
    eps = float(numpy.finfo(F.dtype).eps)
    return xp.abs(F - F.T).max() <= SYMMETRY_TOL * eps * xp.abs(F).max()


def _cholesky_attempt(F):
    """(inverse by Cholesky or None, status) for a square factor, without a host sync.

    The status is a 0-d device integer: ``_CHOLESKY_OK`` when F is symmetric and the factor
    L of S = (F + F^T)/2 is valid (then the inverse is inv(L)^T inv(L), exactly symmetric),
    ``_NOT_FINITE`` / ``_ZERO`` for a factor with NaN/Inf or all zeros, else ``_USE_LU``.

    Validity does not rely on the library raising. NumPy's ``cholesky`` raises ``LinAlgError``
    for a matrix that is not positive definite; CuPy's does not (outside
    ``cupyx.errstate(linalg="raise")``): it returns whatever cuSOLVER's potrf left, a partial
    factor that may be finite and wrong, and the inverse built from it is inf/NaN or a finite
    wrong matrix. So L is accepted only when

    * its diagonal is positive (a failed potrf leaves the failing pivot, <= 0, or NaN there),
    * it reproduces S: max|L L^T - S| <= 4 (n + 1) eps max|F|. A computed Cholesky factor
      satisfies |L L^T - S| <= gamma_{n+1} |L| |L^T| (Higham, "Accuracy and Stability of
      Numerical Algorithms", 2nd ed., Theorem 10.3), with |L| |L^T|_ij <= sqrt(S_ii S_jj) <=
      max|S| by Cauchy-Schwarz, whatever the conditioning of S; the product L L^T adds another
      gamma_n. 4 (n + 1) eps is twice both together, so a successful factorisation always
      passes, while a partial factor (rows past the failing pivot are not factored) does not,
      whatever potrf leaves in them;
    * the inverse is finite (a positive but tiny pivot can still overflow inv(L)).

    The work (one Cholesky, one triangular solve, two GEMMs) is done before anything is known
    about F: that is what lets every check share one host sync. On NumPy a raising ``cholesky``
    skips it.
    """
    xp = array_module(F)
    n = F.shape[0]
    eps = float(numpy.finfo(F.dtype).eps)
    scale = xp.abs(F).max()
    symmetric = xp.abs(F - F.T).max() <= SYMMETRY_TOL * eps * scale
    S = (F + F.T) / 2
    Finv = None
    ok = symmetric
    with numpy.errstate(all="ignore"):  # NumPy only: a bad factor's inverse may overflow
        try:
            L = xp.linalg.cholesky(S)
            Linv = _solve_triangular(xp)(L, xp.eye(n, dtype=F.dtype), lower=True, check_finite=False)
        except numpy.linalg.LinAlgError:  # NumPy's cholesky (SciPy's solve on a zero pivot)
            ok = xp.zeros((), dtype=bool)
        else:
            Finv = Linv.T @ Linv
            residual = xp.abs(L @ L.T - S).max()
            ok = ok & (xp.diagonal(L) > 0).all() & xp.isfinite(Finv).all() & (residual <= 4 * (n + 1) * eps * scale)
    status = xp.where(ok, _CHOLESKY_OK, _USE_LU)
    status = xp.where(scale == 0, _ZERO, status)
    status = xp.where(xp.isfinite(scale), status, _NOT_FINITE)
    return Finv, status


def _finish_inverse(F, chol_inverse, status: int, name: str):
    """The inverse from the Cholesky attempt's host status, falling back to LU (one more sync)."""
    if status == _NOT_FINITE:
        raise ValueError(f"{name} contains NaN or Inf; check the statistics it was built from")
    if status == _ZERO:
        raise numpy.linalg.LinAlgError(f"{name} is zero and has no inverse; add damping")
    if status == _CHOLESKY_OK:
        return chol_inverse
    xp = array_module(F)
    try:
        Finv = xp.linalg.inv(F)  # CuPy's gives NaN/Inf for a singular F instead of raising
    except numpy.linalg.LinAlgError:
        raise numpy.linalg.LinAlgError(f"{name} is singular; add damping") from None
    if not bool(xp.isfinite(Finv).all()):
        raise numpy.linalg.LinAlgError(f"{name} is singular; add damping")
    return Finv


def _check_square(F, name):
    if F.ndim != 2 or F.shape[0] != F.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(F.shape)}")
    if F.dtype.kind != "f":
        raise TypeError(f"{name} must be a real float matrix, got {F.dtype}")
    if not F.size:
        raise numpy.linalg.LinAlgError(f"{name} is empty, so zero, and has no inverse; add damping")


def factor_inverse(F, name: str = "factor"):
    """inv(F): by Cholesky when F is symmetric positive definite, else by LU.

    Symmetry is judged to ``SYMMETRY_TOL`` eps relative (BFGS-updated factors are symmetric
    only to rounding); the Cholesky inverse inv(L)^T inv(L) of the symmetrised factor is exactly
    symmetric. A factor with NaN/Inf raises ``ValueError``; a zero or singular one
    ``numpy.linalg.LinAlgError`` ("... is singular; add damping"), on NumPy and on CuPy alike
    (CuPy's linear algebra does not raise: see :func:`_cholesky_attempt` for how a failed
    factorisation is recognised instead).

    Host syncs: ONE for a symmetric positive definite factor (every check of the Cholesky route
    is combined into one device integer, read once), two when it falls back to LU (the LU
    inverse's finiteness is read too). Callers cache the result; :func:`factor_inverses` reads
    the statuses of many factors with one sync.
    """
    return factor_inverses([F], [name])[0]


def factor_inverses(factors, names=None) -> list:
    """[inv(F) for F in factors] as :func:`factor_inverse` computes them, with ONE host sync for
    all the factors that are symmetric positive definite (plus one per factor that needs LU)."""
    factors = list(factors)
    names = list(names) if names is not None else [f"factor {k}" for k in range(len(factors))]
    if not factors:
        return []
    for F, name in zip(factors, names):
        _check_square(F, name)
    xp = array_module(*factors)
    attempts = [_cholesky_attempt(F) for F in factors]
    statuses = to_host(xp.stack([status for _, status in attempts])).tolist()  # the one host sync
    return [_finish_inverse(F, inv, status, name) for F, (inv, _), status, name in zip(factors, attempts, statuses, names)]


class KroneckerBlockOperator(CurvatureOperator):
    """Block-diagonal Kronecker-factored curvature on the flat parameter vector.

    ``blocks``: ``{layer_index: (left, right)}`` or a list of ``(layer_index, left, right)``,
    with left d_out x d_out and right (d_in + 1) x (d_in + 1) for a Dense layer (the shapes of
    ``layer.to_matrix``). Block l maps the layer's homogeneous matrix M to left @ M @ right
    (curvature factors) or, with ``inverse=True``, the factors are the inverse factors and the
    block is inv(left) @ M @ inv(right) (see the module docstring).

    ``damping`` (curvature factors only) is added to both factors: (left + d I), (right + d I);
    K-FAC with damping lambda uses d = sqrt(lambda) (kbfgs.md section 5).
    ``missing``: what to do with parameters of layers without a block: "raise" (default) or
    "identity" (they pass through unchanged in both ``matvec`` and ``solve``).

    Factors are held by reference when no damping is added (a solver may update them in place
    and call :meth:`clear_cache`). Multiplying by the stored factors costs two GEMMs per layer
    and never synchronises with the host; inverses of the stored factors are computed on first
    use (or by :meth:`precompute_inverses`) and cached.
    """

    def __init__(self, model, blocks, damping: float = 0.0, inverse: bool = False, missing: str = "raise"):
        if missing not in ("raise", "identity"):
            raise ValueError(f"missing must be 'raise' or 'identity', got {missing!r}")
        if inverse and damping:
            raise ValueError("damping applies to curvature factors; add it before inverting (inverse=True takes the inverse factors as they are)")
        if isinstance(blocks, dict):
            items = [(int(k), lr[0], lr[1]) for k, lr in blocks.items()]
        else:
            items = [(int(b[0]), b[1], b[2]) for b in blocks]
        if not items:
            raise ValueError("KroneckerBlockOperator needs at least one block")
        seen = set()
        arrays = [a for _, l, r in items for a in (l, r)]
        xp = array_module(*arrays)
        dtype = numpy.result_type(*[a.dtype for a in arrays])
        if dtype.kind != "f":
            raise TypeError(f"Kronecker factors must be real float arrays, got {dtype}")
        self.model = model
        self.inverse = bool(inverse)
        self.damping = float(damping)
        self.missing = missing
        self.factors: dict[int, tuple] = {}
        for li, left, right in items:
            if not 0 <= li < len(model.layers):
                raise ValueError(f"block for layer {li}, but {model.name} has layers 0..{len(model.layers) - 1}")
            if li in seen:
                raise ValueError(f"two blocks given for layer {li}")
            seen.add(li)
            layer = model.layers[li]
            if not layer.kronecker:
                raise ValueError(f"layer {li} ({layer!r}) has no Kronecker view; give blocks only for {model.kron_layers}")
            m_shape = self._matrix_shape(li, xp, dtype)
            if tuple(left.shape) != (m_shape[0],) * 2 or tuple(right.shape) != (m_shape[1],) * 2:
                raise ValueError(f"layer {li} ({layer!r}) needs factors of shapes {(m_shape[0],) * 2} and {(m_shape[1],) * 2}, got {tuple(left.shape)} and {tuple(right.shape)}")
            left = xp.asarray(left, dtype=dtype)
            right = xp.asarray(right, dtype=dtype)
            if self.damping:
                left = left + self.damping * xp.eye(left.shape[0], dtype=dtype)
                right = right + self.damping * xp.eye(right.shape[0], dtype=dtype)
            self.factors[li] = (left, right)
        for li, layer in enumerate(model.layers):
            if layer.param_shapes() and li not in self.factors and missing == "raise":
                raise ValueError(f"layer {li} ({layer!r}) has parameters but no block; give one or pass missing='identity'")
        self._inverses: dict[int, tuple] = {}
        self._symmetric = None
        super().__init__(model.n_params, dtype, xp)

    @property
    def symmetric(self) -> bool:
        """All factors symmetric (to 1e3 eps relative); checked on first use (a host sync), cached."""
        if self._symmetric is None:
            flags = [_symmetry_flag(f) for lr in self.factors.values() for f in lr]
            self._symmetric = bool(self.xp.stack(flags).all())  # one host sync for all the factors
        return self._symmetric

    def clear_cache(self):
        """Forget cached inverses and the symmetry flag (after modifying factors in place)."""
        self._inverses.clear()
        self._symmetric = None

    # --- construction helpers -----------------------------------------------------------
    @classmethod
    def from_inverse_factors(cls, model, blocks, missing: str = "raise"):
        """The operator whose blocks are inv(H_g) (x) inv(H_a), given (H_g, H_a) (K-BFGS)."""
        return cls(model, blocks, inverse=True, missing=missing)

    @classmethod
    def from_kron_factors(cls, model, factors, damping: float = 0.0, missing: str = "raise"):
        """K-FAC's operator (G + d I) (x) (A + d I) from :func:`kron_factors` output."""
        return cls(model, {f.layer: (f.G, f.A) for f in factors}, damping=damping, missing=missing)

    def _matrix_shape(self, li, xp, dtype):
        layer = self.model.layers[li]
        zeros = [xp.zeros(s, dtype=dtype) for s in layer.param_shapes()]
        return tuple(layer.to_matrix(zeros).shape)

    def precompute_inverses(self):
        """Factorise every block now (otherwise done on first use and cached); returns self."""
        self._compute_inverses()
        return self

    def _compute_inverses(self):
        """Invert every factor not yet inverted, with one host sync for all of them (plus one per
        factor that is not symmetric positive definite: see :func:`factor_inverses`)."""
        todo = [li for li in self.factors if li not in self._inverses]
        if not todo:
            return
        mats = [f for li in todo for f in self.factors[li]]
        names = [f"{side} factor of layer {li}" for li in todo for side in ("left", "right")]
        invs = factor_inverses(mats, names)
        for k, li in enumerate(todo):
            self._inverses[li] = (invs[2 * k], invs[2 * k + 1])

    def _inverse_factors(self, li):
        if li not in self._inverses:
            self._compute_inverses()
        return self._inverses[li]

    # --- block application --------------------------------------------------------------
    def _blockwise(self, params_list, invert: bool, transpose: bool = False) -> list:
        model = self.model
        if len(params_list) != len(model.shapes):
            raise ValueError(f"{model.name} has {len(model.shapes)} parameter arrays, got {len(params_list)}")
        out = [None] * len(params_list)
        for li, layer in enumerate(model.layers):
            n_p = len(layer.param_shapes())
            if not n_p:
                continue
            start = model.layer_param_index[li]
            ps = params_list[start:start + n_p]
            if li not in self.factors:
                out[start:start + n_p] = [p.copy() for p in ps]
                continue
            # matvec multiplies by the stored factors unless they are inverse factors; solve
            # multiplies by their inverses unless they are inverse factors.
            use_inverse = invert != self.inverse
            left, right = self._inverse_factors(li) if use_inverse else self.factors[li]
            if transpose:
                left, right = left.T, right.T
            M = layer.to_matrix(ps)
            out[start:start + n_p] = layer.from_matrix(left @ M @ right)
        return out

    def apply_to_params(self, params_list) -> list:
        """C applied to a parameter-shaped list (e.g. the gradient list): per layer L M R."""
        return self._blockwise(params_list, invert=False)

    def solve_params(self, params_list) -> list:
        """C^{-1} applied to a parameter-shaped list: per layer inv(L) M inv(R) (or H_g M H_a)."""
        return self._blockwise(params_list, invert=True)

    def _flat(self, v, invert, transpose=False):
        out = self._blockwise(self.model.unflatten(v), invert, transpose)
        return self.xp.concatenate([p.reshape(-1) for p in out])

    def _matvec(self, v):
        return self._flat(v, invert=False)

    def _rmatvec(self, v):
        return self._flat(v, invert=False, transpose=True)

    def solve(self, v):
        """C^{-1} v on the flat vector."""
        return self._flat(self._as_vector(v), invert=True)
