"""Helpers shared by the solver tests: host copies, device data, and the NumPy twin of a CuPy run.

Every numerical solver test runs its body under the ``xp`` fixture (NumPy, then CuPy or its
stand-in). The CuPy half computes on the device (parameters from ``model.init(..., xp=xp)``, data
through :func:`on`) and checks two things: the test's own assertions (references stay NumPy on the
host and are compared after :func:`to_np`), and that it agrees with the NumPy run of the same body
(:func:`twin`): 1e-12 relative in float64, 1e-5 in float32, integers and flags exactly.
"""

from __future__ import annotations

import functools

import numpy

from engine.backend import is_device_array, to_host

__all__ = ["to_np", "host_float", "on", "copy_state", "twin", "twinned", "assert_same_record", "Tol", "RTOL"]

#: relative agreement asked of a CuPy run with the NumPy run of the same steps
RTOL = {numpy.dtype(numpy.float64): 1e-12, numpy.dtype(numpy.complex128): 1e-12,
        numpy.dtype(numpy.float32): 1e-5, numpy.dtype(numpy.complex64): 1e-5}


class Tol:
    """A record entry compared with its own relative tolerance.

    For the end of a long float32 run: the device and NumPy runs round differently (summation
    orders, fused kernels) and many quasi-Newton steps amplify that, so a long run is compared
    to the dtype's tolerance early on and with ``Tol(final, 1e-3)`` at the end (a real bug still
    shows as an O(1) difference).
    """

    def __init__(self, value, rtol: float):
        self.value, self.rtol = value, rtol


def to_np(a):
    """A NumPy array of ``a`` (device arrays copied to the host explicitly)."""
    return numpy.asarray(to_host(a))


def host_float(a) -> float:
    return float(to_host(a))


def on(xp, data):
    """Batches ``[(x, y), ...]`` (host arrays) as arrays of ``xp``."""
    return [(xp.asarray(x), xp.asarray(y)) for x, y in data]


def copy_state(state: dict) -> dict:
    """A copy of a flat solver state: arrays (host or device) copied, scalars as they are."""
    return {k: (v.copy() if isinstance(v, numpy.ndarray) or is_device_array(v) else v) for k, v in state.items()}


def _host_record(value):
    if isinstance(value, Tol):
        return Tol(_host_record(value.value), value.rtol)
    if isinstance(value, dict):
        return {k: _host_record(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_host_record(v) for v in value]
    if isinstance(value, str) or value is None:
        return value
    return numpy.asarray(to_host(value))


def assert_same_record(got, want, where: str = "run", rtol: float | None = None) -> None:
    """``got`` (the CuPy run) equals ``want`` (the NumPy run) to rounding.

    Records are dicts/lists of arrays and scalars. Floating arrays agree norm-wise,
    ||got - want|| <= rtol ||want|| (rtol from :data:`RTOL` by dtype unless given), integers,
    booleans and strings exactly, and both have the same dtype and shape.
    """
    if isinstance(want, Tol):
        assert_same_record(got.value, want.value, where, want.rtol)
        return
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_same_record(got[k], want[k], f"{where}/{k}", rtol)
        return
    if isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for k, (a, b) in enumerate(zip(got, want)):
            assert_same_record(a, b, f"{where}[{k}]", rtol)
        return
    if isinstance(want, str) or want is None:
        assert got == want, f"{where}: {got!r} != {want!r}"
        return
    a, b = numpy.asarray(to_host(got)), numpy.asarray(to_host(want))
    assert a.shape == b.shape, f"{where}: shape {a.shape} != {b.shape}"
    if b.dtype.kind in "fc":
        assert a.dtype == b.dtype, f"{where}: dtype {a.dtype} != {b.dtype}"
        tol = rtol if rtol is not None else RTOL[b.dtype]
        if numpy.array_equal(a, b, equal_nan=True):
            return
        assert numpy.isfinite(b).all() and numpy.isfinite(a).all(), f"{where}: non-finite values differ"
        err = float(numpy.linalg.norm((a - b).ravel()))
        scale = float(numpy.linalg.norm(b.ravel()))
        assert err <= tol * scale, f"{where}: CuPy and NumPy runs differ by {err / scale if scale else err:.3e} relative (> {tol:g})"
    else:
        assert numpy.array_equal(a, b), f"{where}: {a} != {b}"


def twin(xp, body, *args, rtol: float | None = None, **kwargs):
    """``body(xp, ...)``, and on the CuPy half also ``body(numpy, ...)``: their records must agree.

    ``body`` runs the test's steps and returns a record of what it computed (see
    :func:`assert_same_record`); the record of the ``xp`` run is returned, copied to the host.
    """
    got = _host_record(body(xp, *args, **kwargs))
    if xp is not numpy:
        want = _host_record(body(numpy, *args, **kwargs))
        assert_same_record(got, want, getattr(body, "__name__", "run"), rtol)
    return got


def twinned(body):
    """Decorator: a test body ``body(xp, ...)`` that returns a record runs as :func:`twin` does.

    The test keeps its signature (fixtures and parameters are resolved as usual); on the CuPy half
    the body runs a second time under NumPy and the two records must agree.
    """
    @functools.wraps(body)
    def test(xp, *args, **kwargs):
        twin(xp, body, *args, **kwargs)
    return test
