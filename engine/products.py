"""Matrix products that know the complex step: real GEMMs only, 2 or 3 of them where a complex GEMM costs 4.

A complex GEMM (the library's ``a @ b`` on a complex operand) does four real products' work.
The complex-step pass (docs/complex-step.md section 5.2) multiplies real data and labels by
complex weights, and complex activations by complex weights, so:

* **real by complex** (either order) is exactly two real products, ``a Re b`` and ``a Im b``,
  for ANY complex operand: nothing is dropped. With the complex operand C-contiguous on the right
  they are one real GEMM on its interleaved float view (``b.view(float)`` is ``[Re b, Im b]``
  column pairs), with no copy in or out.
* **complex by complex** ``(A + iB)(C + iD) = AC - BD + i(AD + BC)``. Inside a complex-step pass
  (:func:`complex_step`, entered by :class:`engine.curvature.HessianCS` and by anyone who
  evaluates at ``w + i h v`` with a tiny h) every imaginary part is a first-order perturbation,
  ``B = h B1 + O(h^3)``, ``D = h D1 + O(h^3)``, so ``BD = h^2 B1 D1`` is relatively O(h^2) of
  ``AC``: 1e-60 at h = 1e-30 in complex128 (and 1e-24 at complex64's h = 1e-12), far below one
  rounding (1.1e-16, 6e-8). Adding it cannot change a rounded ``AC`` unless AC itself cancels to
  ~1e-44 of its terms, and it enters the imaginary part (the Hessian-vector product) only at
  order h^3, the complex step's own truncation order. So the product is ``AC + i(AD + BC)``:
  three real GEMMs, no subtraction. This holds only for such a perturbation: for a general
  complex operand (a complex-valued network, a complex step with a large h, a layer's complex
  input in a gradient check) BD is a full-size term. Outside :func:`complex_step`, or when the
  declared step is too large (``h > eps`` of the real precision, where h^2 would no longer sit
  below rounding), complex-by-complex products are the library's full complex GEMM.

The imaginary part is computed by the same sums as the complex GEMM's (``AD + BC``) and the real
part differs from it only by the dropped ``-BD``; tests/engine/test_products.py checks the pass
against the 40-digit Hessian (tests/reference.py) as tightly as the full products.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy

from .backend import array_module

__all__ = ["matmul", "complex_step", "drops_second_order"]

#: the step h of the complex-step pass in progress (None: not in one)
_STEP: contextvars.ContextVar = contextvars.ContextVar("cstep_complex_step", default=None)


@contextlib.contextmanager
def complex_step(h: float):
    """Declare that the complex values in this block are ``x + i h v`` with a first-order perturbation ``h v``.

    ``h`` is the step relative to the real parts (the perturbation's size; :class:`HessianCS` uses
    a unit-norm direction). Inside, complex-by-complex :func:`matmul` drops the O(h^2) term when
    h is below the precision's eps (see the module docstring); real-by-complex products are
    split into real ones whether declared or not.
    """
    token = _STEP.set(float(h))
    try:
        yield
    finally:
        _STEP.reset(token)


def drops_second_order(dtype) -> bool:
    """Whether complex-by-complex products of ``dtype`` drop the h^2 term here (inside :func:`complex_step`
    with h <= eps of the real precision)."""
    h = _STEP.get()
    if h is None:
        return False
    return h <= float(numpy.finfo(numpy.dtype(dtype)).eps)


def _real_by_complex(a, b):
    """a (real, ... x m x k) @ b (complex, ... x k x n) as one real GEMM (per matrix of a stack) on
    b's interleaved float view."""
    xp = array_module(a, b)
    cdtype = numpy.result_type(a.dtype, b.dtype)
    b = xp.ascontiguousarray(b, dtype=cdtype)
    *lead, k, n = b.shape
    rdtype = b.real.dtype
    out = a.astype(rdtype, copy=False) @ b.view(rdtype).reshape(*lead, k, 2 * n)
    return out.view(cdtype)


def _t(a):
    """The transpose of a matrix or of each matrix of a stack (a view)."""
    return a.swapaxes(-1, -2)


def _real_copy(v):
    """A BLAS-ready copy of a real or imaginary part view (a transposed layout stays transposed)."""
    return v.copy(order="K")


def matmul(a, b, out=None):
    """``a @ b`` for matrices or stacks of them (broadcast as ``@`` does), with real GEMMs only where a complex operand is involved (see the module docstring).

    Same values as ``a @ b`` (up to summation order) except inside :func:`complex_step`, where a
    complex-by-complex product omits the O(h^2) term. The result is complex when either operand is.
    ``out``: where to write a real product (as ``xp.matmul``'s ``out``); a complex one ignores it and
    allocates, so use the returned array.
    """
    ac, bc = a.dtype.kind == "c", b.dtype.kind == "c"
    if not (ac or bc):
        return a @ b if out is None else array_module(a, b).matmul(a, b, out=out)
    if ac and bc:
        if not drops_second_order(a.dtype):
            return a @ b
        # AC + i(AD + BC): [AC | AD] from one real-by-complex GEMM, then BC into the imaginary part
        out = _real_by_complex(_real_copy(a.real), b)
        out.imag += _real_copy(a.imag) @ _real_copy(b.real)
        return out
    if bc:
        return _real_by_complex(a, b)
    # complex @ real = (real^T @ complex^T)^T
    return _t(_real_by_complex(_t(b), _t(a)))
