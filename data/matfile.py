"""Reading named variables from MATLAB ``.mat`` files: v4-v7 through ``scipy.io.loadmat``,
v7.3 (HDF5) through ``h5py``. Arrays come back in MATLAB's orientation (an ``m x n`` MATLAB
matrix is a NumPy ``(m, n)`` array), so callers apply one convention whatever the file version."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from .dataset import DataError

__all__ = ["read_mat_variables"]


def read_mat_variables(path, names: list[str]) -> dict[str, np.ndarray]:
    """The numeric arrays ``names`` from the ``.mat`` file at ``path``."""
    path = Path(path)
    try:
        import h5py  # noqa: PLC0415 (only needed for v7.3 files)
        is_hdf5 = h5py.is_hdf5(str(path))
    except ImportError:
        h5py, is_hdf5 = None, False
    try:
        if is_hdf5:
            with h5py.File(path, "r") as f:
                # h5py sees MATLAB's column-major storage as the transpose
                found = {n: np.asarray(f[n][()]).T for n in names if n in f and isinstance(f[n], h5py.Dataset)}
        else:
            import scipy.io  # noqa: PLC0415

            found = scipy.io.loadmat(path, variable_names=names)
    except (OSError, ValueError, TypeError, NotImplementedError, zlib.error) as exc:
        raise DataError(f"{path}: cannot be read as a MATLAB .mat file ({type(exc).__name__}: {exc}); "
                        "the file is truncated or foreign, replace it") from None
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"{path}: has no variable {missing[0]!r} (expected {', '.join(names)}); "
                        "supply the original file")
    out = {}
    for n in names:
        a = found[n]
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "uif":
            raise DataError(f"{path}: variable {n!r} is not a numeric array; supply the original file")
        out[n] = a
    return out
