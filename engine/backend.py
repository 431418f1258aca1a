"""Array backend: CuPy on a usable CUDA device, NumPy otherwise (DESIGN.md convention 1).

The choice is made once, at first use. ``CSTEP_BACKEND=numpy|cupy`` overrides it; asking for
CuPy where it cannot run is an error that says why. Array math in the engine goes through the
module returned by :func:`get_xp` (or :func:`array_module` of the operands, so the same function
works on NumPy and CuPy arrays alike); host-side bookkeeping converts explicitly with
:func:`to_host`.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

import numpy

__all__ = [
    "BackendError",
    "get_xp",
    "backend_name",
    "array_module",
    "cupy_available",
    "pin_exact_gemm_math",
    "to_host",
    "is_device_array",
    "to_device",
    "data_address",
    "synchronize",
    "complex_dtype",
    "real_dtype",
    "as_complex",
]


class BackendError(RuntimeError):
    """The requested array backend cannot be used on this machine."""


_XP: ModuleType | None = None
_CUPY: ModuleType | None = None
_CUPY_REASON: str | None = None


def _probe_cupy() -> ModuleType | None:
    """Import CuPy and check that a CUDA device answers; remember why not, if not."""
    global _CUPY, _CUPY_REASON
    if _CUPY is not None or _CUPY_REASON is not None:
        return _CUPY
    try:
        import cupy  # noqa: PLC0415 (optional dependency)
    except Exception as exc:  # ImportError, or a broken CUDA install raising at import
        _CUPY_REASON = f"CuPy is not importable ({type(exc).__name__}: {exc}); install cstep[cuda12] or cstep[cuda13]"
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            _CUPY_REASON = "CuPy found no CUDA device"
            return None
        cupy.zeros(1).sum().item()  # a real kernel launch: catches driver/toolkit mismatches
    except Exception as exc:
        _CUPY_REASON = f"CuPy cannot use a CUDA device ({type(exc).__name__}: {exc})"
        return None
    try:
        pin_exact_gemm_math(cupy)
    except Exception as exc:  # a CuPy without these internals: say so, never run with TF32 silently
        _CUPY_REASON = f"CuPy's GEMM math mode cannot be pinned to full precision ({type(exc).__name__}: {exc})"
        return None
    _CUPY = cupy
    return cupy


#: what :func:`pin_exact_gemm_math` set, for the run file's environment record
GEMM_MATH: dict = {}


def pin_exact_gemm_math(cp) -> dict:
    """No TF32 and no reduced-precision GEMM on the device, whatever the environment says.

    The complex-step Hessian-vector product needs every product of the complex pass at full
    working precision (docs/complex-step.md): TF32 (10-bit mantissa) or a 3M complex GEMM would
    destroy it. CuPy's GEMMs (``tensordot_core``: gemmEx with a compute type chosen per dtype)
    take TF32 for float32/complex64 when ``CUPY_TF32=1``; here the compute type of both real and
    complex dtypes is pinned to CuPy's COMPUTE_TYPE_DEFAULT (CUBLAS_COMPUTE_32F / _64F: full
    precision, never the 3M or TF32 algorithms), and the cuBLAS handle's math mode to
    CUBLAS_DEFAULT_MATH (the legacy s/c/zgemm paths). Returns what was set.
    """
    # CuPy's GEMM compute types live in its (Cython) internals; the module of ``cp`` itself
    linalg = importlib.import_module(cp.__name__ + "._core._routines_linalg")
    default = next(i for i in range(16) if linalg.compute_type_to_str(i) == "COMPUTE_TYPE_DEFAULT")
    for dtype in (numpy.float32, numpy.float64):  # the index of float32 is complex64's, float64's complex128's
        linalg.set_compute_type(dtype, default)
    from cupy_backends.cuda.libs import cublas  # noqa: PLC0415 (CuPy's own package, present with CuPy)
    cublas.setMathMode(cp.cuda.device.get_cublas_handle(), cublas.CUBLAS_DEFAULT_MATH)
    GEMM_MATH.clear()
    GEMM_MATH.update({"gemm_compute_type": "COMPUTE_TYPE_DEFAULT (CUBLAS_COMPUTE_32F/64F; no TF32, no 3M)",
                      "cublas_math_mode": "CUBLAS_DEFAULT_MATH",
                      "float32_compute_type": linalg.compute_type_to_str(linalg.get_compute_type(numpy.float32))})
    return dict(GEMM_MATH)


def cupy_available() -> bool:
    """True when CuPy imports and a CUDA device runs a kernel."""
    return _probe_cupy() is not None


def get_xp() -> ModuleType:
    """The active array module (``numpy`` or ``cupy``), chosen once per process."""
    global _XP
    if _XP is None:
        want = os.environ.get("CSTEP_BACKEND", "").strip().lower()
        if want not in ("", "numpy", "cupy"):
            raise BackendError(f"CSTEP_BACKEND={want!r} is not a backend; use 'numpy' or 'cupy'")
        if want == "numpy":
            _XP = numpy
        elif want == "cupy":
            cp = _probe_cupy()
            if cp is None:
                raise BackendError(f"CSTEP_BACKEND=cupy was requested but {_CUPY_REASON}; unset it to run on NumPy")
            _XP = cp
        else:
            _XP = _probe_cupy() or numpy
    return _XP


def backend_name() -> str:
    """'numpy' or 'cupy'."""
    return get_xp().__name__


def _module_of(a) -> ModuleType | None:
    """The CuPy module owning ``a`` when ``a`` is a CuPy array, else None.

    Decided by the array's type, not by whether the backend was probed: a CuPy array can only
    exist once ``cupy`` is imported, so its module is in ``sys.modules`` (the tests' CuPy
    stand-in is found the same way).
    """
    t = type(a)
    if t is numpy.ndarray or t.__module__.partition(".")[0] != "cupy":
        return None
    cp = sys.modules.get("cupy")
    return cp if cp is not None and isinstance(a, cp.ndarray) else None


def array_module(*arrays) -> ModuleType:
    """The array module that owns ``arrays``: cupy if any operand is a CuPy array, else numpy.

    Unlike :func:`get_xp` this follows the data, so one function body serves both libraries
    (the tests run the same body under NumPy and CuPy). It needs no probe of the device.
    """
    for a in arrays:
        cp = _module_of(a)
        if cp is not None:
            return cp
    return numpy


def is_device_array(a) -> bool:
    """True for a CuPy array (device memory), False for host data."""
    return _module_of(a) is not None


def to_host(a):
    """A NumPy array (or Python scalar) with the value of ``a``; a no-op for host data.

    The one explicit device-to-host transfer (a host sync on CuPy).
    """
    cp = _module_of(a)
    return cp.asnumpy(a) if cp is not None else a


def to_device(a, xp: ModuleType | None = None, dtype=None):
    """``a`` as an array of ``xp`` (default: the active backend), optionally cast to ``dtype``."""
    xp = xp or get_xp()
    return xp.asarray(a, dtype=dtype)


def data_address(a) -> int:
    """The address of the first element of ``a`` (host or device memory): views of one buffer are
    recognised by their addresses, without touching the data."""
    if isinstance(a, numpy.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr


def synchronize(xp: ModuleType | None = None) -> None:
    """Wait for queued GPU work (for honest timings); a no-op on NumPy.

    ``xp`` is the module whose work to wait for (default: the active backend).
    """
    xp = xp or _XP
    if xp is not None and xp is not numpy:
        xp.cuda.get_current_stream().synchronize()


_COMPLEX = {numpy.dtype(numpy.float64): numpy.dtype(numpy.complex128),
            numpy.dtype(numpy.float32): numpy.dtype(numpy.complex64)}
_REAL = {v: k for k, v in _COMPLEX.items()}


def complex_dtype(dtype) -> numpy.dtype:
    """float64 -> complex128, float32 -> complex64 (complex dtypes map to themselves)."""
    dt = numpy.dtype(dtype)
    if dt in _REAL:
        return dt
    try:
        return _COMPLEX[dt]
    except KeyError:
        raise TypeError(f"dtype {dt} has no complex partner; use float32 or float64") from None


def real_dtype(dtype) -> numpy.dtype:
    """complex128 -> float64, complex64 -> float32 (real dtypes map to themselves)."""
    dt = numpy.dtype(dtype)
    if dt in _COMPLEX:
        return dt
    try:
        return _REAL[dt]
    except KeyError:
        raise TypeError(f"dtype {dt} has no real partner; use complex64 or complex128") from None


def as_complex(a):
    """``a`` cast to its complex partner dtype (explicit, so NEP 50 promotion never picks it)."""
    return a.astype(complex_dtype(a.dtype), copy=False)
