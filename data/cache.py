"""On-disk cache of generated data sets (``.npz`` under ``<cache dir>/<name>/``).

A cache file is keyed by everything that determines its content (generator version, seed, sizes,
the hash of any source file), so a hit is the same bytes a fresh build would give. A cache file
that cannot be read is a disposable derived file: it is rebuilt with a warning, not an error.
An unwritable cache directory only costs the rebuild next time.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path

import numpy as np

from .paths import atomic_write, resolve_cache_dir

__all__ = ["cache_file", "load_or_build"]


def cache_file(name: str, key: str, cache_dir=None) -> Path:
    """``<cache dir>/<name>/<name>-<key>.npz``."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else resolve_cache_dir()
    return root / name / f"{name}-{key}.npz"


def _read(path: Path, expect: dict[str, tuple]) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in expect}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"{path}: unreadable cache file ({type(exc).__name__}: {exc}); rebuilding it", stacklevel=3)
        return None
    for k, shape in expect.items():
        a = arrays[k]
        if a.shape != shape or a.dtype != np.float32:
            warnings.warn(f"{path}: cached {k} is {a.dtype} {a.shape}, expected float32 {shape}; rebuilding it",
                          stacklevel=3)
            return None
    return arrays


def load_or_build(path: Path, expect: dict[str, tuple], build, use_cache: bool = True) -> dict[str, np.ndarray]:
    """The float32 arrays named in ``expect`` (name -> shape) from ``path`` if it holds them,
    else from ``build()`` (a dict of those arrays), saved to ``path`` when ``use_cache``."""
    if use_cache and path.is_file():
        arrays = _read(path, expect)
        if arrays is not None:
            return arrays
    arrays = build()
    if use_cache:
        try:
            atomic_write(path, lambda f: np.savez(f, **arrays))
        except OSError as exc:
            warnings.warn(f"{path}: could not write the cache ({exc}); the set will be rebuilt next time", stacklevel=2)
    return arrays
