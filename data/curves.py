"""CURVES: the original ``digs3pts_1.mat`` when supplied, else a regenerated CURVES-like set.

The CURVES benchmark (Hinton & Salakhutdinov, Science 313:504-507, 2006) consists of synthetic
28x28 images of smooth curves drawn through three randomly chosen points, 20000 train / 10000
test, values in [0, 1]; the deep autoencoder's 6-unit code layer matches its six degrees of
freedom. The original file (``bdata`` 20000 x 784 train, ``bdatatest`` 10000 x 784 test;
http://www.cs.toronto.edu/~jmartens/digs3pts_1.mat) is used when it is in the data or cache
directory (``curves/digs3pts_1.mat`` or ``digs3pts_1.mat``), values as they are.

Otherwise a **substitute** is generated from that description (``Dataset.substitute`` is True;
losses are not comparable with published CURVES numbers). Our choices, where the description
is silent:

* three points uniform in ``[2, 25]^2`` (pixel-centre coordinates 0..27), so strokes stay in frame;
* the two farthest-apart points are the ends and the third is passed through in between, which
  gives arcs rather than folded hairpins;
* the curve is the parametric quadratic through the three points (Lagrange interpolation at
  t = 0, tau, 1 with tau the chord-length fraction, clipped to [0.1, 0.9]): smooth, exactly
  six degrees of freedom;
* rendering: the curve's ink (128 segments, each weighted by its length) is splatted bilinearly
  onto the grid and blurred with a Gaussian of sigma = 1 pixel, then scaled so that a straight
  stroke peaks at 1 and clipped to [0, 1]: a soft, anti-aliased stroke about 2.5 px wide.

The set is deterministic for a seed (same seed, same bytes on a given platform; NumPy's
vectorised transcendental functions may differ in the last bit across CPUs). Train and test come
from independent streams spawned from the seed, and example ``i`` depends only on ``i``, so a
smaller set is a prefix of a larger one. Generated sets are cached in
``<cache dir>/curves/`` as ``.npz`` keyed by version, seed and sizes. This set needs no file and
no network: it is what ``cstep train`` uses by default.
"""

from __future__ import annotations

import numpy as np

from .cache import cache_file, load_or_build
from .dataset import DataError, Dataset, check_array, check_count, check_dtype, check_seed, take_first
from .matfile import read_mat_variables
from .paths import find_file, searched

__all__ = ["CURVES_FILE", "CURVES_GENERATOR_VERSION", "curve_points", "render_curves", "generate_curves",
           "make_curves", "load_curves"]

CURVES_FILE = "digs3pts_1.mat"
CURVES_URL = "http://www.cs.toronto.edu/~jmartens/digs3pts_1.mat"
#: Bump when the generator's output changes: it keys the cache.
CURVES_GENERATOR_VERSION = 1
N_TRAIN, N_TEST = 20000, 10000
IMAGE_SIZE = 28
POINT_LOW, POINT_HIGH = 2.0, 25.0
STROKE_SIGMA = 1.0
N_SEGMENTS = 128
_CHUNK = 1000


def curve_points(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 3, 2)`` (row, col) points per curve, ordered so the farthest pair are the ends."""
    p = POINT_LOW + (POINT_HIGH - POINT_LOW) * rng.random((n, 3, 2))
    # side opposite vertex k has length side[:, k]; the vertex opposite the longest side goes in the middle
    side = np.stack([np.linalg.norm(p[:, (k + 1) % 3] - p[:, (k + 2) % 3], axis=1) for k in range(3)], axis=1)
    mid = np.argmax(side, axis=1)
    order = np.stack([(mid + 1) % 3, mid, (mid + 2) % 3], axis=1)
    return np.take_along_axis(p, order[:, :, None], axis=1)


def render_curves(points: np.ndarray, size: int = IMAGE_SIZE, sigma: float = STROKE_SIGMA,
                  n_segments: int = N_SEGMENTS) -> np.ndarray:
    """Images ``(n, size*size)`` float64 in [0, 1] of the quadratic curves through ``points``
    ``(n, 3, 2)`` (row, col; start, middle, end), drawn as a Gaussian-blurred stroke."""
    from scipy import ndimage  # noqa: PLC0415 (keeps `import data` light)

    n = len(points)
    a, b, c = (points[:, k, None, :] for k in range(3))
    d1 = np.linalg.norm(b - a, axis=-1)
    d2 = np.linalg.norm(c - b, axis=-1)
    tau = np.clip(d1 / np.maximum(d1 + d2, 1e-12), 0.1, 0.9)
    t = np.linspace(0.0, 1.0, n_segments + 1)[None, :]
    # Lagrange basis for nodes 0, tau, 1
    curve = (a * ((t - tau) * (t - 1) / tau)[..., None]
             + b * (t * (t - 1) / (tau * (tau - 1)))[..., None]
             + c * (t * (t - tau) / (1 - tau))[..., None])
    mid = 0.5 * (curve[:, 1:] + curve[:, :-1])
    length = np.linalg.norm(curve[:, 1:] - curve[:, :-1], axis=-1)
    r0, c0 = np.floor(mid[..., 0]), np.floor(mid[..., 1])
    fr, fc = mid[..., 0] - r0, mid[..., 1] - c0
    r0, c0 = r0.astype(np.intp), c0.astype(np.intp)
    base = (np.arange(n) * size * size)[:, None]
    index, weight = [], []
    for dr, dc, w in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        r, col = r0 + dr, c0 + dc
        inside = (r >= 0) & (r < size) & (col >= 0) & (col < size)
        index.append((base + r * size + col)[inside])
        weight.append((length * w)[inside])
    ink = np.bincount(np.concatenate(index), np.concatenate(weight), minlength=n * size * size)
    img = ndimage.gaussian_filter(ink.reshape(n, size, size), sigma=(0, sigma, sigma), mode="constant", truncate=4.0)
    # a straight stroke of unit ink per unit length peaks at 1/sqrt(2 pi s^2), s^2 = sigma^2 + 1/6 (bilinear tent)
    img *= np.sqrt(2 * np.pi * (sigma**2 + 1 / 6))
    np.clip(img, 0.0, 1.0, out=img)
    return img.reshape(n, size * size)


def generate_curves(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` CURVES-like images ``(n, 784)`` float32 drawn with ``rng``."""
    points = curve_points(rng, n)
    out = np.empty((n, IMAGE_SIZE * IMAGE_SIZE), dtype=np.float32)
    for i in range(0, n, _CHUNK):
        out[i:i + _CHUNK] = render_curves(points[i:i + _CHUNK])
    return out


def make_curves(n_train: int = N_TRAIN, n_test: int = N_TEST, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fresh CURVES-like ``(x_train, x_test)`` (float32), no cache involved."""
    train_ss, test_ss = np.random.SeedSequence(seed).spawn(2)
    return (generate_curves(n_train, np.random.default_rng(train_ss)),
            generate_curves(n_test, np.random.default_rng(test_ss)))


def _load_original(path, dt, n_train, n_test) -> Dataset:
    v = read_mat_variables(path, ["bdata", "bdatatest"])
    xs = []
    for key, n in (("bdata", n_train), ("bdatatest", n_test)):
        x = check_array(v[key].astype(dt), f"{path} variable {key!r}", shape=(None, 784), value_range=(0.0, 1.0))
        xs.append(take_first(x, n, f"{path} variable {key!r}"))
    return Dataset("curves", xs[0], xs[1], substitute=False, source=str(path),
                   description="CURVES (Hinton & Salakhutdinov 2006), original digs3pts_1.mat, values as stored")


def load_curves(data_dir=None, dtype=np.float32, *, n_train: int | None = None, n_test: int | None = None,
                seed: int = 0, source: str = "auto", cache: bool = True, cache_dir=None) -> Dataset:
    """The CURVES autoencoder set ``(N, 784)`` in [0, 1], target = input.

    ``source``: 'auto' (the original file if present, else generated), 'original' (the file is
    required) or 'generated'. Sizes default to 20000 / 10000 generated, or all of the original
    (whose first ``n_train`` / ``n_test`` rows are taken when given). ``seed`` selects the
    generated set; ``cache=False`` rebuilds it without reading or writing the cache.
    """
    dt = check_dtype(dtype)
    if source not in ("auto", "original", "generated"):
        raise DataError(f"curves source {source!r} is not one of 'auto', 'original', 'generated'")
    if source != "generated":
        path = find_file("curves", [CURVES_FILE], data_dir)
        if path is not None:
            return _load_original(path, dt, n_train, n_test)
        if source == "original":
            raise DataError(f"{CURVES_FILE} is not in {searched('curves', data_dir)}; download it from {CURVES_URL} "
                            "into one of them, or use source='generated'")
    seed = check_seed(seed, "curves seed")
    n_train, n_test = check_count(n_train, N_TRAIN, "curves n_train"), check_count(n_test, N_TEST, "curves n_test")
    path = cache_file("curves", f"v{CURVES_GENERATOR_VERSION}-seed{seed}-{n_train}x{n_test}", cache_dir)

    def build():
        x_train, x_test = make_curves(n_train, n_test, seed)
        return {"x_train": x_train, "x_test": x_test}

    arrays = load_or_build(path, {"x_train": (n_train, 784), "x_test": (n_test, 784)}, build, cache)
    return Dataset("curves", arrays["x_train"].astype(dt, copy=False), arrays["x_test"].astype(dt, copy=False),
                   substitute=True, source=f"generated (seed={seed}, version {CURVES_GENERATOR_VERSION})"
                   + (f", cached at {path}" if cache else ""),
                   description="CURVES-like substitute: regenerated 28x28 images of smooth curves through three "
                               "random points, not the original digs3pts_1.mat")
