"""cstep data: dataset readers and generators, and the deterministic batch iterator.

``load(name, data_dir=None, dtype=float32, **kw)`` returns a :class:`Dataset` of host arrays:

* ``"mnist"`` - MNIST autoencoder set, (N, 784) pixels / 255, target = input (:mod:`data.mnist`);
* ``"mnist-classify"`` - MNIST images + int64 labels, ``flatten=False`` gives (N, 1, 28, 28);
* ``"curves"`` - the original ``digs3pts_1.mat`` if supplied, else a regenerated CURVES-like
  substitute that needs no file and no network (:mod:`data.curves`; ``cstep train``'s default);
* ``"faces"`` - the original ``newfaces_rot_single.mat`` if supplied, else a FACES-like
  substitute generated from ``faces/olivettifaces.mat`` (:mod:`data.faces`).

Files are looked for in ``data_dir`` (``--data-dir``), else ``CSTEP_DATA_DIR``, then in the user
cache (``CSTEP_CACHE_DIR``, else ``$XDG_CACHE_HOME/cstep`` or ``~/.cache/cstep``), which also
receives downloads and generated sets. Every problem raises :class:`DataError` (a ValueError).
This package imports nothing else of cstep: it hands host arrays and batch indices to whoever
trains (engine.app.train moves each batch to the device).
"""

from __future__ import annotations

import inspect

import numpy as np

from .batches import BatchIterator
from .curves import load_curves
from .dataset import DataError, Dataset
from .faces import load_faces
from .mnist import download_mnist, load_mnist, load_mnist_classify
from .paths import resolve_cache_dir, resolve_data_dir

__all__ = ["DATASETS", "DataError", "Dataset", "BatchIterator", "load", "load_mnist",
           "load_mnist_classify", "load_curves", "load_faces", "download_mnist", "resolve_data_dir",
           "resolve_cache_dir"]

#: name -> loader; every loader takes ``(data_dir=None, dtype=float32, **options)``.
DATASETS = {
    "mnist": load_mnist,
    "mnist-classify": load_mnist_classify,
    "curves": load_curves,
    "faces": load_faces,
}


def load(name: str, data_dir=None, dtype=np.float32, **kw) -> Dataset:
    """Load the data set ``name`` (one of :data:`DATASETS`); ``kw`` go to its loader."""
    try:
        loader = DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}") from None
    try:
        inspect.signature(loader).bind(data_dir, dtype, **kw)
    except TypeError as exc:
        raise DataError(f"data set {name!r} does not take those options ({exc}); "
                        f"see help(data.{loader.__name__})") from None
    return loader(data_dir, dtype, **kw)
