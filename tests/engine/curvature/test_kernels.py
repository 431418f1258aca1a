"""engine.curvature.kernels: the fused in-place factor updates equal their array expressions, and numba
only ever sees host arrays (on a device the array expressions run instead)."""

import numpy
import pytest

import engine.curvature.kernels as kernels
from engine.curvature.kernels import scaled_ema_, symmetric_rank2_update_
from tests.solvers.common import to_np, twinned


@pytest.fixture
def numba_sees(monkeypatch):
    """The operand types each numba kernel is called with (the kernels still run)."""
    seen = []
    for name in ("_rank2_numba", "_ema_numba"):
        kernel = getattr(kernels, name, None)
        if kernel is None:
            continue

        def spy(*args, _kernel=kernel, _name=name):
            seen.append((_name, tuple(type(a) for a in args if hasattr(a, "shape") and getattr(a, "ndim", 0) > 0)))
            return _kernel(*args)
        monkeypatch.setattr(kernels, name, spy)
    return seen


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@twinned
def test_symmetric_rank2_update_in_place(xp, dtype, numba_sees):
    rng = numpy.random.default_rng(0)
    d = 9
    q = rng.standard_normal((d, d))
    H0 = (q + q.T).astype(dtype)
    p, r = rng.standard_normal(d).astype(dtype), rng.standard_normal(d).astype(dtype)
    H = xp.asarray(H0.copy())
    out = symmetric_rank2_update_(H, xp.asarray(p), xp.asarray(r))
    assert out is H
    Hn = to_np(H)
    tol = 1e-13 if dtype == numpy.float64 else 1e-5
    numpy.testing.assert_allclose(Hn, H0 + 0.5 * numpy.outer(p, p) - 0.5 * numpy.outer(r, r), rtol=tol, atol=tol)
    assert numpy.array_equal(Hn, Hn.T)  # exactly symmetric
    assert all(t is numpy.ndarray for _, types in numba_sees for t in types)
    if xp is not numpy:
        assert not numba_sees  # device arrays take the array expression
    return {"H": H}


@pytest.mark.parametrize("dtype", [numpy.float64, numpy.float32])
@twinned
def test_scaled_ema_in_place_on_a_block(xp, dtype, numba_sees):
    rng = numpy.random.default_rng(1)
    A0 = rng.standard_normal((6, 6)).astype(dtype)
    B = rng.standard_normal((5, 5)).astype(dtype)
    A = xp.asarray(A0.copy())
    block = A[:5, :5]  # a view, as ema_homogeneous_second_moment_ passes it
    scaled_ema_(block, xp.asarray(B), 0.9, 0.1 / 32)
    An = to_np(A)
    tol = 1e-14 if dtype == numpy.float64 else 1e-6
    numpy.testing.assert_allclose(An[:5, :5], 0.9 * A0[:5, :5] + (0.1 / 32) * B, rtol=tol, atol=tol)
    assert numpy.array_equal(An[5], A0[5]) and numpy.array_equal(An[:, 5], A0[:, 5])
    assert all(t is numpy.ndarray for _, types in numba_sees for t in types)
    if xp is not numpy:
        assert not numba_sees
    return {"A": A}


def test_a_device_operand_never_reaches_numba(cupy_only, numba_sees):
    """A host matrix with a device update (a caller's bug) is refused like CuPy refuses mixing, not
    handed to numba (which would convert the device array implicitly)."""
    H = numpy.eye(4)
    with pytest.raises(TypeError):
        symmetric_rank2_update_(H, cupy_only.ones(4), cupy_only.ones(4))
    with pytest.raises(TypeError):
        scaled_ema_(H, cupy_only.ones((4, 4)), 0.9, 0.1)
    assert not numba_sees
