"""The curvature-operator interface (DESIGN.md convention 4).

Every curvature in cstep is a square linear operator on the flat parameter vector of a model:
``matvec(v)``, ``matmat(V)``, ``shape``, ``dtype`` (real), ``dense()`` for small models and
``to_scipy()`` for ``scipy.sparse.linalg`` (``cupyx.scipy.sparse.linalg`` on CuPy), as in
curvlinops (docs/complex-step.md section 9). Vectors are real: the complex step, where used, lives
inside an operator and never leaks out.

:class:`ModelOperator` is the base of the operators built *at* given parameters on a given batch
(Hessians, Gauss-Newton, Fisher). ``regularized=True`` makes each of them a curvature of the
objective the solvers minimise, data loss + 0.5 tau ||theta||^2: the exact Hessian of the
weight-decay term, tau I, is added to the data-loss curvature.
"""

from __future__ import annotations

import numpy

from ..backend import array_module, is_device_array

__all__ = ["CurvatureOperator", "ModelOperator", "split_norm", "DENSE_LIMIT"]

#: ``dense()`` refuses operators larger than this unless ``force=True`` (n^2 memory, n products).
DENSE_LIMIT = 5000


def split_norm(v):
    """(v / ||v||, ||v||) for a real vector, without overflow, underflow or a host sync.

    ||v|| is computed as s ||v / s|| with s = max_i |v_i|, so components from 1e-300 to 1e+300
    neither square to 0 nor to inf (the LAPACK dnrm2 idea). A zero vector gives (0, 0). Both
    results stay on the device (0-d arrays), so a Krylov loop pays no hidden synchronisation.
    """
    xp = array_module(v)
    if not v.size:
        return v.copy(), xp.zeros((), dtype=v.dtype)
    s = xp.maximum(xp.max(v), -xp.min(v))  # max |v_i| without an |v| temporary
    u = v / xp.where(s > 0, s, 1)
    r = xp.sqrt(u @ u)
    u /= xp.where(r > 0, r, 1)
    return u, s * r


class CurvatureOperator:
    """A real square linear operator on the flat parameter vector (n x n).

    Subclasses implement ``_matvec(v)`` on a 1-D array of ``self.xp`` with dtype ``self.dtype``
    and may override ``_matmat(V)`` (the default applies ``_matvec`` column by column, which is
    what one Hessian-vector pass per direction costs anyway).
    """

    #: Whether the operator is symmetric (``rmatvec`` is then ``matvec``).
    symmetric = True

    def __init__(self, n: int, dtype, xp):
        self.shape = (int(n), int(n))
        self.dtype = numpy.dtype(dtype)
        if self.dtype.kind != "f":
            raise TypeError(f"curvature operators are real; got dtype {self.dtype}")
        self.xp = xp

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"

    # --- input checks -------------------------------------------------------------------
    def _on_device(self, a):
        """``a`` as an array of the operator's module: host data are copied to the device; device
        data for a NumPy operator are refused with a clear message (no hidden device-to-host copy)."""
        if self.xp is numpy and is_device_array(a):
            raise TypeError(f"{type(self).__name__} computes with NumPy (its parameters are host arrays) and got a CuPy array; "
                            "pass engine.backend.to_host(...) of it, or build the operator at device parameters")
        return self.xp.asarray(a)

    def _as_vector(self, v):
        v = self._on_device(v)
        if v.dtype.kind == "c":
            raise TypeError(f"{type(self).__name__} acts on real vectors, got dtype {v.dtype}; pass v.real (or split the real and imaginary parts)")
        if v.ndim == 2 and v.shape[1] == 1:
            v = v[:, 0]
        if v.ndim != 1 or v.shape[0] != self.shape[1]:
            raise ValueError(f"{type(self).__name__} needs a vector of shape ({self.shape[1]},), got {tuple(v.shape)}")
        return v if v.dtype == self.dtype else v.astype(self.dtype)

    def _as_matrix(self, V):
        V = self._on_device(V)
        if V.dtype.kind == "c":
            raise TypeError(f"{type(self).__name__} acts on real matrices, got dtype {V.dtype}")
        if V.ndim != 2 or V.shape[0] != self.shape[1]:
            raise ValueError(f"{type(self).__name__}.matmat needs a matrix of shape ({self.shape[1]}, k), got {tuple(V.shape)}")
        return V if V.dtype == self.dtype else V.astype(self.dtype)

    # --- the interface ------------------------------------------------------------------
    def matvec(self, v):
        """C v for a real vector v of length n (a NumPy vector is moved to the operator's device)."""
        return self._matvec(self._as_vector(v))

    def rmatvec(self, v):
        """C^T v (equal to :meth:`matvec` for symmetric operators)."""
        v = self._as_vector(v)
        return self._matvec(v) if self.symmetric else self._rmatvec(v)

    def matmat(self, V):
        """C V for an n x k real matrix V."""
        return self._matmat(self._as_matrix(V))

    def _matvec(self, v):  # pragma: no cover - abstract
        raise NotImplementedError

    def _rmatvec(self, v):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} is not symmetric and defines no transpose product")

    def _matmat(self, V):
        xp = self.xp
        if V.shape[1] == 0:
            return xp.zeros((self.shape[0], 0), dtype=self.dtype)
        return xp.stack([self._matvec(xp.ascontiguousarray(V[:, j])) for j in range(V.shape[1])], axis=1)

    def __matmul__(self, other):
        other = self._on_device(other)
        return self.matvec(other) if other.ndim == 1 else self.matmat(other)

    def dense(self, force: bool = False):
        """The n x n matrix, as ``matmat`` of the identity (n products).

        Refuses n > :data:`DENSE_LIMIT` unless ``force=True``: beyond that the matrix and the n
        passes it costs are rarely what one wants.
        """
        n = self.shape[0]
        if n > DENSE_LIMIT and not force:
            raise ValueError(f"{type(self).__name__}.dense() would build a {n} x {n} matrix from {n} products; use matvec/to_scipy, or pass force=True")
        return self._matmat(self.xp.eye(n, dtype=self.dtype))

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (NumPy) or ``cupyx.scipy.sparse.linalg.LinearOperator`` (CuPy)."""
        if self.xp is numpy:
            from scipy.sparse.linalg import LinearOperator  # noqa: PLC0415 (import on use)
        else:
            from cupyx.scipy.sparse.linalg import LinearOperator  # noqa: PLC0415

        def mv(v):
            return self.matvec(v.reshape(-1))

        def rmv(v):
            return self.rmatvec(v.reshape(-1))

        def mm(V):
            return self.matmat(V)

        return LinearOperator(self.shape, matvec=mv, rmatvec=rmv, matmat=mm, dtype=self.dtype)


class ModelOperator(CurvatureOperator):
    """A curvature of ``model``'s loss at real ``params`` on the batch (x, y).

    ``params`` is the parameter list (or the flat vector). Floating-point data are used in the
    parameters' precision (a float32 model computes in float32/complex64). With ``regularized``
    the weight-decay Hessian tau I is added (tau = ``model.weight_decay``).
    """

    def __init__(self, model, params, x, y=None, regularized: bool = True):
        # The parameters decide where the operator computes (NumPy or CuPy): host data are
        # copied to their device once, here; device data with host parameters are refused
        # rather than copied back to the host behind the caller's back.
        xp = array_module(*(params if isinstance(params, (list, tuple)) else [params]))
        if xp is numpy:
            for what, a in (("x", x), ("y", y)):
                if is_device_array(a):
                    raise TypeError(f"{type(self).__name__}: the parameters are NumPy arrays but {what} is a CuPy array; "
                                    f"move the parameters to the device (model.init(xp=cupy) or cupy.asarray) or {what} to the host (engine.backend.to_host)")
        if not isinstance(params, (list, tuple)):
            params = model.unflatten(params)
        params = list(params)
        if model.n_params == 0:
            raise ValueError(f"{model.name} has no parameters, so it has no curvature to operate with")
        if len(params) != len(model.shapes):
            raise ValueError(f"{model.name} has {len(model.shapes)} parameter arrays, got {len(params)}")
        for k, (p, s) in enumerate(zip(params, model.shapes)):
            if tuple(p.shape) != tuple(s):
                raise ValueError(f"parameter {k} of {model.name} must have shape {s}, got {tuple(p.shape)}")
        dtype = numpy.dtype(params[0].dtype) if params else numpy.dtype(numpy.float64)
        if dtype.kind == "c":
            raise TypeError(f"{type(self).__name__} is built at real parameters, got {dtype}; the operator adds any imaginary step itself")
        if dtype not in (numpy.float32, numpy.float64) or any(p.dtype != dtype for p in params):
            raise TypeError(f"parameters must all be float32 or all float64, got {sorted({str(p.dtype) for p in params})}")
        super().__init__(model.n_params, dtype, xp)
        self.model = model
        self.params = params
        self.x = self._data(x)
        self.y = self._data(y) if y is not None else None
        self.regularized = bool(regularized)
        self.tau = float(model.weight_decay) if regularized else 0.0
        self._grad = None

    def _data(self, a):
        a = self._on_device(a)
        if a.dtype.kind == "c":
            raise TypeError(f"data stay real (docs/complex-step.md section 2.2), got {a.dtype}")
        if a.dtype.kind == "f" and a.dtype != self.dtype:
            a = a.astype(self.dtype)
        return a

    def gradient(self):
        """The flat (regularised, if ``regularized``) gradient at ``params`` on the batch (cached)."""
        if self._grad is None:
            _, g = self.model.loss_and_grad(self.params, self.x, self.y, regularized=self.regularized)
            self._grad = self.model.flatten(g)
        return self._grad

    def matvec_and_grad(self, v):
        """(C v, gradient at ``params``): the pair a Newton-Krylov step needs. The gradient is
        computed once and cached; :class:`HessianCS` overrides this to get both from one pass."""
        return self.matvec(v), self.gradient()

    def _add_weight_decay(self, hv, v):
        if self.tau:
            hv += self.tau * v
        return hv

