"""Shared fixtures: the array module under test (NumPy always, CuPy when a CUDA device exists)."""

from __future__ import annotations

import numpy
import pytest

from engine import backend


def _xp_params():
    params = [pytest.param(numpy, id="numpy")]
    if backend.cupy_available():
        import cupy
        params.append(pytest.param(cupy, id="cupy", marks=pytest.mark.cupy))
    else:
        params.append(pytest.param(None, id="cupy", marks=pytest.mark.skip(reason="CuPy: no usable CUDA device")))
    return params


@pytest.fixture(params=_xp_params())
def xp(request):
    """The array module a test body runs under; the CuPy case skips cleanly without a GPU."""
    return request.param
