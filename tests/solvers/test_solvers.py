"""Every registered solver through one test body (optax style): it trains a small autoencoder
from a fixed seed, its state round-trips through HDF5 bit for bit, its info record is complete.

Each body runs under NumPy and on the device (the ``xp`` fixture); the device run is also
compared with the NumPy run of the same steps (tests/solvers/common.py)."""

import h5py
import numpy
import pytest

from engine.backend import array_module, is_device_array, to_host
from engine.app.runfile import read_record, write_record
from nets import mlp
from solvers import SOLVERS, make_solver
from tests.solvers.common import assert_same_record, copy_state, host_float, on, to_np, twin

#: settings that train the tiny problem below in a few dozen steps
HYPER = {
    "sgd": {"lr": 0.5},
    "adam": {"lr": 0.01},
    "rmsprop": {"lr": 0.005},
    "kbfgs": {"lr": 0.3, "damping": 0.3},
    "kbfgs_l": {"lr": 0.3, "damping": 0.3, "memory": 4},
    "kfac": {"lr": 0.3, "damping": 0.3, "inverse_freq": 3},
    "shampoo": {"lr": 0.01, "precondition_every": 3},
    "soap": {"lr": 0.01, "precondition_frequency": 3},
    "muon": {"lr": 0.05, "adam_lr": 0.05},
    "adahessian": {},
    "sophia": {"lr": 0.01},
}
OURS = sorted(HYPER)


def problem(dtype=numpy.float64, xp=numpy):
    """The tiny 8-6-3-6-8 autoencoder and three batches of 32 (arrays of ``xp``)."""
    model = mlp([8, 6, 3, 6, 8], ["relu", "linear", "relu", "linear"], "sigmoid_xent", weight_decay=1e-5)
    rng = numpy.random.default_rng(0)
    x = (rng.random((96, 8)) < 0.4).astype(dtype) * rng.random((96, 8)).astype(dtype)
    return model, on(xp, [(x[i:i + 32], x[i:i + 32]) for i in range(0, 96, 32)])


def solver_names():
    # the solvers of the K-BFGS paper (this module tests them; other solvers have their own tests)
    return sorted(set(OURS) & set(SOLVERS))


def build(name, model):
    return make_solver(name, model, **HYPER.get(name, {}))


def start(name, dtype=numpy.float64, xp=numpy):
    model, data = problem(dtype, xp)
    solver = build(name, model)
    params = model.init(seed=9999, dtype=dtype, xp=xp)
    state = solver.init(params)
    if solver.needs_warm_start:
        state = solver.warm_start(params, state, data)
    return model, data, solver, params, state


def mean_loss(model, params, data):
    return float(numpy.mean([host_float(model.loss(params, x, y)) for x, y in data]))


def h5_round_trip(state, path):
    """Write a flat state to HDF5 (arrays as datasets, scalars as attributes) and read it back.

    h5py takes host arrays only: device arrays are copied to the host explicitly and come back
    to the device they came from.
    """
    with h5py.File(path, "w") as f:
        for key, value in state.items():
            if isinstance(value, numpy.ndarray) or is_device_array(value):
                f.create_dataset(key, data=to_host(value))
            else:
                f.attrs[key] = value
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda key, obj: out.__setitem__(key, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        for key, value in f.attrs.items():
            out[key] = value
    assert set(out) == set(state)
    for key, value in state.items():
        if is_device_array(value):
            out[key] = array_module(value).asarray(out[key])
    return out


def run_steps(xp, name, steps=45):
    """``steps`` iterations from the fixed start: the losses seen and the final parameters."""
    model, data, solver, params, state = start(name, xp=xp)
    before = mean_loss(model, params, data)
    losses = []
    for k in range(steps):
        params, state, info = solver.step(params, state, *data[k % len(data)])
        losses.append(to_np(info["loss"]))
    return {"before": before, "after": mean_loss(model, params, data), "losses": losses,
            "params": to_np(model.flatten(params))}


@pytest.mark.parametrize("name", solver_names())
def test_decreases_the_loss(name, xp):
    run = twin(xp, run_steps, name)
    assert all(numpy.isfinite(loss) for loss in run["losses"])
    before, after = float(run["before"]), float(run["after"])
    assert after < 0.9 * before, f"{name}: {before:.4f} -> {after:.4f}"


def runfile_round_trip(state, path):
    """The same through the project's run-file records (engine.runfile): device arrays come back
    to the device, host-only fields (generator words) stay on the host."""
    xp = next((array_module(v) for v in state.values() if is_device_array(v)), numpy)
    with h5py.File(path, "w") as f:
        write_record(f.create_group("solver_state"), state)
    with h5py.File(path, "r") as f:
        return read_record(f["solver_state"], array_module=xp, template=state)


@pytest.mark.parametrize("dtype,writer", [(numpy.float64, "h5py"), (numpy.float32, "h5py"), (numpy.float32, "runfile")])
@pytest.mark.parametrize("name", solver_names())
def test_state_round_trips_through_hdf5_bit_for_bit(name, dtype, writer, tmp_path, xp):
    """step, save state (HDF5), load, step == two steps, exactly (CuPy to CuPy on the device half)."""
    model, data, solver, params, state = start(name, dtype, xp)
    assert_resume_bit_for_bit(model, data, solver, params, state, lambda: build(name, model), dtype, writer, tmp_path)


def assert_resume_bit_for_bit(model, data, solver, params, state, fresh_solver, dtype, writer, tmp_path):
    """Two steps straight == one step, state through HDF5 into ``fresh_solver()``, one step: exactly.

    Starts after two steps so the k = 0 special cases are behind; ``data`` holds three batches.
    """
    for k in range(2):
        params, state, _ = solver.step(params, state, *data[k])

    def copy(params, state):
        return model.unflatten(model.flatten(params)), copy_state(state)

    pa, sa = copy(params, state)  # run A: two more steps straight
    pa, sa, _ = solver.step(pa, sa, *data[2])
    pa, sa, info_a = solver.step(pa, sa, *data[0])
    pb, sb = copy(params, state)  # run B: one step, state through HDF5 and a fresh solver, one step
    pb, sb, _ = solver.step(pb, sb, *data[2])
    sb = (h5_round_trip if writer == "h5py" else runfile_round_trip)(sb, tmp_path / "state.h5")
    assert set(sb) == set(sa)
    pb, sb, info_b = fresh_solver().step(pb, sb, *data[0])
    xp = array_module(*pa)
    for p, q in zip(pa, pb):
        assert p.dtype == dtype
        assert array_module(q) is xp  # the resumed run stays on its backend
        assert numpy.array_equal(to_np(p), to_np(q))
    for key in sa:
        assert is_device_array(sa[key]) == is_device_array(sb[key]), key
        assert numpy.array_equal(to_np(sa[key]), to_np(sb[key])), key
    assert host_float(info_a["loss"]) == host_float(info_b["loss"])


def first_step_info(xp, name):
    model, data, solver, params, state = start(name, xp=xp)
    params, state, info = solver.step(params, state, *data[0])
    for key in ("loss", "grad_norm", "step_norm"):
        assert key in info and numpy.ndim(info[key]) == 0
    loss0 = host_float(model.loss(model.init(seed=9999, xp=xp), *data[0]))
    return {"info": {k: to_np(v) for k, v in info.items()}, "loss0": loss0, "k": int(state["k"])}


@pytest.mark.parametrize("name", solver_names())
def test_info_record(name, xp):
    run = twin(xp, first_step_info, name)
    info = run["info"]
    assert float(info["loss"]) == pytest.approx(float(run["loss0"]), rel=1e-12)
    extra = {"kbfgs": ("powell_damping", "lm_damping", "skipped_H_g", "skipped_H_a"),
             "kbfgs_l": ("powell_damping", "lm_damping", "skipped_H_g", "skipped_H_a"),
             "kfac": ("inverses_refreshed",)}
    for key in extra.get(name, ()):
        assert key in info
    assert int(run["k"]) == 1


def test_unknown_hyper_parameter_is_named():
    model, _ = problem()
    with pytest.raises(ValueError, match="no hyper-parameter 'alpha'"):
        make_solver("kbfgs", model, alpha=0.3)


@pytest.mark.parametrize("name", solver_names())
def test_state_moves_between_backends(name, cupy_only, tmp_path):
    """A run file written on NumPy resumes on the device and one written on the device resumes on
    NumPy (read with the other backend's fresh state as template); either continuation agrees
    with the NumPy run that never moved."""
    def two_steps(xp):
        model, data, solver, params, state = start(name, xp=xp)
        for k in range(2):
            params, state, _ = solver.step(params, state, *data[k])
        return model, data, solver, params, state

    model, data, solver, params, state = two_steps(numpy)
    stay_p, stay_s = model.unflatten(model.flatten(params)), copy_state(state)
    stay_p, stay_s, stay_info = solver.step(stay_p, stay_s, *data[2])
    for source, target in ((numpy, cupy_only), (cupy_only, numpy)):
        model, data, solver, params, state = two_steps(source)
        path = tmp_path / f"{source.__name__}.h5"
        with h5py.File(path, "w") as f:
            write_record(f.create_group("state"), state)
            f.create_dataset("params", data=to_np(model.flatten(params)))
        _, tdata, tsolver, tparams, template = start(name, xp=target)
        with h5py.File(path, "r") as f:
            moved = read_record(f["state"], array_module=target, template=template)
            tparams = model.unflatten(target.asarray(f["params"][()]))
        assert set(moved) == set(template)
        for key, value in moved.items():
            assert is_device_array(value) == is_device_array(template[key]), key
        tparams, moved, info = tsolver.step(tparams, moved, *tdata[2])
        got = {"params": to_np(model.flatten(tparams)), "loss": to_np(info["loss"])}
        want = {"params": to_np(model.flatten(stay_p)), "loss": to_np(stay_info["loss"])}
        assert_same_record(got, want, f"{name} {source.__name__} -> {target.__name__}")


#: state fields that live on the host by design: K-FAC's PCG64 generator words (the target draws
#: are made on the host so that NumPy and the device draw the same targets)
HOST_FIELDS = {"rng"}


@pytest.mark.parametrize("name", solver_names())
def test_state_lives_with_the_parameters(name, xp):
    """Every state array is an array of the parameters' module (after init, warm start and a step),
    apart from the documented host fields; scalars are Python scalars."""
    model, data, solver, params, state = start(name, xp=xp)
    for when in ("start", "step"):
        for key, value in state.items():
            if key in HOST_FIELDS:
                assert isinstance(value, numpy.ndarray), (when, key)
            elif hasattr(value, "shape"):
                assert array_module(value) is xp and isinstance(value, xp.ndarray), (when, key, type(value))
            else:
                assert isinstance(value, (bool, int, float)), (when, key, type(value))
        params, state, _ = solver.step(params, state, *data[0])
