"""Kronecker factors of Kronecker layers (Dense, Conv2d), their EMAs, and the Kronecker-factored
block-diagonal operator through which K-FAC, K-BFGS and K-BFGS(L) apply their steps.

Statistics (Martens & Grosse 2015, K-FAC, section 3; Goldfarb, Ren & Bahamou 2020, K-BFGS,
section 3; docs/kbfgs.md sections 2 and 4). For a layer with homogeneous weight matrix
M = [W | b] (d_out x (d_in + 1)), input rows a_n, pre-activation rows z_n and per-example
pre-activation gradients g_n = N dL/dz_n (``engine.model.Capture``), with N the number of rows:

    A = (1/N) sum_n a~_n a~_n^T,  a~_n = [a_n, 1]         ((d_in + 1) x (d_in + 1))
    G = (1/N) sum_n g_n g_n^T                              (d_out x d_out)
    a_mean = mean_n a~_n (last entry 1), z_mean = mean_n z_n, g_mean = mean_n g_n

The batch means are what K-BFGS's H_g update differences between two passes (docs/kbfgs.md section 4.3 (d)).

Factor updates (what the solvers keep in their state, updated in place): :func:`ema_`,
:func:`ema_homogeneous_second_moment_` (A's EMA fused with its statistic), :func:`flush_subnormals_`
(docs/kbfgs.md pitfall 19), and the pre-activation-side secant pair of K-BFGS with the convolution scaling
(:func:`row_means`, :func:`secant_pair`; docs/kbfgs.md section 4.3 (d)).

Block operator. One block per layer, acting on the layer's homogeneous matrix:

    C_l : M  ->  L_l M R_l          i.e.  (L_l (x) R_l^T) vec(M)  for row-major vec,

so K-FAC's Fisher block A (x) G in the column-major convention of the paper is the block with
L = G, R = A. Parameters are laid out as the model's flat vector, not as vec(M); the operator
converts with ``layer.to_matrix`` / ``layer.from_matrix``.

Two ways to give a block, one operator type:

* **curvature factors** (default; K-FAC): (L, R) are the factors of C, e.g. (G, A) with
  ``damping=sqrt(lambda)`` giving (G + sqrt(lambda) I) (x) (A + sqrt(lambda) I) (docs/kbfgs.md section 6).
  ``matvec`` multiplies by the factors; ``solve`` applies inv(L) M inv(R), with the inverses
  cached (Cholesky for symmetric positive definite factors, LU otherwise).
* **inverse factors** (``inverse=True`` or :meth:`KroneckerBlockOperator.from_inverse_factors`;
  K-BFGS, K-BFGS(L)): the given (H_g, H_a) approximate the *inverse* factors, so the curvature is
  C = inv(H_g) (x) inv(H_a): ``solve`` is the cheap H_g M H_a the solvers apply every step, and
  ``matvec`` is the inverse application (used for checks and quadratic models).

Either way ``matvec`` is the curvature C and ``solve`` is C^{-1}; only which side costs a
factorisation differs. An inverse factor on the left may also be a linear operator with
``apply(X)`` and ``dense()`` (K-BFGS(L)'s compact L-BFGS H_g). ``order`` fixes the floating-point
order of a block product: "left_first" is (L M) R (K-FAC's G^{-1} M A^{-1}), "right_first" is
L (M R) (K-BFGS's H_g (M H_a)); :meth:`KroneckerBlockOperator.solve_blocks` yields the per-layer
matrices the solvers scale and apply.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import numpy

from ..backend import array_module
from .base import CurvatureOperator
from .inverse import factor_inverse, factor_inverses, symmetry_flag
from .. import host_kernels
from ..fuse import device_ones, fused
from .kernels import flush_below_, scaled_ema_

__all__ = ["homogeneous", "KronFactors", "kron_factors", "ema_", "ema_homogeneous_second_moment_", "flush_subnormals_",
           "row_means", "secant_means", "column_mean", "homogeneous_mean", "secant_pair", "KroneckerBlockOperator", "BLOCK_ORDERS", "block_product", "factor_inverse", "factor_inverses"]


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
            a_mean = column_mean(c.a)
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
            f.z_mean = column_mean(c.z)
        if means or "g_mean" in which:
            f.g_mean = column_mean(c.g)
        out.append(f)
    return out


# --- factor updates -------------------------------------------------------------------------
@fused
def _ema_(xp, target, new, decay, weight, threshold):
    # weight = 1 - decay, computed on the host: an operation between two scalar arguments would be
    # a float64 value inside a CuPy fused kernel, and promote a float32 update
    target *= decay
    target += weight * new
    target[...] = xp.where(xp.absolute(target) < threshold, 0, target)


def ema_(target, new, decay: float, flush: bool = False):
    """target <- decay target + (1 - decay) new, in place (returns ``target``); with ``flush``
    also the subnormal flush of :func:`flush_subnormals_`, in the same pass (one kernel on a device)."""
    _ema_(target, new, decay, 1 - decay, float(numpy.finfo(target.dtype).tiny) if flush else 0.0)
    return target


def ema_homogeneous_second_moment_(A, a, decay: float, a_bar=None):
    """A <- decay A + (1 - decay) (1/N) a~^T a~ in place, a~ = [a, 1] (N x (d+1)).

    The same statistic as ``kron_factors(..., which="A")``, fused with the EMA so that no
    (d+1)^2 batch matrix is assembled: a^T a goes through SYRK (NumPy uses it for ``a.T @ a``),
    the ones column contributes the homogeneous column mean ``a_bar`` = [mean a, 1] (computed
    when not given). Exactly symmetric: the last row is a copy of the last column. Four launches
    on a device (the product, the block EMA, the column EMA, the row copy).
    """
    n, d = a.shape  # n counts rows: N examples (Dense) or N L (example, location) pairs (Conv2d)
    w = (1 - decay) / n
    aa = a.T @ a
    scaled_ema_(A[:d, :d], aa, decay, w)  # one fused pass
    if a_bar is None:
        a_bar = homogeneous_mean(a)
    _ema_(A[:, d], a_bar, decay, 1 - decay, 0.0)  # the last column, corner included: decay A + (1 - decay) [mean a, 1]
    A[d, :d] = A[:d, d]
    return A


def flush_subnormals_(a):
    """Set entries with |a| below the smallest normal number to zero, in place.

    docs/kbfgs.md pitfall 19: entries of EMA'd factors that decay (e.g. rows of dead ReLU units)
    drift into the subnormal range, where x86 arithmetic is many times slower; the official
    K-FAC doubles its epoch time on CPU after epoch 11 because of it.
    """
    return flush_below_(a, float(numpy.finfo(a.dtype).tiny))


@fused
def _column_sum(xp, a, scale, divisor):
    return xp.sum(a * scale / divisor, axis=0)  # the arguments before the reduction, as CuPy's fusion requires


def column_mean(a, scale=None):
    """sum_rows(a) / rows, or sum_rows(a) * scale when ``scale`` is given: one fused reduction on a device."""
    scale, divisor = (1.0, float(a.shape[0])) if scale is None else (float(scale), 1.0)
    out = host_kernels.column_sum(a, scale, divisor)  # one pass on NumPy (real operands)
    return _column_sum(a, scale, divisor) if out is None else out


def homogeneous_mean(a):
    """[mean_rows(a), 1]: the batch mean of the homogeneous rows a~ = [a, 1]."""
    xp = array_module(a)
    return xp.concatenate([column_mean(a), device_ones(xp, 1, a.dtype)])


def row_means(capture, batch_size: int):
    """(mean_rows(z), mean_rows(g)) of a capture taken with unscaled rows (``per_example=False``).

    The rows hold dL/dz (Dense: N rows) or sqrt(L) dL/dz (Conv2d: N L rows), and g = N dL/dz,
    so mean_rows(g) = (N / rows) sum_rows: the per-example scale is applied to the d_out sums,
    not to the rows (K-BFGS's passes, docs/kbfgs.md section 4.3 (c)). One fused reduction each.
    """
    rows = capture.z.shape[0]
    return column_mean(capture.z), column_mean(capture.g, batch_size / rows)


@fused
def _column_difference_sum(xp, a, b, scale, divisor):
    return xp.sum((a - b) * scale / divisor, axis=0)


def secant_means(old, new, batch_size: int):
    """(s, y) = (mean_rows(z) - mean_rows(z+), mean_rows(g) - mean_rows(g+)) of two captures of one
    batch with unscaled rows (as :func:`row_means`), each as the mean of the row differences: one
    fused reduction each, and no cancellation between two rounded means."""
    rows = new.z.shape[0]
    return (_difference_mean(old.z, new.z, 1.0, float(rows)), _difference_mean(old.g, new.g, batch_size / rows, 1.0))


def _difference_mean(a, b, scale, divisor):
    out = host_kernels.column_difference_sum(a, b, scale, divisor)  # one pass on NumPy (real operands)
    return _column_difference_sum(a, b, scale, divisor) if out is None else out


def secant_pair(layer, old: KronFactors, z_mean_new, g_mean_new, rows: int, batch_size: int):
    """(s, y, g_ref): the pre-activation-side pair of K-BFGS between two passes of one batch.

    s = mean_rows(z) - mean_rows(z+), y = mean_rows(g) - mean_rows(g+) (old minus new, docs/kbfgs.md
    section 4.3 (d)) and g_ref = mean_rows(g) for the skip rule. For a ``spatial`` layer
    (Conv2d, KF-QN-CNN) y and g_ref are scaled by sqrt(L), L = ``layer.locations(rows,
    batch_size)``: y = sum_t mean_n dDs_t matches G = E_n sum_t Ds Ds^T (docs/kbfgs.md section 4.3).
    """
    y = old.g_mean - g_mean_new
    g_ref = old.g_mean
    if layer.spatial:
        root_l = math.sqrt(layer.locations(rows, batch_size))
        y *= root_l
        g_ref = root_l * g_ref
    return old.z_mean - z_mean_new, y, g_ref


#: the floating-point orders of a block product L M R (see the module docstring)
BLOCK_ORDERS = ("left_first", "right_first")


def _is_array(f) -> bool:
    return hasattr(f, "ndim")


def _dense(f):
    """A factor as a matrix (a linear-operator factor densified)."""
    return f if _is_array(f) else f.dense()


def _left_apply(left, X):
    return left @ X if _is_array(left) else left.apply(X)


def block_product(left, M, right, order: str = "left_first"):
    """L M R in the given order: (L M) R ("left_first") or L (M R) ("right_first")."""
    if order == "left_first":
        return _left_apply(left, M) @ right
    return _left_apply(left, M @ right)


class KroneckerBlockOperator(CurvatureOperator):
    """Block-diagonal Kronecker-factored curvature on the flat parameter vector.

    ``blocks``: ``{layer_index: (left, right)}`` or a list of ``(layer_index, left, right)``,
    with left d_out x d_out and right (d_in + 1) x (d_in + 1) for a Kronecker layer (the shapes of
    ``layer.to_matrix``). Block l maps the layer's homogeneous matrix M to left @ M @ right
    (curvature factors) or, with ``inverse=True``, the factors are the inverse factors and the
    block is inv(left) @ M @ inv(right) (see the module docstring). With ``inverse=True`` the left
    factor may be a linear operator (``shape``, ``dtype``, ``apply(X)``, ``dense()``).

    ``damping`` (curvature factors only) is added to both factors: (left + d I), (right + d I);
    K-FAC with damping lambda uses d = sqrt(lambda) (docs/kbfgs.md section 6).
    ``missing``: what to do with parameters of layers without a block: "raise" (default) or
    "identity" (they pass through unchanged in both ``matvec`` and ``solve``).
    ``order``: "left_first" (L M) R or "right_first" L (M R), the floating-point order of every
    block product (:func:`block_product`).

    Factors are held by reference when no damping is added (a solver may update them in place
    and call :meth:`clear_cache`). Building the operator and multiplying by the stored factors
    (two GEMMs per layer) never synchronise with the host, so a solver builds one per step from
    its state; inverses of the stored factors are computed on first use (or by
    :meth:`precompute_inverses`) and cached.
    """

    def __init__(self, model, blocks, damping: float = 0.0, inverse: bool = False, missing: str = "raise",
                 order: str = "left_first"):
        if missing not in ("raise", "identity"):
            raise ValueError(f"missing must be 'raise' or 'identity', got {missing!r}")
        if order not in BLOCK_ORDERS:
            raise ValueError(f"order must be one of {', '.join(BLOCK_ORDERS)}, got {order!r}")
        if inverse and damping:
            raise ValueError("damping applies to curvature factors; add it before inverting (inverse=True takes the inverse factors as they are)")
        if isinstance(blocks, dict):
            items = [(int(k), lr[0], lr[1]) for k, lr in blocks.items()]
        else:
            items = [(int(b[0]), b[1], b[2]) for b in blocks]
        if not items:
            raise ValueError("KroneckerBlockOperator needs at least one block")
        arrays = [f for _, l, r in items for f in (l, r) if _is_array(f)]
        if not inverse and len(arrays) < 2 * len(items):
            raise TypeError("curvature factors must be arrays; a linear-operator factor is an inverse factor (inverse=True)")
        xp = array_module(*arrays)
        dtype = numpy.result_type(*[f.dtype for _, l, r in items for f in (l, r)])
        if dtype.kind != "f":
            raise TypeError(f"Kronecker factors must be real float arrays, got {dtype}")
        self.model = model
        self.inverse = bool(inverse)
        self.damping = float(damping)
        self.missing = missing
        self.order = order
        self.factors: dict[int, tuple] = {}
        for li, left, right in items:
            self.factors[li] = self._checked_block(li, left, right, xp, dtype)
        for li, layer in enumerate(model.layers):
            if layer.param_shapes() and li not in self.factors and missing == "raise":
                raise ValueError(f"layer {li} ({layer!r}) has parameters but no block; give one or pass missing='identity'")
        self._inverses: dict[int, tuple] = {}
        self._symmetric = None
        super().__init__(model.n_params, dtype, xp)

    def _checked_block(self, li, left, right, xp, dtype):
        """(left, right) of layer ``li`` after the checks, on ``xp`` in ``dtype``, damped."""
        model = self.model
        if not 0 <= li < len(model.layers):
            raise ValueError(f"block for layer {li}, but {model.name} has layers 0..{len(model.layers) - 1}")
        if li in self.factors:
            raise ValueError(f"two blocks given for layer {li}")
        layer = model.layers[li]
        if not layer.kronecker:
            raise ValueError(f"layer {li} ({layer!r}) has no Kronecker view; give blocks only for {model.kron_layers}")
        rows, cols = layer.d_out, layer.d_in + 1  # the shape of layer.to_matrix (KroneckerLayer)
        if tuple(left.shape) != (rows, rows) or tuple(right.shape) != (cols, cols):
            raise ValueError(f"layer {li} ({layer!r}) needs factors of shapes {(rows, rows)} and {(cols, cols)}, "
                             f"got {tuple(left.shape)} and {tuple(right.shape)}")
        left = xp.asarray(left, dtype=dtype) if _is_array(left) else left
        right = xp.asarray(right, dtype=dtype)
        if self.damping:
            left = left + self.damping * xp.eye(left.shape[0], dtype=dtype)
            right = right + self.damping * xp.eye(right.shape[0], dtype=dtype)
        return left, right

    @property
    def symmetric(self) -> bool:
        """All factors symmetric (to 1e3 eps relative); checked on first use (a host sync), cached."""
        if self._symmetric is None:
            flags = [symmetry_flag(_dense(f)) for lr in self.factors.values() for f in lr]
            self._symmetric = bool(self.xp.stack(flags).all())  # one host sync for all the factors
        return self._symmetric

    def clear_cache(self):
        """Forget cached inverses and the symmetry flag (after modifying factors in place)."""
        self._inverses.clear()
        self._symmetric = None

    # --- construction helpers -----------------------------------------------------------
    @classmethod
    def from_inverse_factors(cls, model, blocks, missing: str = "raise", order: str = "left_first"):
        """The operator whose blocks are inv(H_g) (x) inv(H_a), given (H_g, H_a) (K-BFGS; K-FAC's
        cached damped inverses): ``solve`` applies H_g M H_a in the given ``order``."""
        return cls(model, blocks, inverse=True, missing=missing, order=order)

    @classmethod
    def from_kron_factors(cls, model, factors, damping: float = 0.0, missing: str = "raise"):
        """K-FAC's operator (G + d I) (x) (A + d I) from :func:`kron_factors` output."""
        return cls(model, {f.layer: (f.G, f.A) for f in factors}, damping=damping, missing=missing)

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
        mats = [_dense(f) for li in todo for f in self.factors[li]]
        names = [f"{side} factor of layer {li}" for li in todo for side in ("left", "right")]
        invs = factor_inverses(mats, names)
        for k, li in enumerate(todo):
            self._inverses[li] = (invs[2 * k], invs[2 * k + 1])

    def _inverse_factors(self, li):
        if li not in self._inverses:
            self._compute_inverses()
        return self._inverses[li]

    # --- block application --------------------------------------------------------------
    def _block(self, li, M, invert: bool, transpose: bool = False):
        """Block ``li`` of C (``invert`` false) or of C^{-1} applied to the homogeneous matrix M."""
        # matvec multiplies by the stored factors unless they are inverse factors; solve
        # multiplies by their inverses unless they are inverse factors.
        use_inverse = invert != self.inverse
        left, right = self._inverse_factors(li) if use_inverse else self.factors[li]
        if transpose:
            left, right = _dense(left).T, right.T
        return block_product(left, M, right, self.order)

    def solve_blocks(self, params_list):
        """Per block, in the order the blocks were given: (layer index, C_l^{-1} M_l), with M_l
        the homogeneous matrix of the layer's entries of ``params_list`` (e.g. the momentum).

        The matrices are fresh arrays, so a solver may scale them in place before applying them
        (``layer.from_matrix`` splits one into parameter-shaped views); parameters without a block
        are not visited.
        """
        model = self.model
        for li in self.factors:
            M = model.layers[li].to_matrix(model.layer_params(params_list, li))
            yield li, self._block(li, M, invert=True)

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
            out[start:start + n_p] = layer.from_matrix(self._block(li, layer.to_matrix(ps), invert, transpose))
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
