"""FACES: the generated substitute (from the real Olivetti file) is deterministic, in range,
samples the documented geometry, and is cached; the original file is split as the reference
protocol does; a wrong source checksum or a missing source raises DataError."""

import shutil

import numpy as np
import pytest
import scipy.io
from scipy import ndimage

import data
import data.faces as faces
from data import DataError


def test_read_olivetti_orientation(faces_dir):
    images, digest = faces.read_olivetti(faces_dir / "faces" / "olivettifaces.mat")
    assert images.shape == (400, 64, 64) and images.dtype == np.float32 and digest == faces.OLIVETTI_SHA256
    assert images.min() >= 0 and abs(images.max() - 242 / 255) < 1e-7
    # upright faces: the forehead/hair (top rows) differs from the chin area, eyes are in the upper half;
    # the mean face is left-right symmetric far more than it is top-bottom symmetric
    mean = images.mean(axis=0)
    assert np.abs(mean - mean[:, ::-1]).mean() < 0.5 * np.abs(mean - mean[::-1, :]).mean()


def test_small_set_shapes_range_determinism(faces_dir):
    a = data.load("faces", faces_dir, n_train=500, n_test=200, cache=False)
    b = data.load("faces", faces_dir, n_train=500, n_test=200, cache=False)
    assert a.x_train.shape == (500, 625) and a.x_test.shape == (200, 625) and a.x_train.dtype == np.float32
    assert a.substitute and a.is_autoencoder and "substitute" in a.description
    assert a.x_train.tobytes() == b.x_train.tobytes() and a.x_test.tobytes() == b.x_test.tobytes()
    assert 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0 and a.x_train.std() > 0.1
    c = data.load("faces", faces_dir, n_train=100, n_test=50, seed=1, cache=False)
    assert not np.array_equal(c.x_train, a.x_train[:100])
    np.testing.assert_array_equal(data.load("faces", faces_dir, n_train=100, n_test=50, cache=False).x_train,
                                  a.x_train[:100])  # prefix property


def test_cache_hit_returns_identical_arrays(faces_dir, isolated_dirs, monkeypatch):
    first = data.load("faces", faces_dir, n_train=300, n_test=100)
    (path,) = (isolated_dirs / "faces").glob("*.npz")
    assert faces.OLIVETTI_SHA256[:16] in path.name

    def no_build(*a, **k):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(faces, "make_faces", no_build)
    again = data.load("faces", faces_dir, n_train=300, n_test=100)
    assert again.x_train.tobytes() == first.x_train.tobytes() and again.x_test.tobytes() == first.x_test.tobytes()


def test_warp_matches_an_independent_sampler():
    rng = np.random.default_rng(0)
    sources = rng.random((5, 64, 64)).astype(np.float32)
    params = rng.random((40, 4))
    params[0] = [0.5, 0.0, 0.5, 0.5]  # no rotation, zoom 1.4, no shift
    params[1] = [1.0 - 1e-12, 1.0 - 1e-12, 0.0, 1.0]  # extremes: +90 degrees, zoom 1.8, corner shifts
    which = rng.integers(0, 5, 40)
    out = faces.warp_faces(sources, which, params).reshape(40, 25, 25)
    theta = np.deg2rad(-90 + 180 * params[:, 0])
    scale = 1.4 + 0.4 * params[:, 1]
    k = (np.arange(25) - 12) * 64 / 25
    vv, uu = np.meshgrid(k, k, indexing="ij")
    for i in range(40):
        c, s = np.cos(theta[i]) / scale[i], np.sin(theta[i]) / scale[i]
        rows = 31.5 + 3 * (2 * params[i, 2] - 1) + c * vv - s * uu
        cols = 31.5 + 3 * (2 * params[i, 3] - 1) + s * vv + c * uu
        ref = ndimage.map_coordinates(sources[which[i]].astype(np.float64), [rows, cols], order=1, mode="nearest")
        np.testing.assert_allclose(out[i], ref, atol=2e-5)


def test_train_and_test_come_from_different_people(faces_dir, monkeypatch):
    seen = []
    real = faces._generate
    monkeypatch.setattr(faces, "_generate", lambda src, pool, n, rng: seen.append(pool) or real(src, pool, n, rng))
    data.load("faces", faces_dir, n_train=10, n_test=10, cache=False)
    train_pool, test_pool = seen
    assert set(train_pool // 10) == set(range(25)) and set(test_pool // 10) == set(range(30, 40))


def test_source_checksum_and_missing_source(faces_dir, tmp_path):
    with pytest.raises(DataError, match="olivettifaces.mat .* is not in"):
        data.load("faces", tmp_path / "nothing", n_train=10, n_test=10)
    (tmp_path / "faces").mkdir()
    copy = tmp_path / "faces" / "olivettifaces.mat"
    shutil.copyfile(faces_dir / "faces" / "olivettifaces.mat", copy)
    raw = bytearray(copy.read_bytes())
    raw[60] ^= 0x01  # one character of the descriptive header text: still a valid .mat file
    copy.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="SHA-256 is") as e:
        data.load("faces", tmp_path, n_train=10, n_test=10)
    assert str(copy) in str(e.value) and "verify=False" in str(e.value)
    assert data.load("faces", tmp_path, n_train=10, n_test=10, verify=False).x_train.shape == (10, 625)
    raw[-1000] ^= 0x01  # inside the compressed data: the file is corrupt
    copy.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="cannot be read as a MATLAB .mat file"):
        data.load("faces", tmp_path, n_train=10, n_test=10, verify=False)


def test_original_file_split_as_the_reference_protocol(tmp_path):
    cols = np.random.default_rng(3).random((625, 400)).astype(np.float32)  # 40 * 10 "images"
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": cols})
    d = data.load("faces", tmp_path)
    assert not d.substitute
    np.testing.assert_array_equal(d.x_train, cols.T[:250])   # first total/40*25
    np.testing.assert_array_equal(d.x_test, cols.T[-100:])   # last total/40*10
    assert data.load("faces", tmp_path, n_train=7, n_test=3).x_test.shape == (3, 625)
    scipy.io.savemat(tmp_path / "newfaces_rot_single.mat", {"newfaces_single": cols[:, :399]})
    with pytest.raises(DataError, match=r"shape \(625, 399\)"):
        data.load("faces", tmp_path)
    with pytest.raises(DataError, match="newfaces_rot_single.mat is not in"):
        data.load("faces", tmp_path / "other", source="original")
