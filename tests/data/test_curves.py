"""CURVES: the generated substitute is deterministic, has the documented shapes and range, is
cached; the original digs3pts_1.mat (v5 or v7.3) is used when supplied and validated."""

import time
import warnings

import h5py
import numpy as np
import pytest
import scipy.io

import data
import data.curves as curves
from data import DataError


def test_same_seed_same_bytes_other_seed_other_images():
    a_train, a_test = curves.make_curves(120, 60, seed=3)
    b_train, b_test = curves.make_curves(120, 60, seed=3)
    assert a_train.tobytes() == b_train.tobytes() and a_test.tobytes() == b_test.tobytes()
    c_train, _ = curves.make_curves(120, 60, seed=4)
    assert not np.array_equal(a_train, c_train)
    assert not np.array_equal(a_train[:60], a_test)  # independent streams for train and test


def test_smaller_set_is_a_prefix_of_a_larger_one():
    small, small_test = curves.make_curves(30, 10, seed=1)
    big, big_test = curves.make_curves(2500, 40, seed=1)  # spans several render chunks
    assert small.tobytes() == big[:30].tobytes() and small_test.tobytes() == big_test[:10].tobytes()


def test_shapes_range_and_strokes():
    d = data.load("curves", n_train=400, n_test=100)
    assert d.x_train.shape == (400, 784) and d.x_test.shape == (100, 784) and d.x_train.dtype == np.float32
    assert d.substitute and d.is_autoencoder and "substitute" in d.description
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    per_image_max = d.x_train.max(axis=1)
    assert per_image_max.min() > 0.5  # every image has a visible stroke
    ink = (d.x_train > 0.5).sum(axis=1)
    assert 10 < np.median(ink) < 150  # a curve, not a blob or a dot
    assert data.load("curves", dtype=np.float64, n_train=400, n_test=100).x_train.dtype == np.float64


def test_default_set_builds_fast_and_is_cached(isolated_dirs):
    t0 = time.perf_counter()
    d = data.load("curves")
    elapsed = time.perf_counter() - t0
    assert d.x_train.shape == (20000, 784) and d.x_test.shape == (10000, 784)
    assert elapsed < 30, f"default CURVES-like set took {elapsed:.1f} s"
    assert len(list((isolated_dirs / "curves").glob("*.npz"))) == 1


def test_cache_hit_returns_identical_arrays(isolated_dirs, monkeypatch):
    first = data.load("curves", n_train=50, n_test=20, seed=7)
    (path,) = (isolated_dirs / "curves").glob("*.npz")
    assert "seed7" in path.name and "50x20" in path.name

    def no_build(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(curves, "make_curves", no_build)
    again = data.load("curves", n_train=50, n_test=20, seed=7)
    assert again.x_train.tobytes() == first.x_train.tobytes() and again.x_test.tobytes() == first.x_test.tobytes()
    as64 = data.load("curves", dtype="float64", n_train=50, n_test=20, seed=7)
    np.testing.assert_array_equal(as64.x_train, first.x_train.astype(np.float64))


def test_unreadable_cache_is_rebuilt_and_cache_false_writes_nothing(isolated_dirs):
    first = data.load("curves", n_train=50, n_test=20)
    (path,) = (isolated_dirs / "curves").glob("*.npz")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.warns(UserWarning, match="rebuilding"):
        again = data.load("curves", n_train=50, n_test=20)
    assert again.x_train.tobytes() == first.x_train.tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load("curves", n_train=50, n_test=20)  # the rebuilt cache reads cleanly
    data.load("curves", n_train=60, n_test=20, cache=False)
    assert len(list((isolated_dirs / "curves").glob("*.npz"))) == 1


def fake_original(rng, n_train=30, n_test=10):
    return {"bdata": rng.random((n_train, 784)), "bdatatest": rng.random((n_test, 784))}


def test_original_file_is_used_when_supplied(tmp_path):
    v = fake_original(np.random.default_rng(0))
    (tmp_path / "curves").mkdir()
    scipy.io.savemat(tmp_path / "curves" / "digs3pts_1.mat", v)
    d = data.load("curves", tmp_path)
    assert not d.substitute and d.source.endswith("digs3pts_1.mat")
    np.testing.assert_array_equal(d.x_train, v["bdata"].astype(np.float32))
    np.testing.assert_array_equal(d.x_test, v["bdatatest"].astype(np.float32))
    assert data.load("curves", tmp_path, n_train=5, n_test=3).x_train.shape == (5, 784)
    assert data.load("curves", tmp_path, source="generated", n_train=5, n_test=3).substitute


def test_original_matlab_v73_file(tmp_path):
    v = fake_original(np.random.default_rng(1))
    with h5py.File(tmp_path / "digs3pts_1.mat", "w") as f:  # MATLAB v7.3 stores the transpose
        for k, a in v.items():
            f[k] = a.T
    d = data.load("curves", tmp_path, dtype=np.float64, source="original")
    np.testing.assert_array_equal(d.x_train, v["bdata"])


@pytest.mark.parametrize("spoil, message", [
    (lambda v: v["bdata"].__setitem__((3, 5), np.nan), "NaN or Inf"),
    (lambda v: v["bdatatest"].__setitem__((0, 0), 1.5), r"must lie in \[0, 1\]"),
    (lambda v: v.__setitem__("bdata", np.zeros((30, 100))), r"expected shape \('N', 784\)"),
    (lambda v: v.pop("bdatatest"), "has no variable 'bdatatest'"),
])
def test_bad_original_file_raises(tmp_path, spoil, message):
    v = fake_original(np.random.default_rng(2))
    spoil(v)
    path = tmp_path / "digs3pts_1.mat"
    scipy.io.savemat(path, v)
    with pytest.raises(DataError, match=message) as e:
        data.load("curves", tmp_path)
    assert str(path) in str(e.value)


def test_foreign_or_missing_original_raises(tmp_path):
    with pytest.raises(DataError, match="digs3pts_1.mat is not in"):
        data.load("curves", tmp_path, source="original")
    (tmp_path / "digs3pts_1.mat").write_bytes(b"this is not a MATLAB file" * 20)
    with pytest.raises(DataError, match="cannot be read as a MATLAB .mat file"):
        data.load("curves", tmp_path)


@pytest.mark.parametrize("kw", [dict(n_train=0), dict(n_test=2.5), dict(seed=-1), dict(source="web"),
                                dict(dtype=np.float16)])
def test_bad_arguments_raise(kw):
    with pytest.raises(DataError):
        data.load("curves", **kw)
