"""Directory resolution: explicit data_dir, then CSTEP_DATA_DIR, then the cache; cache from
CSTEP_CACHE_DIR, then XDG_CACHE_HOME, then ~/.cache. Files: data dir before cache."""

from pathlib import Path

import numpy as np
import pytest

from data import resolve_cache_dir, resolve_data_dir
from data.paths import atomic_write, find_file, search_dirs


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CSTEP_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("CSTEP_CACHE_DIR")
    assert resolve_cache_dir() == tmp_path / "xdg" / "cstep"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_cache_dir() == tmp_path / "home" / ".cache" / "cstep"


def test_data_dir_precedence(monkeypatch, tmp_path, isolated_dirs):
    assert resolve_data_dir() == isolated_dirs and search_dirs() == [isolated_dirs]
    monkeypatch.setenv("CSTEP_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"
    assert search_dirs(str(tmp_path / "arg")) == [tmp_path / "arg", isolated_dirs]


def test_find_file_prefers_data_dir_and_subfolder(tmp_path, isolated_dirs):
    for p in (isolated_dirs / "x" / "a.bin", tmp_path / "d" / "a.bin", tmp_path / "d" / "x" / "a.bin"):
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"1")
    assert find_file("x", ["a.bin"], tmp_path / "d") == tmp_path / "d" / "x" / "a.bin"
    assert find_file("x", ["a.bin"], tmp_path / "none") == isolated_dirs / "x" / "a.bin"
    assert find_file("x", ["b.bin"], tmp_path / "d") is None


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "sub" / "f.npz"

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk full")

    try:
        atomic_write(target, fail)
    except RuntimeError:
        pass
    assert list((tmp_path / "sub").iterdir()) == []
    atomic_write(target, lambda f: np.savez(f, a=np.ones(3)))
    assert Path(target).is_file() and np.load(target)["a"].sum() == 3


def test_missing_real_data_fails_under_ci_and_skips_elsewhere(data_requirement, tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist" / "a.gz").write_bytes(b"")
    assert data_requirement(["mnist/a.gz"], base=str(tmp_path), ci=True) == tmp_path
    with pytest.raises(pytest.fail.Exception, match="CI=true requires the real data: CSTEP_DATA_DIR=.* lacks mnist/b"):
        data_requirement(["mnist/b.gz"], base=str(tmp_path), ci=True)
    with pytest.raises(pytest.skip.Exception, match="CSTEP_DATA_DIR is not set"):
        data_requirement(["mnist/b.gz"], base=None, ci=False)
