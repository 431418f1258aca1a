"""MNIST: the reader on the real files reproduces the data README's checked facts; malformed,
truncated, foreign and wrong-checksum files raise DataError; missing files are downloaded
(tested against a local file:// mirror) or reported with where to put them."""

import gzip
import hashlib
import struct

import numpy as np
import pytest

import data
import data.mnist as mnist
from data import DataError

# shared/data/README.md, copied here on purpose: the test checks the loader's table too
README_SHA256 = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --- the real files -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_classify(mnist_dir):
    return data.load("mnist-classify", mnist_dir, flatten=False, download=False)


def test_real_files_decompressed_sha256_matches_readme(mnist_dir):
    assert mnist.MNIST_SHA256 == README_SHA256
    for name, digest in README_SHA256.items():
        content = gzip.decompress((mnist_dir / "mnist" / f"{name}.gz").read_bytes())
        assert hashlib.sha256(content).hexdigest() == digest, name


def test_real_files_reproduce_readme_facts(mnist_classify):
    d = mnist_classify
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    assert np.bincount(d.y_train).tolist() == TRAIN_COUNTS
    assert np.bincount(d.y_test).tolist() == TEST_COUNTS
    assert abs(d.x_train.mean(dtype=np.float64) - 0.13066) < 1e-5
    assert abs(d.x_train.std(dtype=np.float64) - 0.30811) < 1e-5
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    assert len(np.unique(d.x_train[:100])) > 100  # pixels / 255, not binarised
    assert d.n_classes == 10 and not d.is_autoencoder and not d.substitute


def test_autoencoder_set_is_the_flattened_images(mnist_dir, mnist_classify):
    d = data.load("mnist", mnist_dir, dtype=np.float64, n_train=500, n_test=200, download=False)
    assert d.x_train.shape == (500, 784) and d.x_test.shape == (200, 784) and d.x_train.dtype == np.float64
    assert d.is_autoencoder and d.targets("train") is d.x_train
    np.testing.assert_array_equal(d.x_train.astype(np.float32), mnist_classify.x_train[:500].reshape(500, 784))
    np.testing.assert_array_equal(d.x_train * 255, np.round(d.x_train * 255))  # exactly k / 255


# --- synthetic files ------------------------------------------------------------------------

def idx_bytes(magic, dims, payload):
    return struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(payload)


def fake_mnist(n_train=6, n_test=4, seed=0):
    """name -> decompressed IDX content of a tiny but well-formed MNIST."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        out[f"{split}-images-idx3-ubyte"] = idx_bytes(0x803, (n, 28, 28), rng.integers(0, 256, n * 784, dtype=np.uint8))
        out[f"{split}-labels-idx1-ubyte"] = idx_bytes(0x801, (n,), rng.integers(0, 10, n, dtype=np.uint8))
    return out


def write_fake(folder, contents, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in contents.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(content))
        else:
            (folder / name).write_bytes(content)


@pytest.fixture
def fake(monkeypatch):
    """Tiny MNIST contents, with the loader's checksum table pointed at them."""
    contents = fake_mnist()
    monkeypatch.setattr(mnist, "MNIST_SHA256", {k: hashlib.sha256(v).hexdigest() for k, v in contents.items()})
    monkeypatch.setattr(mnist, "MNIST_URLS", ())  # no network in these tests
    return contents


def test_reads_gzip_and_raw_files_alike(tmp_path, fake):
    write_fake(tmp_path / "gz" / "mnist", fake, gz=True)
    write_fake(tmp_path / "raw" / "mnist", fake, gz=False)
    a = data.load("mnist-classify", tmp_path / "gz")
    b = data.load("mnist-classify", tmp_path / "raw")
    assert a.x_train.shape == (6, 784) and a.x_test.shape == (4, 784)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    expected = np.frombuffer(fake["train-images-idx3-ubyte"], np.uint8, offset=16).reshape(6, 784) / 255
    np.testing.assert_allclose(a.x_train, expected, rtol=1e-7)


def test_data_dir_from_environment(tmp_path, fake, monkeypatch):
    write_fake(tmp_path / "mnist", fake)
    monkeypatch.setenv("CSTEP_DATA_DIR", str(tmp_path))
    assert data.load("mnist").x_train.shape == (6, 784)


def test_truncated_gzip_raises(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(fake_mnist()["train-images-idx3-ubyte"])[:2000])
    with pytest.raises(DataError, match="gzip stream is truncated") as e:
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)
    assert str(path) in str(e.value)


def test_corrupt_gzip_raises(tmp_path):
    raw = bytearray(gzip.compress(fake_mnist()["train-labels-idx1-ubyte"]))
    raw[12:20] = b"\xff" * 8
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="gzip stream is corrupt"):
        mnist.read_idx(path)


def test_wrong_magic_raises(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(fake_mnist()["train-labels-idx1-ubyte"]))  # a labels file
    with pytest.raises(DataError, match="magic number 0x00000801 where images") as e:
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)
    assert str(path) in str(e.value)
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"PK\x03\x04 not an idx file at all")
    with pytest.raises(DataError, match="magic number 0x504b0304"):
        mnist.read_idx(foreign)


def test_wrong_checksum_raises(tmp_path):
    content = fake_mnist()["t10k-labels-idx1-ubyte"]
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(content))
    with pytest.raises(DataError, match="SHA-256 of the decompressed content") as e:
        mnist.read_idx(path, mnist.IDX_LABELS_MAGIC, sha256=README_SHA256["t10k-labels-idx1-ubyte"])
    assert str(path) in str(e.value) and "verify=False" in str(e.value)
    assert mnist.read_idx(path, mnist.IDX_LABELS_MAGIC, sha256=hashlib.sha256(content).hexdigest()).shape == (4,)


def test_checksum_checked_by_loader_unless_verify_false(tmp_path, fake, monkeypatch):
    write_fake(tmp_path / "mnist", fake)
    monkeypatch.setattr(mnist, "MNIST_SHA256", README_SHA256)
    with pytest.raises(DataError, match="SHA-256"):
        data.load("mnist", tmp_path)
    assert data.load("mnist", tmp_path, verify=False).n_train == 6


def test_header_and_length_disagree(tmp_path):
    content = fake_mnist()["train-images-idx3-ubyte"]
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content[:-784])  # one image short of what the header announces
    with pytest.raises(DataError, match=r"header announces shape \(6, 28, 28\)"):
        mnist.read_idx(path, mnist.IDX_IMAGES_MAGIC)


def test_bad_labels_and_mismatched_counts(tmp_path, monkeypatch):
    contents = fake_mnist()
    contents["t10k-labels-idx1-ubyte"] = idx_bytes(0x801, (4,), [1, 2, 12, 3])
    monkeypatch.setattr(mnist, "MNIST_URLS", ())
    write_fake(tmp_path / "a" / "mnist", contents)
    with pytest.raises(DataError, match="label 12 is outside 0..9"):
        data.load("mnist", tmp_path / "a", verify=False)
    contents = fake_mnist()
    contents["train-labels-idx1-ubyte"] = idx_bytes(0x801, (5,), [1, 2, 3, 4, 5])
    write_fake(tmp_path / "b" / "mnist", contents)
    with pytest.raises(DataError, match="labels for 6 images"):
        data.load("mnist", tmp_path / "b", verify=False)


def test_missing_files_offline_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(mnist, "MNIST_URLS", ((tmp_path / "nowhere").as_uri() + "/",))
    with pytest.raises(DataError, match="could not be downloaded|download failed") as e:
        data.load("mnist", tmp_path / "data")
    msg = str(e.value)
    assert str(tmp_path / "data" / "mnist") in msg and "train-images-idx3-ubyte.gz" in msg and "\n" not in msg
    with pytest.raises(DataError, match="downloading is off"):
        data.load("mnist", tmp_path / "data", download=False)


def test_download_from_mirror_into_cache(tmp_path, fake, isolated_dirs, monkeypatch):
    mirror = tmp_path / "mirror"
    write_fake(mirror, fake)
    # canonical source unreachable, the mirror answers
    monkeypatch.setattr(mnist, "MNIST_URLS", ((tmp_path / "down").as_uri() + "/", mirror.as_uri() + "/"))
    d = data.load("mnist-classify", tmp_path / "empty")
    assert d.x_train.shape == (6, 784)
    assert sorted(p.name for p in (isolated_dirs / "mnist").iterdir()) == sorted(f"{n}.gz" for n in fake)
    # now found in the cache: no download needed
    monkeypatch.setattr(mnist, "MNIST_URLS", ())
    np.testing.assert_array_equal(data.load("mnist-classify", tmp_path / "empty", download=False).y_train, d.y_train)


def test_subset_bounds(tmp_path, fake):
    write_fake(tmp_path / "mnist", fake)
    assert data.load("mnist", tmp_path, n_train=2, n_test=1).x_test.shape == (1, 784)
    with pytest.raises(DataError, match="only 1..6 are available"):
        data.load("mnist", tmp_path, n_train=7)
