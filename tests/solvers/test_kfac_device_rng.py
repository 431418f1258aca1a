"""K-FAC's Fisher targets drawn on the device (``target_rng="device"``): the keyed counter-based
generator gives the same numbers on NumPy and CuPy, the right distributions, no host-to-device copy
in a step, and a run that resumes from its state continues bit for bit."""

from __future__ import annotations

import numpy
import pytest

from engine.losses import HalfSquaredError, SigmoidCrossEntropy, SoftmaxCrossEntropy, keyed_uniform
from solvers import make_solver
from tests.device_counts import device_work
from tests.solvers.common import copy_state, to_np
from tests.solvers.test_solvers import problem


def test_keyed_draws_have_the_right_distributions_and_depend_on_the_key(xp):
    from engine.losses import _counter_grid
    z = xp.zeros((400, 50))
    u = to_np(keyed_uniform(*_counter_grid(z, 123)))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.003
    assert not numpy.array_equal(u, to_np(keyed_uniform(*_counter_grid(z, 124))))
    logits = numpy.linspace(-3, 3, 40)
    out = xp.asarray(numpy.tile(logits, (2000, 1)).astype(numpy.float32))
    b = to_np(SigmoidCrossEntropy().sample_targets_keyed(out, 5))
    assert b.dtype == numpy.float32 and set(numpy.unique(b)) <= {0.0, 1.0}
    numpy.testing.assert_allclose(b.mean(axis=0), 1 / (1 + numpy.exp(-logits)), atol=0.04)
    g = to_np(HalfSquaredError().sample_targets_keyed(xp.zeros((2000, 30)), 5))
    assert abs(g.mean()) < 0.01 and abs(g.std() - 1) < 0.01
    p = numpy.array([0.2, 0.5, 0.3])
    labels = to_np(SoftmaxCrossEntropy().sample_targets_keyed(xp.asarray(numpy.tile(numpy.log(p), (6000, 1))), 5))
    numpy.testing.assert_allclose(numpy.bincount(labels, minlength=3) / 6000, p, atol=0.02)


def test_keyed_draws_are_the_same_on_numpy_and_the_device(cupy_only):
    xp = cupy_only
    rng = numpy.random.default_rng(0)
    for loss, z in ((SigmoidCrossEntropy(), rng.standard_normal((30, 20)).astype(numpy.float32)),
                    (HalfSquaredError(), rng.standard_normal((30, 20))), (SoftmaxCrossEntropy(), rng.standard_normal((30, 4)))):
        host = loss.sample_targets_keyed(z, 2 ** 62 + 7)
        device = loss.sample_targets_keyed(xp.asarray(z), 2 ** 62 + 7)
        assert numpy.array_equal(host, to_np(device)) and host.dtype == device.dtype


def start(xp):
    model, data = problem(numpy.float64, xp)
    solver = make_solver("kfac", model, target_rng="device", inverse_freq=2)
    params = model.init(seed=9999, dtype=numpy.float64, xp=xp)
    return solver, data, params, solver.warm_start(params, solver.init(params), data)


def steps(solver, data, params, state, ks):
    losses = []
    for k in ks:
        params, state, info = solver.step(params, state, *data[k % len(data)])
        losses.append(float(to_np(info["loss"])))
    return params, state, losses


def test_device_targets_resume_exactly_and_match_numpy(xp):
    solver, data, params, state = start(xp)
    _, _, six = steps(solver, data, params, state, range(6))
    solver, data, params, state = start(xp)
    params, state, _ = steps(solver, data, params, state, range(3))
    saved = copy_state(state)  # what a run file keeps: the generator's words among it
    params = [p.copy() for p in params]
    fresh = make_solver("kfac", solver.model, target_rng="device", inverse_freq=2)
    _, _, resumed = steps(fresh, data, params, saved, range(3, 6))
    assert resumed == six[3:]
    if xp is not numpy:  # the device draws the NumPy run's targets
        solver, data, params, state = start(numpy)
        _, _, host_six = steps(solver, data, params, state, range(6))
        numpy.testing.assert_allclose(six, host_six, rtol=1e-12)


def test_a_device_target_step_copies_nothing_to_the_device(cupy_only):
    xp = cupy_only
    model, data = problem(numpy.float64, xp)
    solver = make_solver("kfac", model, target_rng="device")
    params = model.init(seed=9999, dtype=numpy.float64, xp=xp)
    state = solver.warm_start(params, solver.init(params), data)
    state["k"] = 25  # between refreshes
    params, state, _ = solver.step(params, state, *data[0])
    with device_work(xp) as work:
        solver.step(params, state, *data[1])
    if work.exact:
        assert work.h2d == 0 and work.n_syncs == 0, str(work)


def test_the_option_is_checked():
    model, _ = problem(numpy.float64, numpy)
    with pytest.raises(ValueError, match="target_rng"):
        make_solver("kfac", model, target_rng="gpu")
