"""FACES: the original ``newfaces_rot_single.mat`` when supplied, else a FACES-like set generated
from the 400 Olivetti faces (``faces/olivettifaces.mat``).

The FACES benchmark (Hinton & Salakhutdinov, Science 313:504-507, 2006, supporting material)
holds 165600 25x25 images made from the Olivetti database (40 people x 10 images of 64x64) by
random rotation (-90 to +90 degrees), scaling (1.4 to 1.8), cropping and subsampling; 414 images
per source face. Its first 30 people form the training pool and the last 10 the test set. The
reference protocol (docs/kbfgs.md section 3.4; J. Martens' K-FAC demo) reads ``newfaces_single``
(625 x 165600, column-major 25x25 images), transposes it to rows and takes train = the first
total/40*25 = 103500 rows (people 1-25) and test = the last total/40*10 = 41400 (people 31-40),
values as stored. That file is used when it is in the data or cache directory
(``faces/newfaces_rot_single.mat`` or ``newfaces_rot_single.mat``).

Otherwise a **substitute** is generated (``Dataset.substitute`` is True; losses are not comparable
with published FACES numbers), following the recipe above with these choices where it is silent:

* same people split: train images come from people 1-25 (source images 0..249), test images
  from people 31-40 (300..399), cycling through the source images so each is used equally often
  (414 times each at the default sizes 103500 / 41400);
* per image, uniformly: rotation angle in [-90, 90] degrees, scale (zoom) in [1.4, 1.8],
  translation in [-3, 3] source pixels per axis. The crop is the central 64x64 window of the
  zoomed face, subsampled to 25x25. A zoom of at least 1.4 (about sqrt 2) keeps the rotated
  window inside the source image, which is presumably why the published range starts there;
  the few pixels a translation pushes outside repeat the edge;
* subsampling: the source images are pre-blurred with a Gaussian of sigma = 0.5 source pixels
  (anti-aliasing for the 1.4-1.8 pixel output spacing), then sampled bilinearly;
* values are pixels / 255 in [0, 1] (the source's maximum is 242); each 625-vector is a
  row-major 25x25 image (``x.reshape(-1, 25, 25)`` shows it upright; the original file's
  vectors are column-major, kept as they are).

Deterministic for a seed and the source file; generated sets are cached in
``<cache dir>/faces/`` keyed by version, seed, sizes and the source file's hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .cache import cache_file, load_or_build
from .dataset import DataError, Dataset, check_array, check_count, check_dtype, check_seed, take_first
from .matfile import read_mat_variables
from .paths import find_file, searched

__all__ = ["FACES_FILE", "OLIVETTI_FILE", "OLIVETTI_SHA256", "FACES_GENERATOR_VERSION", "read_olivetti",
           "warp_faces", "make_faces", "load_faces"]

FACES_FILE = "newfaces_rot_single.mat"
OLIVETTI_FILE = "olivettifaces.mat"
OLIVETTI_URL = "https://cs.nyu.edu/~roweis/data/olivettifaces.mat"
#: SHA-256 of the file (shared/data/README.md).
OLIVETTI_SHA256 = "b1988d02c72fe5b8ee82b5ef3bb7982eafc74f1e1ff0ae0ade35061ad0af534d"
#: Bump when the generator's output changes: it keys the cache.
FACES_GENERATOR_VERSION = 1
N_TRAIN, N_TEST = 103500, 41400
TRAIN_SOURCES = np.arange(0, 250)    # people 1-25
TEST_SOURCES = np.arange(300, 400)   # people 31-40
SOURCE_SIZE, OUT_SIZE = 64, 25
ANGLE_DEG = (-90.0, 90.0)
SCALE = (1.4, 1.8)
SHIFT = 3.0
PREBLUR_SIGMA = 0.5
_CHUNK = 1024


def read_olivetti(path, verify: bool = True) -> tuple[np.ndarray, str]:
    """The 400 Olivetti faces as upright ``(400, 64, 64)`` float32 in [0, 1], and the file's SHA-256.

    The file holds ``faces`` (4096, 400) uint8, each column a column-major 64x64 image.
    """
    path = Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if verify and digest != OLIVETTI_SHA256:
        raise DataError(f"{path}: SHA-256 is {digest}, expected {OLIVETTI_SHA256}; the file is corrupt or a "
                        "different version: replace it or pass verify=False")
    faces = read_mat_variables(path, ["faces"])["faces"]
    if faces.shape != (4096, 400) or faces.dtype != np.uint8:
        raise DataError(f"{path}: variable 'faces' is {faces.dtype} {faces.shape}, expected uint8 (4096, 400); "
                        "supply the Olivetti faces file")
    images = np.ascontiguousarray(faces.T.reshape(400, 64, 64).transpose(0, 2, 1))
    return np.divide(images, 255, dtype=np.float32), digest


def warp_faces(sources: np.ndarray, which: np.ndarray, params: np.ndarray) -> np.ndarray:
    """25x25 views ``(n, 625)`` float32 of ``sources[which]`` (``(K, 64, 64)`` float32), with
    ``params`` ``(n, 4)`` uniform in [0, 1) mapped to angle, scale, row shift, column shift."""
    f4 = np.float32
    theta = np.deg2rad(ANGLE_DEG[0] + (ANGLE_DEG[1] - ANGLE_DEG[0]) * params[:, 0])
    scale = SCALE[0] + (SCALE[1] - SCALE[0]) * params[:, 1]
    centre = (SOURCE_SIZE - 1) / 2 + SHIFT * (2 * params[:, 2:4] - 1)
    # output pixel k sits at (k - 12) * 64/25 pixels from the centre of the zoomed 64x64 window
    k = (np.arange(OUT_SIZE) - (OUT_SIZE - 1) / 2) * (SOURCE_SIZE / OUT_SIZE)
    v, u = np.repeat(k, OUT_SIZE).astype(f4), np.tile(k, OUT_SIZE).astype(f4)
    cos = (np.cos(theta) / scale).astype(f4)[:, None]
    sin = (np.sin(theta) / scale).astype(f4)[:, None]
    rows = cos * v - sin * u + centre[:, 0].astype(f4)[:, None]
    cols = sin * v + cos * u + centre[:, 1].astype(f4)[:, None]
    top = f4(SOURCE_SIZE - 1) * (1 - 4 * np.finfo(f4).eps)  # floor(top) = 62: the 2x2 stencil stays inside
    np.clip(rows, 0, top, out=rows)
    np.clip(cols, 0, top, out=cols)
    r0, c0 = rows.astype(np.intp), cols.astype(np.intp)
    rows -= r0
    cols -= c0
    flat = sources.reshape(-1)
    index = r0 * SOURCE_SIZE
    index += c0
    index += (which * SOURCE_SIZE * SOURCE_SIZE)[:, None]
    a, b = flat[index], flat[index + 1]
    index += SOURCE_SIZE
    c, d = flat[index], flat[index + 1]
    # bilinear blend, in place
    b -= a; b *= cols; a += b  # noqa: E702
    d -= c; d *= cols; c += d  # noqa: E702
    c -= a; c *= rows; a += c  # noqa: E702
    return a


def _generate(sources, pool, n, rng) -> np.ndarray:
    params = rng.random((n, 4))
    which = pool[np.arange(n) % len(pool)]
    out = np.empty((n, OUT_SIZE * OUT_SIZE), dtype=np.float32)
    for i in range(0, n, _CHUNK):
        out[i:i + _CHUNK] = warp_faces(sources, which[i:i + _CHUNK], params[i:i + _CHUNK])
    return out


def make_faces(images: np.ndarray, n_train: int = N_TRAIN, n_test: int = N_TEST,
               seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fresh FACES-like ``(x_train, x_test)`` (float32) from the Olivetti ``images``
    ``(400, 64, 64)`` in [0, 1] (see :func:`read_olivetti`), no cache involved."""
    from scipy import ndimage  # noqa: PLC0415 (keeps `import data` light)

    sources = ndimage.gaussian_filter(images.astype(np.float32), sigma=(0, PREBLUR_SIGMA, PREBLUR_SIGMA),
                                      mode="nearest")
    train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
    return (_generate(sources, TRAIN_SOURCES, n_train, np.random.default_rng(train_ss)),
            _generate(sources, TEST_SOURCES, n_test, np.random.default_rng(test_ss)))


def _load_original(path, dt, n_train, n_test) -> Dataset:
    a = read_mat_variables(path, ["newfaces_single"])["newfaces_single"]
    if a.ndim != 2 or a.shape[0] != 625 or a.shape[1] < 40 or a.shape[1] % 40:
        raise DataError(f"{path}: variable 'newfaces_single' has shape {a.shape}, expected (625, 40*k) "
                        "(625 x 165600 in the original); supply the original file")
    rows = check_array(a.T.astype(dt), f"{path} variable 'newfaces_single'")
    per = rows.shape[0] // 40
    x_train = take_first(rows[: 25 * per], n_train, f"{path} (train)")
    x_test = take_first(rows[-10 * per:], n_test, f"{path} (test)")
    return Dataset("faces", np.ascontiguousarray(x_train), np.ascontiguousarray(x_test), source=str(path),
                   description="FACES (Hinton & Salakhutdinov 2006), original newfaces_rot_single.mat: train = first "
                               f"{25 * per} columns, test = last {10 * per}, values as stored")


def load_faces(data_dir=None, dtype=np.float32, *, n_train: int | None = None, n_test: int | None = None,
               seed: int = 0, source: str = "auto", verify: bool = True, cache: bool = True,
               cache_dir=None) -> Dataset:
    """The FACES autoencoder set ``(N, 625)``, target = input.

    ``source``: 'auto' (the original file if present, else generated from the Olivetti faces),
    'original' or 'generated'. Sizes default to 103500 / 41400 (the reference split); the first
    ``n_train`` / ``n_test`` are taken when given. ``verify`` checks the Olivetti file's SHA-256;
    ``cache=False`` rebuilds the generated set without reading or writing the cache.
    """
    dt = check_dtype(dtype)
    if source not in ("auto", "original", "generated"):
        raise DataError(f"faces source {source!r} is not one of 'auto', 'original', 'generated'")
    if source != "generated":
        path = find_file("faces", [FACES_FILE], data_dir)
        if path is not None:
            return _load_original(path, dt, n_train, n_test)
        if source == "original":
            raise DataError(f"{FACES_FILE} is not in {searched('faces', data_dir)}; "
                            "put it there (from http://www.cs.toronto.edu/~jmartens/) or use source='generated'")
    seed = check_seed(seed, "faces seed")
    n_train, n_test = check_count(n_train, N_TRAIN, "faces n_train"), check_count(n_test, N_TEST, "faces n_test")
    src_path = find_file("faces", [OLIVETTI_FILE], data_dir)
    if src_path is None:
        raise DataError(f"{OLIVETTI_FILE} (the FACES source images) is not in "
                        f"{searched('faces', data_dir)}; put it (e.g. from "
                        f"{OLIVETTI_URL}) or the original {FACES_FILE} there, or point --data-dir/CSTEP_DATA_DIR "
                        "at a folder holding faces/")
    images, digest = read_olivetti(src_path, verify)
    path = cache_file("faces", f"v{FACES_GENERATOR_VERSION}-seed{seed}-{n_train}x{n_test}-src{digest[:16]}",
                      cache_dir)

    def build():
        x_train, x_test = make_faces(images, n_train, n_test, seed)
        return {"x_train": x_train, "x_test": x_test}

    arrays = load_or_build(path, {"x_train": (n_train, 625), "x_test": (n_test, 625)}, build, cache)
    return Dataset("faces", arrays["x_train"].astype(dt, copy=False), arrays["x_test"].astype(dt, copy=False),
                   substitute=True, source=f"generated from {src_path} (seed={seed}, version "
                   f"{FACES_GENERATOR_VERSION})" + (f", cached at {path}" if cache else ""),
                   description="FACES-like substitute: Olivetti faces randomly rotated, scaled, shifted and "
                               "subsampled to 25x25, not the original newfaces_rot_single.mat")
