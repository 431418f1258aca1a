"""Shared fixtures: the array module under test.

Every test that takes ``xp`` runs twice: under NumPy, and under CuPy. The CuPy half runs on
the real CuPy when a CUDA device answers; with ``CSTEP_CUPY=standin`` in the environment it runs
on the strict stand-in of ``tests/cupy_standin.py`` instead (installed here as ``cupy`` before
anything imports CuPy, so ``engine.backend`` finds and auto-selects it exactly as it would a
real device: tests that use the active backend run on it too). Otherwise the CuPy half is
skipped, and it carries the ``cupy`` mark either way, so ``pytest -m cupy`` selects (and, with
no device, cleanly skips) exactly the CuPy halves.
"""

from __future__ import annotations

import os

import numpy
import pytest

_MODE = os.environ.get("CSTEP_CUPY", "").strip().lower()
if _MODE not in ("", "standin", "real"):
    raise pytest.UsageError(f"CSTEP_CUPY={_MODE!r}: use 'standin' (the NumPy-backed CuPy stand-in) or unset it")
if _MODE == "standin":
    from tests import cupy_standin

    cupy_standin.install()

from engine import backend  # noqa: E402 (after the stand-in is in place)


def _cupy_module():
    """The CuPy the CuPy halves run on (real or stand-in), or None."""
    if backend.cupy_available():
        import cupy
        return cupy
    return None


CUPY = _cupy_module()
STANDIN = CUPY is not None and getattr(CUPY, "_standin", False)


def _xp_params():
    params = [pytest.param(numpy, id="numpy")]
    if CUPY is not None:
        params.append(pytest.param(CUPY, id="cupy", marks=pytest.mark.cupy))
    else:
        params.append(pytest.param(None, id="cupy", marks=[pytest.mark.cupy,
                                                          pytest.mark.skip(reason="CuPy: no usable CUDA device "
                                                                           "(CSTEP_CUPY=standin runs the stand-in)")]))
    return params


@pytest.fixture(params=_xp_params())
def xp(request):
    """The array module a test body runs under; the CuPy case skips cleanly without a GPU."""
    return request.param


@pytest.fixture
def cupy_only():
    """The CuPy module (real or stand-in) for a test that only makes sense on the device."""
    if CUPY is None:
        pytest.skip("CuPy: no usable CUDA device (CSTEP_CUPY=standin runs the stand-in)")
    return CUPY


def pytest_report_header(config):
    if STANDIN:
        return "cstep: CuPy halves run on the NumPy-backed stand-in (CSTEP_CUPY=standin)"
    if CUPY is not None:
        return f"cstep: CuPy halves run on CuPy {CUPY.__version__} (CUDA device present)"
    return "cstep: CuPy halves skipped (no CUDA device; CSTEP_CUPY=standin runs the stand-in)"
