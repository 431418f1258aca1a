"""MNIST (LeCun, Bottou, Bengio & Haffner, Proc. IEEE 86(11), 1998): IDX reader, download, loaders.

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each gzip-compressed (``.gz``) or raw (detected by the magic bytes,
not the name), in ``<data dir>/mnist/`` or the cache's ``mnist/``. When a file is in neither,
it is downloaded into the cache from the canonical site, falling back to two public mirrors.
Every file is verified by the SHA-256 of its decompressed content (the table in the data README).

IDX format: big-endian uint32 magic ``0x00000803`` (uint8, 3-d: images) or ``0x00000801``
(uint8, 1-d: labels), then one uint32 per dimension, then the uint8 data row-major.

Autoencoder set (K-BFGS reference protocol, docs/kbfgs.md section 3.4): pixels / 255 as float,
*not* binarised; 60000 train / 10000 test; the target is the input.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .dataset import DataError, Dataset, check_dtype, take_first
from .download import decode_gzip, download_verified, sha256_hex
from .paths import find_file, resolve_cache_dir, search_dirs, searched

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "MNIST_SHA256", "MNIST_URLS", "parse_idx", "read_idx",
           "locate_mnist", "download_mnist", "read_mnist", "load_mnist", "load_mnist_classify"]

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

#: SHA-256 of the decompressed IDX content (shared/data/README.md).
MNIST_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

#: Canonical site first, then the mirrors used by PyTorch and TensorFlow (same decompressed bytes).
MNIST_URLS = (
    "http://yann.lecun.com/exdb/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)

_MAGIC_NAMES = {IDX_IMAGES_MAGIC: "images (0x00000803)", IDX_LABELS_MAGIC: "labels (0x00000801)"}


def parse_idx(content: bytes, where: str, magic: int | None = None) -> np.ndarray:
    """The uint8 array held by decompressed IDX ``content``; checks the magic number (against
    ``magic`` if given) and that the header's dimensions match the content length exactly."""
    if len(content) < 4:
        raise DataError(f"{where}: {len(content)} bytes is too short for an IDX file; it is not MNIST data, replace it")
    (found,) = struct.unpack(">I", content[:4])
    if (magic is not None and found != magic) or found >> 8 != 0x08 or not 1 <= found & 0xFF <= 4:
        want = _MAGIC_NAMES.get(magic, "an IDX uint8 magic (0x000008nn)")
        raise DataError(f"{where}: magic number 0x{found:08x} where {want} was expected; "
                        "the file is not this MNIST file, replace it")
    ndim = found & 0xFF
    header = 4 + 4 * ndim
    if len(content) < header:
        raise DataError(f"{where}: the IDX header is truncated ({len(content)} bytes); replace the file")
    dims = struct.unpack(f">{ndim}I", content[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(content) != expected:
        raise DataError(f"{where}: the header announces shape {dims} ({expected} bytes) but the content has "
                        f"{len(content)} bytes; the file is truncated or foreign, replace it")
    return np.frombuffer(content, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path, magic: int | None = None, sha256: str | None = None) -> np.ndarray:
    """Read an IDX file, gzip-compressed or raw; with ``sha256``, verify the decompressed content."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); check the path and permissions") from None
    content = decode_gzip(raw, str(path))
    if sha256 is not None:
        digest = sha256_hex(content)
        if digest != sha256:
            raise DataError(f"{path}: SHA-256 of the decompressed content is {digest}, expected {sha256}; the file is "
                            "corrupt or not the canonical MNIST file: delete it (it will be downloaded again) "
                            "or pass verify=False")
    return parse_idx(content, str(path), magic)


def download_mnist(dest_dir=None, names=None, urls=None, timeout: float = 30.0) -> dict[str, Path]:
    """Download the MNIST files (all four, or ``names``) into ``dest_dir`` (default
    ``<cache dir>/mnist``) from ``urls`` (default :data:`MNIST_URLS`), each verified by its
    decompressed SHA-256; returns name -> path."""
    dest = Path(dest_dir) if dest_dir is not None else resolve_cache_dir() / "mnist"
    urls = MNIST_URLS if urls is None else urls
    return {name: download_verified(name + ".gz", urls, dest, MNIST_SHA256[name], timeout=timeout)
            for name in (names or MNIST_SHA256)}


def locate_mnist(data_dir=None, download: bool = True) -> dict[str, Path]:
    """The paths of the four MNIST files (name -> path), downloading the missing ones into the
    cache when ``download``; a one-sentence :class:`DataError` says where to put them otherwise."""
    found = {name: find_file("mnist", [name + ".gz", name], data_dir) for name in MNIST_SHA256}
    missing = [name for name, p in found.items() if p is None]
    if not missing:
        return found
    fix = (f"put the four MNIST files ({', '.join(n + '.gz' for n in MNIST_SHA256)}) in "
           f"{search_dirs(data_dir)[0] / 'mnist'} or point --data-dir/CSTEP_DATA_DIR at a folder holding mnist/")
    if not download:
        raise DataError(f"MNIST file {missing[0]}.gz is not in {searched('mnist', data_dir)} "
                        f"and downloading is off; {fix}")
    try:
        found.update(download_mnist(names=missing))
    except DataError as exc:
        raise DataError(f"MNIST file {missing[0]}.gz is not in {searched('mnist', data_dir)} and the download failed "
                        f"({'; '.join(exc.failures)}); {fix}") from None
    return found


def read_mnist(data_dir=None, verify: bool = True, download: bool = True):
    """Raw MNIST: ``(train_images, train_labels, test_images, test_labels, paths)`` with images
    uint8 ``(N, 28, 28)`` and labels uint8 ``(N,)``; checks magic numbers, sizes, checksums
    (``verify``), label range and that images and labels agree in number."""
    paths = locate_mnist(data_dir, download)
    out = []
    for split in ("train", "t10k"):
        img_name, lab_name = f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte"
        images = read_idx(paths[img_name], IDX_IMAGES_MAGIC, MNIST_SHA256[img_name] if verify else None)
        labels = read_idx(paths[lab_name], IDX_LABELS_MAGIC, MNIST_SHA256[lab_name] if verify else None)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataError(f"{paths[img_name]}: images have shape {images.shape}, expected (N, 28, 28); "
                            "replace the file")
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(f"{paths[lab_name]}: {labels.shape} labels for {len(images)} images in "
                            f"{paths[img_name].name}; use the matching pair of files")
        if labels.max() > 9:
            raise DataError(f"{paths[lab_name]}: label {labels.max()} is outside 0..9; replace the file")
        out += [images, labels]
    return (*out, paths)


def _scaled(images: np.ndarray, dtype) -> np.ndarray:
    # pixels / 255 (correctly rounded in the target dtype), not binarised
    return np.divide(images.reshape(len(images), -1), 255, dtype=dtype)


def _describe(paths) -> str:
    return ", ".join(str(paths[n]) for n in MNIST_SHA256)


def load_mnist(data_dir=None, dtype=np.float32, *, n_train: int | None = None, n_test: int | None = None,
               verify: bool = True, download: bool = True) -> Dataset:
    """The MNIST autoencoder set: x ``(N, 784)`` = pixels / 255 in [0, 1], target = input;
    60000 train / 10000 test (or the first ``n_train`` / ``n_test``)."""
    dt = check_dtype(dtype)
    tr_img, _, te_img, _, paths = read_mnist(data_dir, verify, download)
    tr_img = take_first(tr_img, n_train, "mnist n_train")
    te_img = take_first(te_img, n_test, "mnist n_test")
    return Dataset("mnist", _scaled(tr_img, dt), _scaled(te_img, dt),
                   description="MNIST autoencoder set: 28x28 digits, pixels/255 (not binarised), target = input",
                   source=_describe(paths))


def load_mnist_classify(data_dir=None, dtype=np.float32, *, flatten: bool = True, n_train: int | None = None,
                        n_test: int | None = None, verify: bool = True, download: bool = True) -> Dataset:
    """MNIST classification: images / 255 as ``(N, 784)`` (``flatten=True``) or ``(N, 1, 28, 28)``
    (NCHW, for the CNN presets), int64 labels 0..9; 60000 train / 10000 test."""
    dt = check_dtype(dtype)
    tr_img, tr_lab, te_img, te_lab, paths = read_mnist(data_dir, verify, download)
    shape = (-1, 784) if flatten else (-1, 1, 28, 28)
    xs, ys = [], []
    for img, lab, n, split in ((tr_img, tr_lab, n_train, "n_train"), (te_img, te_lab, n_test, "n_test")):
        img = take_first(img, n, f"mnist-classify {split}")
        xs.append(_scaled(img, dt).reshape(shape))
        ys.append(lab[: len(img)].astype(np.int64))
    return Dataset("mnist-classify", xs[0], xs[1], ys[0], ys[1], n_classes=10,
                   description="MNIST classification: 28x28 digits, pixels/255, labels 0..9",
                   source=_describe(paths))
