"""One definition of each hot elementwise formula, run as ONE kernel on CuPy and as the plain
formula on NumPy.

A formula is a plain function ``f(xp, *args)`` written only with what CuPy's kernel fusion
accepts (``cupy.fuse``): ufuncs and arithmetic/comparison operators, ``xp.where``, ``xp.real`` /
``xp.imag``, in-place operators writing into an array argument, and at most one reduction
(``xp.sum``/``xp.amax``... with ``axis``) that every output follows. No ``.real`` attribute, no
indexing, no shapes, no Python branching on values: pass views (``z.real``, ``H[:, None]``, 0-d
entries of a small matrix) as arguments instead, and branch with ``where``.

``@fused`` turns such a formula into a callable: on CuPy arrays it is ``cupy.fuse`` of the formula
(compiled once per dtype/ndim signature: one launch per call); on NumPy arrays the formula runs
as written (NumPy evaluates it op by op; the numbers are the same operations in the same order).
Formulas call each other as plain functions (``other.formula(xp, ...)``), never through the
fused wrapper, so a composite kernel stays one kernel.

Caveat of the CuPy kernel (which NumPy shares here): an elementwise kernel's outputs all have
the broadcast shape of ALL its array arguments, so a formula returning a per-layer scalar must
be called with 0-d arguments only. (The CuPy stand-in of the tests models this and refuses
everything real fusion refuses, so misuse fails without a GPU.)
"""

from __future__ import annotations

import contextlib
import functools
import threading

import numpy

from .backend import array_module

__all__ = ["fused", "device_arange", "device_ones", "unfused", "fusion_off"]

_STATE = threading.local()


@contextlib.contextmanager
def unfused():
    """Inside the block every ``@fused`` formula runs op by op on CuPy too (no ``cupy.fuse``), and
    NumPy skips the one-pass kernels of :mod:`engine.host_kernels`: the reference the fused and
    host kernels are tested against, and a switch for debugging on a GPU."""
    old = getattr(_STATE, "off", False)
    _STATE.off = True
    try:
        yield
    finally:
        _STATE.off = old


def fusion_off() -> bool:
    """True inside :func:`unfused` (the one-pass host kernels of :mod:`engine.host_kernels` check it too)."""
    return getattr(_STATE, "off", False)


_CONSTANTS: dict = {}


def _cached(xp, key, make):
    out = _CONSTANTS.get((xp, key))
    if out is None:
        out = _CONSTANTS[(xp, key)] = make()
    return out


def device_arange(xp, n: int, dtype=numpy.int64):
    """The constant [0, 1, ..., n-1] on ``xp``, made once (on the device: no host copy) and reused.
    Callers must not write into it."""
    return _cached(xp, ("arange", n, numpy.dtype(dtype)), lambda: xp.arange(n, dtype=dtype))


def device_ones(xp, n: int, dtype):
    """The constant ones(n) on ``xp`` (e.g. the homogeneous coordinate), made once and reused."""
    return _cached(xp, ("ones", n, numpy.dtype(dtype)), lambda: xp.ones(n, dtype=dtype))


def fused(formula):
    """Decorator: ``formula(xp, *args)`` -> a callable ``(*args)`` fused on CuPy (see the module docstring)."""
    kernels: dict = {}

    @functools.wraps(formula)
    def call(*args):
        xp = array_module(*[a for a in args if hasattr(a, "dtype") and hasattr(a, "ndim")])
        if xp is numpy or fusion_off():
            return formula(xp, *args)
        kernel = kernels.get(xp)
        if kernel is None:
            def body(*a):
                return formula(xp, *a)
            body.__name__ = body.__qualname__ = formula.__name__
            kernel = kernels[xp] = xp.fuse(kernel_name=formula.__name__)(body)
        return kernel(*args)

    call.formula = formula
    return call
