"""Reused host buffers for the large temporaries of a pass on NumPy (the convolutions' patch matrices).

Why: glibc serves an allocation above its mmap threshold (the largest block freed so far, at most
32 MB) with fresh pages from the kernel and unmaps them when the block is freed, and it returns
the top of its heap to the kernel once more than twice that is free there. A CNN pass that makes
and drops a 10 MB patch matrix every time therefore touches fresh pages every time: 4,200 page
faults per LeNet-5 pass at batch 128 (float32), about 2 us each on the 2-core VM of the README's
CPU-speed table, a third of the pass. A buffer taken here outlives its users and is handed out
again for the next request of the same shape and dtype, so its pages stay mapped.

A pooled buffer is free when nothing but the pool refers to it, read from its reference count: any
holder (a cache, a local variable, a view, whose ``base`` is the buffer) keeps it out of
circulation, so a buffer is never handed out twice. Pools are per thread, hold at most
:data:`PER_SHAPE` buffers of a shape, and at most :data:`MAX_BYTES` in all (the shapes used least
recently are dropped first; a dropped buffer lives on with its holders as an ordinary array).
CuPy arrays come from CuPy's own memory pool (``xp.empty``), which already reuses device blocks.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections import OrderedDict

import numpy

__all__ = ["empty", "pooling", "MIN_BYTES", "MAX_BYTES", "PER_SHAPE"]

#: smaller requests are plain ``numpy.empty`` (glibc keeps reusing small blocks itself)
MIN_BYTES = 1 << 17
#: the most one thread's pool keeps (least recently used shapes are dropped first)
MAX_BYTES = 512 << 20
#: the most buffers kept for one (shape, dtype)
PER_SHAPE = 4

_LOCAL = threading.local()


def _counts(bufs) -> list[int]:
    """The reference count of each buffer of ``bufs``, as read from here."""
    return [sys.getrefcount(b) for b in bufs]


#: what :func:`_counts` reads for a buffer that only the pool's list holds (measured on this
#: interpreter, whose count of borrowed references may differ from another's)
_HELD = _counts([numpy.empty(1)])[0]


def _pool() -> OrderedDict:
    pool = getattr(_LOCAL, "pool", None)
    if pool is None:
        pool = _LOCAL.pool = OrderedDict()
        _LOCAL.bytes = 0
        _LOCAL.on = True
    return pool


@contextlib.contextmanager
def pooling(on: bool):
    """Turn this thread's pool on or off inside the block (off: every request is a fresh array)."""
    _pool()
    old, _LOCAL.on = _LOCAL.on, bool(on)
    try:
        yield
    finally:
        _LOCAL.on = old


def empty(xp, shape, dtype):
    """An uninitialised array of ``shape`` and ``dtype`` on ``xp``: on NumPy, a pooled buffer when
    one of the request's shape is free (its old contents remain; write every element)."""
    dtype = numpy.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    if xp is not numpy:
        return xp.empty(shape, dtype=dtype)
    pool = _pool()
    nbytes = dtype.itemsize * int(numpy.prod(shape, dtype=numpy.int64))
    if not _LOCAL.on or nbytes < MIN_BYTES or nbytes > MAX_BYTES:
        return numpy.empty(shape, dtype=dtype)
    key = (shape, dtype)
    bufs = pool.get(key)
    if bufs is None:
        bufs = pool[key] = []
    pool.move_to_end(key)
    for b, count in zip(bufs, _counts(bufs)):
        if count <= _HELD:
            return b
    out = numpy.empty(shape, dtype=dtype)
    if len(bufs) < PER_SHAPE:
        bufs.append(out)
        _LOCAL.bytes += nbytes
        while _LOCAL.bytes > MAX_BYTES:  # drop the least recently used shapes
            (old_shape, old_dtype), old = pool.popitem(last=False)
            _LOCAL.bytes -= len(old) * old_dtype.itemsize * int(numpy.prod(old_shape, dtype=numpy.int64))
    return out
