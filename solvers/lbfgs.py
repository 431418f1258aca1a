"""Compact representation of the L-BFGS inverse Hessian (Byrd, Nocedal, Schnabel 1994,
Math. Programming 63:129-156, Theorem 2.2), as K-BFGS(L) uses it (docs/kbfgs.md section 5).

With m stored pairs, S, Y in R^{m x d} (rows = pairs, oldest first), R the upper triangle of
S Y^T (R_ij = s_i^T y_j for i <= j), D = diag(s_i^T y_i) and initial matrix gamma I,

    H v = gamma v + S^T R^{-T} (D + gamma Y Y^T) R^{-1} S v - gamma S^T R^{-T} Y v
          - gamma Y^T R^{-1} S v
        = gamma v + L (Rm v),
    L  = [S^T R^{-T},  gamma Y^T]                              (d x 2m)
    Rm = [(D + gamma Y Y^T) R^{-1} S - gamma Y ;  -R^{-1} S]     (2m x d)

so applying H to a d x k matrix costs two GEMMs. R^{-1} is kept and updated by bordering when a
pair is appended,

    R+ = [[R, b], [0, delta]],  R+^{-1} = [[R^{-1}, -R^{-1} b / delta], [0, 1 / delta]],
    b = S y_new, delta = s_new^T y_new,

and dropping the oldest pair takes the trailing (m-1) x (m-1) block of R^{-1} (R is upper
triangular, so that block is the inverse of R's trailing block). This equals the matrix the BFGS
inverse recursion builds from gamma I with the same pairs (tested against it).

The operator lives in fixed-capacity arrays plus a fill count, so it round-trips through the
solver state (HDF5) exactly: :meth:`CompactLBFGS.to_state` / :meth:`CompactLBFGS.from_state`.
The count is a 0-d integer array of the arrays' module, and :meth:`CompactLBFGS.push` takes the
"store this pair?" decision as a 0-d boolean array, so on a GPU the whole memory update runs
on the device with no host synchronisation (DESIGN.md convention 5):

* **NumPy** (the count and the flag are host values, reading them is free): the leading
  ``count`` rows are sliced and updated in place, as above.
* **CuPy**: the arrays are used at full capacity; the rows and columns beyond the count are
  zero, so the products over them add zeros (the same values up to rounding order). Dropping
  the oldest pair is a gather with a device-side index, writing the new pair a ``where`` on
  one-hot masks of the device-side count, and a pair that is not stored selects nothing.

Both keep the same layout (the cached L and Rm packed to their leading ``2 count``
columns/rows), so a state moves between backends.
"""

from __future__ import annotations

import numpy

from engine.backend import array_module, get_xp
from engine.fuse import device_arange, fused
from engine.ops import add_scaled_

from .bfgs import matvec

__all__ = ["CompactLBFGS"]

_FIELDS = ("S", "Y", "Rinv", "YY", "D", "L", "Rm")


class CompactLBFGS:
    """L-BFGS inverse-Hessian operator in compact form, ``memory`` pairs of length ``dim``.

    Arrays (capacity p = ``memory``): ``S``, ``Y`` (p x d), ``Rinv``, ``YY`` (p x p), ``D`` (p),
    cached ``L`` (d x 2p) and ``Rm`` (2p x d), of which the leading ``count`` rows/columns
    (``2 count`` for L and Rm) are valid and the rest are zero. ``count`` is a 0-d integer array
    of the same module. An empty memory is gamma I.
    """

    def __init__(self, S, Y, Rinv, YY, D, L, Rm, count, gamma: float = 1.0):
        self.S, self.Y, self.Rinv, self.YY, self.D, self.L, self.Rm = S, Y, Rinv, YY, D, L, Rm
        xp = array_module(S)
        # a Python int (a run file written before the count moved to the device) becomes an array
        self.count = count if isinstance(count, xp.ndarray) else xp.asarray(count, dtype=numpy.int64)
        self.gamma = float(gamma)

    @classmethod
    def empty(cls, dim: int, memory: int, dtype, xp=None, gamma: float = 1.0) -> "CompactLBFGS":
        if memory < 1 or dim < 1:
            raise ValueError(f"CompactLBFGS needs memory >= 1 and dim >= 1, got memory={memory}, dim={dim}")
        xp = xp or get_xp()
        z = lambda *shape: xp.zeros(shape, dtype=dtype)  # noqa: E731
        return cls(z(memory, dim), z(memory, dim), z(memory, memory), z(memory, memory), z(memory),
                   z(dim, 2 * memory), z(2 * memory, dim), xp.zeros((), dtype=numpy.int64), gamma)

    @property
    def memory(self) -> int:
        return self.S.shape[0]

    @property
    def dim(self) -> int:
        return self.S.shape[1]

    @property
    def shape(self) -> tuple[int, int]:
        """(d, d): the operator's shape (it serves as a left inverse factor of
        :class:`engine.curvature.KroneckerBlockOperator`)."""
        return (self.dim, self.dim)

    @property
    def dtype(self):
        return self.S.dtype

    @property
    def _on_host(self) -> bool:
        return array_module(self.S) is numpy

    # --- state ----------------------------------------------------------------------------
    def to_state(self, prefix: str) -> dict:
        """Flat state entries ``prefix + name`` (arrays are shared, not copied)."""
        out = {prefix + name: getattr(self, name) for name in _FIELDS}
        out[prefix + "count"] = self.count
        return out

    @classmethod
    def from_state(cls, state: dict, prefix: str, gamma: float = 1.0) -> "CompactLBFGS":
        return cls(*(state[prefix + name] for name in _FIELDS), state[prefix + "count"], gamma)

    # --- operator -------------------------------------------------------------------------
    def apply(self, X):
        """H X for a vector (d,) or a matrix (d, k): gamma X + L (Rm X), two GEMMs."""
        if self._on_host:
            m = int(self.count)
            if m == 0:
                return self.gamma * X
            L, Rm = self.L[:, : 2 * m], self.Rm[: 2 * m]
        else:  # full capacity: the columns of L and rows of Rm beyond 2 count are zero
            L, Rm = self.L, self.Rm
        out = matvec(L, matvec(Rm, X))
        add_scaled_(out, X, self.gamma)
        return out

    __call__ = apply

    def dense(self):
        """The d x d matrix H (for tests and inspection)."""
        xp = array_module(self.S)
        return self.apply(xp.eye(self.dim, dtype=self.S.dtype))

    def push(self, s, y, store=True) -> None:
        """Append the pair (s, y) where ``store`` holds, dropping the oldest if full.

        ``store`` is a bool or a 0-d boolean array (s^T y > 0 is the caller's check); on a
        device it is never read on the host.
        """
        if self._on_host:
            if bool(store):
                self._push_host(s, y)
        else:
            self._push_device(s, y, store)

    def _push_host(self, s, y) -> None:
        p = self.memory
        m = int(self.count)
        if m == p:  # drop the oldest pair: shift rows, keep the trailing block of R^{-1}
            self.S[:-1] = self.S[1:].copy()
            self.Y[:-1] = self.Y[1:].copy()
            self.Rinv[:-1, :-1] = self.Rinv[1:, 1:].copy()
            self.YY[:-1, :-1] = self.YY[1:, 1:].copy()
            self.D[:-1] = self.D[1:].copy()
            m -= 1
        xp = array_module(self.S, s, y)
        delta = xp.dot(s, y)
        b = matvec(self.S[:m], y)
        self.Rinv[:m, m] = -matvec(self.Rinv[:m, :m], b) / delta
        self.Rinv[m, :m] = 0
        self.Rinv[m, m] = 1 / delta
        yy = matvec(self.Y[:m], y)
        self.YY[:m, m] = yy
        self.YY[m, :m] = yy
        self.YY[m, m] = xp.dot(y, y)
        self.D[m] = delta
        self.S[m] = s
        self.Y[m] = y
        self.count[...] = m + 1
        self._rebuild_host(m + 1)

    def _rebuild_host(self, m: int) -> None:
        """Recompute the cached L and Rm from S, Y, R^{-1}, YY, D (O(m^2 d))."""
        xp = array_module(self.S)
        g = self.gamma
        P = self.Rinv[:m, :m] @ self.S[:m]                    # R^{-1} S  (m x d)
        middle = g * self.YY[:m, :m]
        middle[xp.arange(m), xp.arange(m)] += self.D[:m]      # D + gamma Y Y^T
        self.L[:, :m] = P.T
        self.L[:, m: 2 * m] = g * self.Y[:m].T
        self.Rm[:m] = middle @ P - g * self.Y[:m]
        self.Rm[m: 2 * m] = -P

    def _push_device(self, s, y, store) -> None:
        """:meth:`_push_host` at full capacity with the count and the decision on the device.

        The arrays are replaced (not updated in place); callers keep them through :meth:`to_state`.
        The index bookkeeping, the bordering of R^{-1} and Y Y^T, the new rows and the packing of
        L and Rm are fused kernels (about 25 launches per push instead of 56).
        """
        xp = array_module(self.S, s, y)
        p, g = self.memory, self.gamma
        store = xp.asarray(store, dtype=bool)
        rows = device_arange(xp, p)
        full, m, n = _push_counts(self.count, store, p)
        # drop the oldest pair when storing into a full memory: row j <- row j + 1 (the last row
        # is overwritten by the new pair below); an identity gather otherwise
        src, before, at = _push_rows(rows, full, m, store, p)
        S, Y, D = self.S[src], self.Y[src], self.D[src]
        Rinv = self.Rinv[src[:, None], src[None, :]]
        YY = self.YY[src[:, None], src[None, :]]
        dots = _dots_sy_yy(s, y)
        delta = _where_store(store, dots[0])
        b = _masked(before, matvec(S, y))
        Rinv = _border_rinv(Rinv, matvec(Rinv, b)[:, None], before[:, None], at[:, None], at[None, :], delta)
        Yy = matvec(Y, y)
        YY = _border_yy(YY, Yy[:, None], Yy[None, :], before[:, None], before[None, :], at[:, None], at[None, :], dots[1])
        D = _set_at(at, delta, D)
        S, Y = _set_rows(at[:, None], s[None, :], y[None, :], S, Y)
        # cached L and Rm, packed as on the host: columns/rows [0, n) from R^{-1} S, [n, 2n) from Y.
        # Rows of S, Y, R^{-1} beyond n are zero, so the products over them add zeros.
        P = Rinv @ S
        top = _middle(YY, D[None, :], rows[:, None], rows[None, :], g) @ P
        _subtract_scaled_(top, Y, g)
        idx, from_y = _pack_index(device_arange(xp, 2 * p), n, p)
        # beyond 2n: a zero row of Y or P
        self.L = xp.ascontiguousarray(_scale_columns(xp.concatenate([P, Y])[idx].T, from_y[None, :], g))  # no copy: a kernel's output is C-ordered
        self.Rm = _negate_rows(xp.concatenate([top, P])[idx], from_y[:, None])
        self.S, self.Y, self.D, self.Rinv, self.YY = S, Y, D.astype(self.S.dtype, copy=False), Rinv, YY
        self.count = n


# --- the fused pieces of a device-side push (:meth:`CompactLBFGS._push_device`) -------------------
@fused
def _push_counts(xp, count, store, p):
    full = store & (count == p)
    m = count - full  # the index of the new pair
    return full, m, m + store  # the new count


@fused
def _push_rows(xp, rows, full, m, store, p):
    src = xp.where(full, xp.minimum(rows + 1, p - 1), rows)
    return src, rows < m, (rows == m) & store


def _dots_sy_yy(s, y):
    return _pair_dots(s[None, :], y[None, :], device_arange(array_module(s), 2)[:, None])


@fused
def _pair_dots(xp, s, y, sel):
    return xp.sum(xp.where(sel == 0, s * y, y * y), axis=1)  # (s^T y, y^T y)


@fused
def _where_store(xp, store, sy):
    return xp.where(store, sy, 1)


@fused
def _masked(xp, mask, v):
    return xp.where(mask, v, 0)


@fused
def _border_rinv(xp, Rinv, Rb, before_col, at_col, at_row, delta):
    inv_delta = 1 / delta
    col = xp.where(before_col, -Rb * inv_delta, xp.where(at_col, inv_delta, 0))
    row = xp.where(at_row, inv_delta, 0)
    return xp.where(at_row, col, xp.where(at_col, row, Rinv))


@fused
def _border_yy(xp, YY, Yy_col, Yy_row, before_col, before_row, at_col, at_row, yy):
    col = xp.where(before_col, Yy_col, xp.where(at_col, yy, 0))
    row = xp.where(before_row, Yy_row, xp.where(at_row, yy, 0))
    return xp.where(at_row, col, xp.where(at_col, row, YY))


@fused
def _set_at(xp, at, value, D):
    return xp.where(at, value, D)


@fused
def _set_rows(xp, at_col, s_row, y_row, S, Y):
    return xp.where(at_col, s_row, S), xp.where(at_col, y_row, Y)


@fused
def _middle(xp, YY, D_row, r_col, r_row, g):
    return g * YY + xp.where(r_col == r_row, D_row, 0)  # D + gamma Y Y^T


@fused
def _subtract_scaled_(xp, top, Y, g):
    top -= g * Y


@fused
def _pack_index(xp, j, n, p):
    idx = xp.minimum(xp.where(j < n, j, p + j - n), 2 * p - 1)
    return idx, idx >= p


@fused
def _scale_columns(xp, LT, from_y, g):
    return xp.where(from_y, LT * g, LT)  # a fresh C-contiguous (d, 2p) array, in LT's dtype


@fused
def _negate_rows(xp, R, from_y):
    return xp.where(from_y, -R, R)
