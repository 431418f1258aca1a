"""Every registered solver through one test body (optax style): it trains a small autoencoder
from a fixed seed, its state round-trips through HDF5 bit for bit, its info record is complete."""

import h5py
import numpy
import pytest

from nets import mlp
from solvers import SOLVERS, make_solver

#: settings that train the tiny problem below in a few dozen steps
HYPER = {
    "sgd": {"lr": 0.5},
    "adam": {"lr": 0.01},
    "rmsprop": {"lr": 0.005},
    "kbfgs": {"lr": 0.3, "damping": 0.3},
    "kbfgs_l": {"lr": 0.3, "damping": 0.3, "memory": 4},
    "kfac": {"lr": 0.3, "damping": 0.3, "inverse_freq": 3},
}
OURS = sorted(HYPER)


def problem(dtype=numpy.float64):
    model = mlp([8, 6, 3, 6, 8], ["relu", "linear", "relu", "linear"], "sigmoid_xent", weight_decay=1e-5)
    rng = numpy.random.default_rng(0)
    x = (rng.random((96, 8)) < 0.4).astype(dtype) * rng.random((96, 8)).astype(dtype)
    return model, [(x[i:i + 32], x[i:i + 32]) for i in range(0, 96, 32)]


def solver_names():
    # the solvers of the K-BFGS paper (this module tests them; other solvers have their own tests)
    return sorted(set(OURS) & set(SOLVERS))


def build(name, model):
    return make_solver(name, model, **HYPER.get(name, {}))


def start(name, dtype=numpy.float64):
    model, data = problem(dtype)
    solver = build(name, model)
    params = model.init(seed=9999, dtype=dtype)
    state = solver.init(params)
    if solver.needs_warm_start:
        state = solver.warm_start(params, state, data)
    return model, data, solver, params, state


def mean_loss(model, params, data):
    return float(numpy.mean([model.loss(params, x, y) for x, y in data]))


def h5_round_trip(state, path):
    """Write a flat state to HDF5 (arrays as datasets, scalars as attributes) and read it back."""
    with h5py.File(path, "w") as f:
        for key, value in state.items():
            if isinstance(value, numpy.ndarray):
                f.create_dataset(key, data=value)
            else:
                f.attrs[key] = value
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda key, obj: out.__setitem__(key, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        for key, value in f.attrs.items():
            out[key] = value
    assert set(out) == set(state)
    return out


@pytest.mark.parametrize("name", solver_names())
def test_decreases_the_loss(name):
    model, data, solver, params, state = start(name)
    before = mean_loss(model, params, data)
    for k in range(45):
        params, state, info = solver.step(params, state, *data[k % len(data)])
        assert numpy.isfinite(float(info["loss"]))
    after = mean_loss(model, params, data)
    assert after < 0.9 * before, f"{name}: {before:.4f} -> {after:.4f}"


def runfile_round_trip(state, path):
    """The same through the project's run-file records (engine.runfile)."""
    from engine.runfile import read_record, write_record
    with h5py.File(path, "w") as f:
        write_record(f.create_group("solver_state"), state)
    with h5py.File(path, "r") as f:
        return read_record(f["solver_state"])


@pytest.mark.parametrize("dtype,writer", [(numpy.float64, "h5py"), (numpy.float32, "h5py"), (numpy.float32, "runfile")])
@pytest.mark.parametrize("name", solver_names())
def test_state_round_trips_through_hdf5_bit_for_bit(name, dtype, writer, tmp_path):
    """step, save state (HDF5), load, step == two steps, exactly."""
    model, data, solver, params, state = start(name, dtype)
    assert_resume_bit_for_bit(model, data, solver, params, state, lambda: build(name, model), dtype, writer, tmp_path)


def assert_resume_bit_for_bit(model, data, solver, params, state, fresh_solver, dtype, writer, tmp_path):
    """Two steps straight == one step, state through HDF5 into ``fresh_solver()``, one step: exactly.

    Starts after two steps so the k = 0 special cases are behind; ``data`` holds three batches.
    """
    for k in range(2):
        params, state, _ = solver.step(params, state, *data[k])

    def copy(params, state):
        return model.unflatten(model.flatten(params)), {k: (v.copy() if isinstance(v, numpy.ndarray) else v) for k, v in state.items()}

    pa, sa = copy(params, state)  # run A: two more steps straight
    pa, sa, _ = solver.step(pa, sa, *data[2])
    pa, sa, info_a = solver.step(pa, sa, *data[0])
    pb, sb = copy(params, state)  # run B: one step, state through HDF5 and a fresh solver, one step
    pb, sb, _ = solver.step(pb, sb, *data[2])
    sb = (h5_round_trip if writer == "h5py" else runfile_round_trip)(sb, tmp_path / "state.h5")
    assert set(sb) == set(sa)
    pb, sb, info_b = fresh_solver().step(pb, sb, *data[0])
    for p, q in zip(pa, pb):
        assert p.dtype == dtype
        assert numpy.array_equal(p, q)
    for key in sa:
        assert numpy.array_equal(numpy.asarray(sa[key]), numpy.asarray(sb[key])), key
    assert float(info_a["loss"]) == float(info_b["loss"])


@pytest.mark.parametrize("name", solver_names())
def test_info_record(name):
    model, data, solver, params, state = start(name)
    params, state, info = solver.step(params, state, *data[0])
    for key in ("loss", "grad_norm", "step_norm"):
        assert key in info and numpy.ndim(info[key]) == 0
    assert float(info["loss"]) == pytest.approx(float(model.loss(model.init(seed=9999), *data[0])), rel=1e-12)
    extra = {"kbfgs": ("powell_damping", "lm_damping", "skipped_H_g", "skipped_H_a"),
             "kbfgs_l": ("powell_damping", "lm_damping", "skipped_H_g", "skipped_H_a"),
             "kfac": ("inverses_refreshed",)}
    for key in extra.get(name, ()):
        assert key in info
    assert int(state["k"]) == 1


def test_unknown_hyper_parameter_is_named():
    model, _ = problem()
    with pytest.raises(ValueError, match="no hyper-parameter 'alpha'"):
        make_solver("kbfgs", model, alpha=0.3)
