"""Compact representation of the L-BFGS inverse Hessian (Byrd, Nocedal, Schnabel 1994,
Math. Programming 63:129-156, Theorem 2.2), as K-BFGS(L) uses it (kbfgs.md section 5).

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
"""

from __future__ import annotations

from engine.backend import array_module, get_xp

from .bfgs import matvec

__all__ = ["CompactLBFGS"]

_FIELDS = ("S", "Y", "Rinv", "YY", "D", "L", "Rm")


class CompactLBFGS:
    """L-BFGS inverse-Hessian operator in compact form, ``memory`` pairs of length ``dim``.

    Arrays (capacity p = ``memory``): ``S``, ``Y`` (p x d), ``Rinv``, ``YY`` (p x p), ``D`` (p),
    cached ``L`` (d x 2p) and ``Rm`` (2p x d), of which the leading ``count`` rows/columns
    (``2 count`` for L and Rm) are valid. An empty memory is gamma I.
    """

    def __init__(self, S, Y, Rinv, YY, D, L, Rm, count: int, gamma: float = 1.0):
        self.S, self.Y, self.Rinv, self.YY, self.D, self.L, self.Rm = S, Y, Rinv, YY, D, L, Rm
        self.count = int(count)
        self.gamma = float(gamma)

    @classmethod
    def empty(cls, dim: int, memory: int, dtype, xp=None, gamma: float = 1.0) -> "CompactLBFGS":
        if memory < 1 or dim < 1:
            raise ValueError(f"CompactLBFGS needs memory >= 1 and dim >= 1, got memory={memory}, dim={dim}")
        xp = xp or get_xp()
        z = lambda *shape: xp.zeros(shape, dtype=dtype)  # noqa: E731
        return cls(z(memory, dim), z(memory, dim), z(memory, memory), z(memory, memory), z(memory),
                   z(dim, 2 * memory), z(2 * memory, dim), 0, gamma)

    @property
    def memory(self) -> int:
        return self.S.shape[0]

    @property
    def dim(self) -> int:
        return self.S.shape[1]

    # --- state ----------------------------------------------------------------------------
    def to_state(self, prefix: str) -> dict:
        """Flat state entries ``prefix + name`` (arrays are shared, not copied)."""
        out = {prefix + name: getattr(self, name) for name in _FIELDS}
        out[prefix + "count"] = self.count
        return out

    @classmethod
    def from_state(cls, state: dict, prefix: str, gamma: float = 1.0) -> "CompactLBFGS":
        return cls(*(state[prefix + name] for name in _FIELDS), int(state[prefix + "count"]), gamma)

    # --- operator -------------------------------------------------------------------------
    def apply(self, X):
        """H X for a vector (d,) or a matrix (d, k): gamma X + L (Rm X), two GEMMs."""
        m = self.count
        if m == 0:
            return self.gamma * X
        out = matvec(self.L[:, : 2 * m], matvec(self.Rm[: 2 * m], X))
        out += self.gamma * X
        return out

    __call__ = apply

    def dense(self):
        """The d x d matrix H (for tests and inspection)."""
        xp = array_module(self.S)
        return self.apply(xp.eye(self.dim, dtype=self.S.dtype))

    def push(self, s, y) -> None:
        """Append the pair (s, y) (s^T y > 0 is the caller's check), dropping the oldest if full."""
        p = self.memory
        m = self.count
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
        self.count = m + 1
        self._rebuild()

    def _rebuild(self) -> None:
        """Recompute the cached L and Rm from S, Y, R^{-1}, YY, D (O(m^2 d))."""
        xp = array_module(self.S)
        m, g = self.count, self.gamma
        P = self.Rinv[:m, :m] @ self.S[:m]                    # R^{-1} S  (m x d)
        middle = g * self.YY[:m, :m]
        middle[xp.arange(m), xp.arange(m)] += self.D[:m]      # D + gamma Y Y^T
        self.L[:, :m] = P.T
        self.L[:, m: 2 * m] = g * self.Y[:m].T
        self.Rm[:m] = middle @ P - g * self.Y[:m]
        self.Rm[m: 2 * m] = -P
