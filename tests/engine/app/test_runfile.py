"""HDF5 run files (engine/app/runfile.py): lossless records, layout readable with plain h5py, atomic
writes, clear rejection of foreign and damaged files."""

from __future__ import annotations

import json
import os

import h5py
import numpy
import pytest

from engine.app import runfile
from engine.app.environment import environment_info
from engine.backend import to_host
from engine.app.runfile import (FORMAT_VERSION, MAGIC, RunFileError, RunRecord, check_run_file, load_run, read_record,
                            save_run, write_record)


def _sample_record(rng):
    """Every kind of value a solver or iterator state may hold."""
    return {
        "k": 7,
        "big": 1 << 70,  # beyond int64: stored as text, read back exactly
        "lr_scale": 0.1 + 0.2,  # a float whose repr has all 17 digits
        "flag": True,
        "z": complex(1.5, -2.25),
        "name": "kbfgs",
        "nothing": None,
        "np_scalar": numpy.float32(3.25),
        "zero_d": numpy.array(2.5, dtype=numpy.float32),
        "m": rng.standard_normal(17).astype(numpy.float32),
        "layer0/H_g": rng.standard_normal((4, 4)),
        "layer0/cplx": (rng.standard_normal((3, 2)) + 1j * rng.standard_normal((3, 2))).astype(numpy.complex64),
        "layer2/cplx128": rng.standard_normal(5) * (1 - 0.5j),
        "rng": numpy.array([1 << 63, 5, (1 << 64) - 1, 0], dtype=numpy.uint64),
        "empty": numpy.zeros((0, 3)),
        "order": [3, 1.5, "x", None],
        "pair": (1, 2),
        "nested": {"a": 1, "b": numpy.arange(3)},
    }


def _assert_same(a, b):
    assert list(a) == list(b)  # keys and their order
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, dict):
            _assert_same(x, y)
        elif isinstance(x, numpy.ndarray):
            assert isinstance(y, numpy.ndarray), key
            assert x.dtype == y.dtype and x.shape == y.shape, key
            assert x.tobytes() == y.tobytes(), key  # bitwise
        else:
            assert type(x) is type(y), key
            assert x == y, key


def test_record_round_trip_is_lossless(tmp_path):
    rec = _sample_record(numpy.random.default_rng(0))
    with h5py.File(tmp_path / "r.h5", "w") as f:
        write_record(f.create_group("state"), rec)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        back = read_record(f["state"])
        # complex arrays are stored natively (an h5py compound of r/i), not as pairs of reals
        assert f["state/layer0/cplx"].dtype == numpy.complex64
        assert f["state/layer2/cplx128"].dtype == numpy.complex128
        # keys with '/' become sub-groups: one dataset per field
        assert isinstance(f["state/layer0"], h5py.Group)
        assert f["state/k"].shape == ()
    _assert_same(rec, back)


def test_record_rejects_unstorable_values(tmp_path):
    with h5py.File(tmp_path / "r.h5", "w") as f:
        with pytest.raises(TypeError, match="cannot store"):
            write_record(f.create_group("s"), {"f": object()})
        with pytest.raises(ValueError, match="rename"):
            write_record(f.create_group("t"), {"": 1})


def _run_record(rng, steps=5):
    params = [rng.standard_normal((3, 4)).astype(numpy.float32), rng.standard_normal(3).astype(numpy.float32)]
    history = {
        "steps": {"iteration": list(range(1, steps + 1)), "loss": rng.standard_normal(steps).tolist(),
                  "skipped": [bool(i % 2) for i in range(steps)]},
        "epochs": {"epoch": [1], "iterations": [steps], "cpu_time": [0.5], "train_loss": [1.25],
                   "test_loss": [float("nan")]},
    }
    state = {"params": params, "solver_state": _sample_record(rng),
             "iterator": {"epoch": 1, "position": 0, "rng_state": numpy.arange(4, dtype=numpy.uint64)},
             "history": history,
             "progress": {"iteration": steps, "epoch": 1, "warm_started": True, "cpu_time": 0.5, "wall_time": 0.75}}
    config = {"net": "tiny", "solver": "sgd", "seed": 3, "dtype": "float32", "epochs": None, "max_time": 12.5,
              "param_shapes": [[3, 4], [3]]}
    return RunRecord(config=config, hyperparameters={"lr": 0.1, "heavy_ball": False}, state=state,
                     environment={"cstep_version": "0.1.0", "backend": "numpy", "host": "h"},
                     meta={"param_layers": [(0, "Dense"), (0, "Dense")]})


def test_run_file_round_trip_and_layout(tmp_path):
    rec = _run_record(numpy.random.default_rng(1))
    path = save_run(tmp_path / "run.h5", rec)
    back = load_run(path)
    assert back.config == rec.config  # None values survive through the json attribute
    assert back.hyperparameters == rec.hyperparameters
    for p, q in zip(rec.state["params"], back.state["params"]):
        assert p.dtype == q.dtype and p.tobytes() == q.tobytes()
    _assert_same(rec.state["solver_state"], back.state["solver_state"])
    _assert_same(rec.state["iterator"], back.state["iterator"])
    steps, epochs = back.history["steps"], back.history["epochs"]
    assert steps["iteration"] == [1, 2, 3, 4, 5] and all(type(v) is int for v in steps["iteration"])
    assert steps["loss"] == rec.state["history"]["steps"]["loss"]
    assert steps["skipped"] == rec.state["history"]["steps"]["skipped"]
    assert list(epochs) == list(rec.state["history"]["epochs"])
    assert numpy.isnan(epochs["test_loss"][0])
    assert back.progress == rec.state["progress"]
    assert back.environment["backend"] == "numpy"

    # the layout promised in the README, read with plain h5py
    with h5py.File(path, "r") as f:
        assert f.attrs["magic"] == MAGIC and f.attrs["format_version"] == FORMAT_VERSION
        assert f["config"].attrs["solver"] == "sgd" and f["config"].attrs["max_time"] == 12.5
        assert "epochs" not in f["config"].attrs  # None is not an attribute value; it lives in config.attrs["json"]
        assert json.loads(f["config"].attrs["json"])["epochs"] is None
        assert f["config/hyperparameters"].attrs["lr"] == 0.1
        assert f["params/p000"].shape == (3, 4) and f["params/p000"].attrs["layer_type"] == "Dense"
        assert f["progress"].attrs["iteration"] == 5
        loss = f["history/steps/loss"]
        assert loss.maxshape == (None,) and loss.chunks is not None
        assert f["history/epochs/train_loss"][0] == 1.25
        assert f["solver_state/layer0/H_g"].shape == (4, 4)
        assert f["environment"].attrs["host"] == "h"


def test_history_datasets_can_grow_in_place(tmp_path):
    path = save_run(tmp_path / "run.h5", _run_record(numpy.random.default_rng(2)))
    with h5py.File(path, "a") as f:
        ds = f["history/steps/loss"]
        ds.resize((ds.shape[0] + 3,))
        assert ds.shape == (8,)


def test_write_is_atomic_when_it_fails(tmp_path):
    rng = numpy.random.default_rng(3)
    path = save_run(tmp_path / "run.h5", _run_record(rng, steps=5))
    before = path.read_bytes()
    bad = _run_record(rng, steps=9)
    bad.state["solver_state"]["oops"] = object()  # fails half-way through the write
    with pytest.raises(TypeError):
        save_run(path, bad)
    assert path.read_bytes() == before  # the previous checkpoint is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]  # and no temporary file is left


def test_write_replaces_via_rename_and_removes_stale_temps(tmp_path, monkeypatch):
    rng = numpy.random.default_rng(4)
    path = tmp_path / "run.h5"
    stale = tmp_path / ".run.h5.99999.tmp"  # what a writer killed mid-write leaves behind
    stale.write_bytes(b"half a file")
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(runfile.os, "replace", lambda a, b: (calls.append((str(a), str(b))), real_replace(a, b)))
    save_run(path, _run_record(rng))
    assert len(calls) == 1 and calls[0][1] == str(path) and calls[0][0] != str(path)
    assert os.path.dirname(calls[0][0]) == str(tmp_path)  # same directory: rename is atomic
    assert not stale.exists()
    load_run(path)


def test_foreign_and_damaged_files_are_rejected(tmp_path):
    good = save_run(tmp_path / "good.h5", _run_record(numpy.random.default_rng(5)))
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        load_run(text)
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    with pytest.raises(RunFileError, match="not an HDF5 file"):
        load_run(empty)
    with pytest.raises(RunFileError, match="does not exist"):
        load_run(tmp_path / "missing.h5")
    with pytest.raises(RunFileError, match="directory"):
        load_run(tmp_path)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = numpy.arange(3)
    with pytest.raises(RunFileError, match="not a cstep run file"):
        load_run(foreign)
    newer = tmp_path / "newer.h5"
    newer.write_bytes(good.read_bytes())
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(RunFileError, match="newer"):
        load_run(newer)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(RunFileError):
        load_run(truncated)
    gutted = tmp_path / "gutted.h5"
    gutted.write_bytes(good.read_bytes())
    with h5py.File(gutted, "a") as f:
        del f["solver_state"]
    with pytest.raises(RunFileError, match="damaged or incomplete"):
        load_run(gutted)
    assert check_run_file(good) == good


def test_environment_names_versions_and_backend():
    env = environment_info()
    assert env["numpy"] == numpy.__version__ and env["h5py"] == h5py.__version__
    assert env["backend"] in ("numpy", "cupy")
    for key in ("cstep_version", "python", "scipy", "cupy", "host", "platform", "device", "cpu_count"):
        assert key in env


def test_arrays_go_back_where_they_were_written(tmp_path, xp):
    """Device arrays return to the device, host arrays (a generator's words) stay on the host even when
    ``array_module`` is CuPy and no template names them; a template moves a host-written field to the
    device (a NumPy run resumed on CuPy) and a device-written one to the host (the other way)."""
    rec = {"m": xp.arange(4.0), "rng": numpy.array([1, 2, 3, 4, 5, 6], dtype=numpy.uint64), "k": 3}
    with h5py.File(tmp_path / "r.h5", "w") as f:
        write_record(f.create_group("s"), rec)
    with h5py.File(tmp_path / "r.h5", "r") as f:
        back = read_record(f["s"], array_module=xp)
        assert type(back["m"]) is type(rec["m"]) and type(back["rng"]) is numpy.ndarray
        numpy.testing.assert_array_equal(to_host(back["m"]), numpy.arange(4.0))
        moved = read_record(f["s"], array_module=xp, template={"m": numpy.zeros(4), "rng": xp.zeros(6, dtype=numpy.uint64)})
        assert type(moved["m"]) is numpy.ndarray and type(moved["rng"]) is type(xp.zeros(1))
