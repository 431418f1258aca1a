"""Shared fixtures for the data tests.

Real data sets come from ``CSTEP_DATA_DIR`` (CI points it at ../shared/data). When the files a
test needs are absent, the test FAILS under ``CI=true`` (CI must exercise them) and is skipped
elsewhere, with a message saying what to set.

Every test runs with a private cache directory and without ``CSTEP_DATA_DIR`` in the
environment, so nothing reads or writes the user's real cache and loaders only see real data
when a test passes the directory explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: captured before the per-test isolation removes it from the environment
DATA_DIR = os.environ.get("CSTEP_DATA_DIR")


def require_data(relpaths, base=DATA_DIR, ci=None) -> Path:
    """The data directory ``base`` if it holds every one of ``relpaths``; otherwise fail the test
    under CI (``CI=true``) or skip it elsewhere."""
    ci = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes") if ci is None else ci
    if base:
        missing = [r for r in relpaths if not (Path(base) / r).is_file()]
        if not missing:
            return Path(base)
        problem = f"CSTEP_DATA_DIR={base} lacks {', '.join(missing)}"
    else:
        problem = "CSTEP_DATA_DIR is not set"
    message = f"{problem}; point CSTEP_DATA_DIR at the shared data folder (e.g. ../shared/data) to run this test"
    if ci:
        pytest.fail(f"CI=true requires the real data: {message}", pytrace=False)
    pytest.skip(message)


MNIST_FILES = [f"mnist/{n}-idx{d}-ubyte.gz" for n, d in
               (("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1))]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real data directory holding mnist/ (CI rule above)."""
    return require_data(MNIST_FILES)


@pytest.fixture(scope="session")
def faces_dir() -> Path:
    """The real data directory holding faces/olivettifaces.mat (CI rule above)."""
    return require_data(["faces/olivettifaces.mat"])


@pytest.fixture
def data_requirement():
    """The :func:`require_data` helper, for testing the CI rule itself."""
    return require_data


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """A private cache dir per test; no CSTEP_DATA_DIR / XDG_CACHE_HOME from the outside."""
    monkeypatch.setenv("CSTEP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CSTEP_DATA_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    return tmp_path / "cache"
