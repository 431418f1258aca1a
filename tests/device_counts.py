"""Counting what a piece of code asks of the device: host syncs and array launches.

``with device_work(xp) as work: ...`` then ``work.syncs`` (a Counter of call sites) and
``work.launches``. On the CuPy stand-in both are counted exactly (tests/cupy_standin.py); on a
real CuPy device launches are not observable and syncs are enforced instead: the block runs
under ``cupyx.allow_synchronize(False)`` when ``forbid_syncs`` is set, so a sync raises. On
NumPy there is no device: nothing is counted and the assertions that use this skip.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field

import numpy
import pytest


@dataclass
class DeviceWork:
    launches: int = 0
    syncs: collections.Counter = field(default_factory=collections.Counter)
    h2d: int = 0
    d2h: int = 0
    ops: collections.Counter = field(default_factory=collections.Counter)
    exact: bool = True

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def __str__(self) -> str:
        sites = ", ".join(f"{k} x{v}" for k, v in self.syncs.most_common())
        return f"{self.launches} launches, {self.n_syncs} syncs ({sites or 'none'}), {self.h2d} host-to-device copies"


@contextlib.contextmanager
def device_work(xp, forbid_syncs: bool = False):
    """Count device work done inside the block (see the module docstring)."""
    if xp is numpy:
        pytest.skip("device work is counted on CuPy (real or the stand-in), not on NumPy")
    work = DeviceWork()
    if getattr(xp, "_standin", False):
        before = xp.counters.copy()
        try:
            yield work
        finally:
            delta = xp.counters - before
            work.launches, work.syncs, work.h2d, work.d2h, work.ops = delta.launches, delta.syncs, delta.h2d, delta.d2h, delta.ops
        return
    import cupyx  # the real CuPy: syncs raise inside the block, launches are not counted

    work.exact = False
    if forbid_syncs:
        with cupyx.allow_synchronize(False):
            yield work
    else:
        yield work
