"""engine.backend pins CuPy's GEMM math to full precision when CuPy is selected: no TF32 and no
reduced-precision complex GEMM on the complex-step path, even with ``CUPY_TF32=1`` in the
environment (tests/cupy_standin.py models CuPy's per-dtype compute types and the cuBLAS math mode)."""

from __future__ import annotations

import importlib

import numpy

from engine import backend


def test_cupy_gemm_math_is_pinned_to_full_precision(cupy_only, monkeypatch):
    cp = cupy_only
    monkeypatch.setenv("CUPY_TF32", "1")
    linalg = importlib.import_module("cupy._core._routines_linalg")
    tf32 = next(i for i in range(16) if linalg.compute_type_to_str(i) == "COMPUTE_TYPE_TF32")
    linalg.set_compute_type(numpy.float32, tf32)  # what CUPY_TF32=1 (or anyone) may have set
    info = backend.pin_exact_gemm_math(cp)
    for dtype in (numpy.float32, numpy.complex64, numpy.float64, numpy.complex128):
        assert linalg.compute_type_to_str(linalg.get_compute_type(dtype)) == "COMPUTE_TYPE_DEFAULT", dtype
    from cupy_backends.cuda.libs import cublas
    if getattr(cp, "_standin", False):
        assert cublas.getMathMode(cp.cuda.device.get_cublas_handle()) == cublas.CUBLAS_DEFAULT_MATH
    assert info["float32_compute_type"] == "COMPUTE_TYPE_DEFAULT" and "no TF32" in info["gemm_compute_type"]
    assert backend.GEMM_MATH == info


def test_the_complex_step_through_a_device_gemm_keeps_full_precision(cupy_only):
    """A complex64 GEMM of the complex-step pass: Im / h equals the real product of the direction to
    float32 rounding (TF32 would leave ~1e-3 relative error)."""
    cp = cupy_only
    backend.pin_exact_gemm_math(cp)
    rng = numpy.random.default_rng(0)
    a, v, b = (rng.standard_normal((64, 64)).astype(numpy.float32) for _ in range(3))
    h = numpy.float32(1e-20)
    z = cp.asarray(a.astype(numpy.complex64) + 1j * h * v.astype(numpy.complex64)) @ cp.asarray(b.astype(numpy.complex64))
    exact = v.astype(numpy.float64) @ b.astype(numpy.float64)
    numpy.testing.assert_allclose(cp.asnumpy(z).imag / h, exact, rtol=2e-4, atol=2e-4 * numpy.abs(exact).max())

