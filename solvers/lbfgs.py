"""Compact representation of the L-BFGS inverse Hessian (Byrd, Nocedal, Schnabel 1994,
Math. Programming 63:129-156, Theorem 2.2), as K-BFGS(L) uses it (docs/kbfgs.md section 5).

With m stored pairs, S, Y in R^{m x d} (rows = pairs, oldest first), R the upper triangle of
S Y^T (R_ij = s_i^T y_j for i <= j), D = diag(s_i^T y_i) and initial matrix gamma I,

    H v = gamma v + S^T R^{-T} (D + gamma Y Y^T) R^{-1} S v - gamma S^T R^{-T} Y v
          - gamma Y^T R^{-1} S v
        = gamma v + L (Rm v),
    L  = [S^T R^{-T},  gamma Y^T]                              (d x 2m)
    Rm = [(D + gamma Y Y^T) R^{-1} S - gamma Y ;  -R^{-1} S]     (2m x d)

so applying H to a d x k matrix costs two GEMMs.

The memory is a ring of ``memory`` slots: the pairs live in the slots ``head, head + 1, ...``
(mod ``memory``, oldest first), ``count`` of them; rows and columns of empty slots are zero. Every
quantity above is a sum over the pairs, so it does not depend on the slots' order once R^{-1}
is kept in slot coordinates (it is upper triangular in age order). Appending a pair writes slot
w = (head + count) mod memory (the oldest slot when full, which drops that pair) and borders:

    R+^{-1}[:, w] = -R^{-1} b / delta (kept rows),  R+^{-1}[w, w] = 1 / delta,  R+^{-1}[w, :] = 0 else,
    b = S y_new, delta = s_new^T y_new.

Dropping the oldest pair needs no work: its column of R^{-1} is zero but for the diagonal (no pair
is older) and its row is overwritten, and the trailing block of R^{-1} in age order is the
inverse of R's trailing block. With P = R^{-1} S kept in L, R^{-1} b = P y_new on the kept rows
(the dropped pair's column is zero there), and the new P is a rank-one update of the old one,

    P+[i] = P[i] - (R^{-1} b)_i / delta * s_new  (i != w),   P+[w] = s_new / delta,

so a push is one GEMV (L^T y_new = [P y_new; gamma Y y_new]), a few elementwise kernels and one
GEMM (the top block of Rm), all in place (fixed addresses: a push can be captured in a CUDA graph).
This equals the matrix the BFGS inverse recursion builds from gamma I with the same pairs (tested
against it).

Layout: L = [P^T, gamma Y^T] and Rm = [(D + gamma Y Y^T) P - gamma Y; -P], with the pairs' slots
as columns/rows (p each). The operator lives in these fixed-capacity arrays plus ``count`` and
``head`` (0-d integer arrays of the arrays' module), so it round-trips through the solver state
(HDF5) exactly: :meth:`CompactLBFGS.to_state` / :meth:`CompactLBFGS.from_state`. The "store this
pair?" decision is a 0-d boolean array, so on a GPU the whole memory update runs on the device with
no host synchronisation (DESIGN.md convention 5), and NumPy runs the same formulas op by op (the
same numbers on both backends). A state written before the ring (no ``head``; L and Rm packed to
their leading ``2 count`` columns/rows) is the ring with head 0: its L and Rm are rebuilt on load.
"""

from __future__ import annotations

import numpy

from engine.backend import array_module, get_xp
from engine.fuse import device_arange, fused
from engine.ops import add_scaled_

from .bfgs import inner_products, matvec

__all__ = ["CompactLBFGS", "advance_formula"]

_FIELDS = ("S", "Y", "Rinv", "YY", "D", "L", "Rm")


class CompactLBFGS:
    """L-BFGS inverse-Hessian operator in compact form, ``memory`` pairs of length ``dim``.

    Arrays (capacity p = ``memory``): ``S``, ``Y`` (p x d), ``Rinv``, ``YY`` (p x p), ``D`` (p),
    cached ``L`` (d x 2p) and ``Rm`` (2p x d) in slot coordinates (see the module docstring), the
    0-d integer arrays ``count`` and ``head``. An empty memory is gamma I.
    """

    def __init__(self, S, Y, Rinv, YY, D, L, Rm, count, gamma: float = 1.0, head=None):
        self.S, self.Y, self.Rinv, self.YY, self.D, self.L, self.Rm = S, Y, Rinv, YY, D, L, Rm
        xp = array_module(S)
        # a Python int (a run file written before the count moved to the device) becomes an array
        self.count = count if isinstance(count, xp.ndarray) else xp.asarray(count, dtype=numpy.int64)
        self.gamma = float(gamma)
        if head is None:  # a state from before the ring: oldest pair in row 0, L and Rm packed
            self.head = xp.zeros((), dtype=numpy.int64)
            self._rebuild()
        else:
            self.head = head if isinstance(head, xp.ndarray) else xp.asarray(head, dtype=numpy.int64)

    @classmethod
    def empty(cls, dim: int, memory: int, dtype, xp=None, gamma: float = 1.0) -> "CompactLBFGS":
        if memory < 1 or dim < 1:
            raise ValueError(f"CompactLBFGS needs memory >= 1 and dim >= 1, got memory={memory}, dim={dim}")
        xp = xp or get_xp()
        z = lambda *shape: xp.zeros(shape, dtype=dtype)  # noqa: E731
        return cls(z(memory, dim), z(memory, dim), z(memory, memory), z(memory, memory), z(memory),
                   z(dim, 2 * memory), z(2 * memory, dim), xp.zeros((), dtype=numpy.int64), gamma,
                   head=xp.zeros((), dtype=numpy.int64))

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

    # --- state ----------------------------------------------------------------------------
    def to_state(self, prefix: str) -> dict:
        """Flat state entries ``prefix + name`` (arrays are shared, not copied)."""
        out = {prefix + name: getattr(self, name) for name in _FIELDS}
        out[prefix + "count"] = self.count
        out[prefix + "head"] = self.head
        return out

    @classmethod
    def from_state(cls, state: dict, prefix: str, gamma: float = 1.0) -> "CompactLBFGS":
        return cls(*(state[prefix + name] for name in _FIELDS), state[prefix + "count"], gamma,
                   head=state.get(prefix + "head"))

    def _rebuild(self) -> None:
        """L and Rm from S, Y, R^{-1}, Y Y^T, D in the ring layout (O(p^2 d); a state from before the ring)."""
        xp = array_module(self.S)
        p, g = self.memory, self.gamma
        rows = device_arange(xp, p)
        P = self.Rinv @ self.S
        top = _middle(self.YY, self.D[None, :], rows[:, None], rows[None, :], g) @ P
        self.L = xp.ascontiguousarray(xp.concatenate([P, g * self.Y]).T)
        self.Rm = xp.concatenate([top - g * self.Y, -P])

    # --- operator -------------------------------------------------------------------------
    def apply(self, X):
        """H X for a vector (d,) or a matrix (d, k): gamma X + L (Rm X), two GEMMs (the empty
        slots' columns of L and rows of Rm are zero, so they add zeros).

        On NumPy a memory that is not full uses only its filled slots (the first ``count``: the
        head moves only once the ring is full), so the GEMMs' inner dimension is 2 count, not
        2 memory; reading ``count`` is free on the host. A device keeps the fixed shapes (reading
        it would synchronise, and a captured graph needs fixed addresses)."""
        L, Rm = self.L, self.Rm
        if type(self.count) is numpy.ndarray:
            p, c = self.memory, int(self.count)
            if c < p and int(self.head) == 0:
                L = numpy.concatenate([L[:, :c], L[:, p:p + c]], axis=1)
                Rm = numpy.concatenate([Rm[:c], Rm[p:p + c]])
        out = matvec(L, matvec(Rm, X))
        add_scaled_(out, X, self.gamma)
        return out

    __call__ = apply

    def dense(self):
        """The d x d matrix H (for tests and inspection)."""
        xp = array_module(self.S)
        return self.apply(xp.eye(self.dim, dtype=self.S.dtype))

    def age_order(self):
        """The slots from the oldest pair to the newest (host ints; for tests and inspection)."""
        head, count = int(self.head), int(self.count)
        return [(head + j) % self.memory for j in range(count)]

    def push(self, s, y, store=True, *, delta=None, yy=None, slot=None) -> None:
        """Append the pair (s, y) where ``store`` holds, dropping the oldest if full.

        ``store`` is a bool or a 0-d boolean array (s^T y > 0 is the caller's check); on a
        device it is never read on the host. ``delta`` = s^T y and ``yy`` = y^T y (0-d) may come
        from the caller (K-BFGS(L) has them from its damping); otherwise one fused reduction.
        ``slot``: the slot to write when the caller has already advanced ``count`` and ``head``
        (with :func:`advance_formula` inside its own kernel).
        """
        xp = array_module(self.S, s, y)
        store = xp.asarray(store, dtype=bool)
        if delta is None or yy is None:
            dots = inner_products((s, y), (y, y))
            delta, yy = dots[0], dots[1]
        p, g = self.memory, self.gamma
        rows = device_arange(xp, p)
        w = _advance_(self.count, self.head, store, p) if slot is None else slot  # count and head move on
        LTy = matvec(self.L.T, y)                         # [P y; gamma Y y] (old P, old Y)
        Rb, gYy = LTy[:p], LTy[p:]
        _set_at_(self.D, rows, w, store, delta)
        middle = _border_(self.Rinv, self.YY, Rb[:, None], gYy[:, None], gYy[None, :], self.D[None, :],
                          rows[:, None], rows[None, :], w, store, delta, yy, g)
        _new_rows_(self.S, self.Y, self.L[:, :p].T, self.L[:, p:].T, self.Rm[p:], s[None, :], y[None, :],
                   Rb[:, None], rows[:, None], w, store, delta, g)
        _top_(self.Rm[:p], middle @ self.Rm[p:], self.Y, g)  # (D + gamma Y Y^T) P - gamma Y, with Rm's -P


# --- the fused pieces of a push (:meth:`CompactLBFGS.push`) ----------------------------------------
def write_slot(xp, count, head, store, p):
    """(w, full): the slot a stored pair goes to and whether it drops the oldest (a formula)."""
    full = count == p
    return (head + count) % p, full


def advance_formula(xp, count, head, store, p):
    """Advance ``count`` and ``head`` in place for a push (where ``store``); returns the slot written
    (a formula for fused kernels; :meth:`CompactLBFGS.push` with ``slot``)."""
    w, full = write_slot(xp, count, head, store, p)
    new_count = xp.where(store & ~full, count + 1, count)
    new_head = xp.where(store & full, (head + 1) % p, head)
    count[...] = new_count
    head[...] = new_head
    return w  # computed before the writes


@fused
def _advance_(xp, count, head, store, p):
    return advance_formula(xp, count, head, store, p)


@fused
def _set_at_(xp, D, rows, w, store, delta):
    D[...] = xp.where((rows == w) & store, delta, D)


@fused
def _border_(xp, Rinv, YY, Rb_col, gYy_col, gYy_row, D_row, r_col, r_row, w, store, delta, yy, g):
    """R^{-1} and Y Y^T bordered in place at slot w (where ``store``); returns D + gamma Y Y^T."""
    at_r, at_c = (r_col == w) & store, (r_row == w) & store
    inv_delta = 1 / xp.where(store, delta, 1)
    rinv = xp.where(at_c, xp.where(at_r, inv_delta, -Rb_col * inv_delta), xp.where(at_r, 0, Rinv))
    yy_new = xp.where(at_c, xp.where(at_r, yy, gYy_col / g), xp.where(at_r, gYy_row / g, YY))
    Rinv[...] = rinv
    YY[...] = yy_new
    return g * yy_new + xp.where(r_col == r_row, D_row, 0)


@fused
def _new_rows_(xp, S, Y, PT, gYT, Rm_low, s_row, y_row, Rb_col, r_col, w, store, delta, g):
    """Slot w of S and Y (where ``store``), P's rank-one update into L's left block (transposed) and
    Rm's lower block (-P), and gamma Y into L's right block."""
    at = (r_col == w) & store
    inv_delta = 1 / xp.where(store, delta, 1)
    P_new = xp.where(at, inv_delta * s_row, xp.where(store, PT + (-Rb_col * inv_delta) * s_row, PT))
    Y_new = xp.where(at, y_row, Y)
    S[...] = xp.where(at, s_row, S)
    Y[...] = Y_new
    PT[...] = P_new
    Rm_low[...] = -P_new
    gYT[...] = g * Y_new


@fused
def _top_(xp, Rm_top, M_negP, Y, g):
    Rm_top[...] = -M_negP - g * Y


@fused
def _middle(xp, YY, D_row, r_col, r_row, g):
    return g * YY + xp.where(r_col == r_row, D_row, 0)  # D + gamma Y Y^T
