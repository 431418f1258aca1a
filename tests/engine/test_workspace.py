"""engine.workspace: a pooled buffer is handed out again only when nothing but the pool holds it."""

import numpy
import pytest

from engine import workspace

SHAPE = (512, 1024)  # 2 MiB of float32: above MIN_BYTES


@pytest.fixture(autouse=True)
def fresh_pool(monkeypatch):
    monkeypatch.setattr(workspace, "_LOCAL", type(workspace._LOCAL)())


def test_reused_once_released():
    a = workspace.empty(numpy, SHAPE, numpy.float32)
    address = a.ctypes.data
    del a
    b = workspace.empty(numpy, SHAPE, numpy.float32)
    assert b.ctypes.data == address and b.shape == SHAPE and b.dtype == numpy.float32


@pytest.mark.parametrize("hold", ["array", "view", "transposed view", "tuple", "memoryview"])
def test_never_handed_out_while_held(hold):
    a = workspace.empty(numpy, SHAPE, numpy.float32)
    a[...] = 1.0
    holder = {"array": lambda: a, "view": lambda: a.reshape(-1)[3:], "transposed view": lambda: a.T,
              "tuple": lambda: (a, SHAPE), "memoryview": lambda: memoryview(a)}[hold]()
    address = a.ctypes.data
    del a
    others = [workspace.empty(numpy, SHAPE, numpy.float32) for _ in range(workspace.PER_SHAPE + 2)]
    assert all(o.ctypes.data != address for o in others)
    for o in others:
        o[...] = 2.0
    assert numpy.asarray(holder[0] if hold == "tuple" else holder).reshape(-1)[0] == 1.0


def test_distinct_shapes_and_dtypes_and_small_requests():
    a = workspace.empty(numpy, SHAPE, numpy.float32)
    address = a.ctypes.data
    del a
    assert workspace.empty(numpy, SHAPE, numpy.float64).ctypes.data != address
    assert workspace.empty(numpy, SHAPE[::-1], numpy.float32).ctypes.data != address
    small = workspace.empty(numpy, (4, 4), numpy.float32)
    del small
    assert not any(key[0] == (4, 4) for key in workspace._pool())


def test_pooling_off_gives_fresh_arrays():
    a = workspace.empty(numpy, SHAPE, numpy.float32)
    address = a.ctypes.data
    del a
    with workspace.pooling(False):
        b = workspace.empty(numpy, SHAPE, numpy.float32)
    assert b.ctypes.data != address


def test_pool_bounded(monkeypatch):
    monkeypatch.setattr(workspace, "MAX_BYTES", 3 * 2 * 1024 * 1024)
    held = [workspace.empty(numpy, (512, 1024 + k), numpy.float32) for k in range(6)]
    assert workspace._LOCAL.bytes <= workspace.MAX_BYTES
    assert len(workspace._pool()) <= 3
    assert all(h.shape == (512, 1024 + k) for k, h in enumerate(held))


def test_device_arrays_come_from_their_module(cupy_only):
    cupy = cupy_only
    a = workspace.empty(cupy, SHAPE, numpy.float32)
    assert isinstance(a, cupy.ndarray) and a.shape == SHAPE
