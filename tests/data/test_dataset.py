"""Dataset validates what it holds; load() dispatches by name and rejects unknown names/options."""

import numpy as np
import pytest

import data
from data import DataError, Dataset
from data.dataset import check_array


def arrays(n=6, f=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((n, f)).astype(np.float32), rng.random((n // 2, f)).astype(np.float32)


def test_autoencoder_and_classification_records():
    x, xt = arrays()
    ae = Dataset("toy", x, xt)
    assert ae.is_autoencoder and ae.targets("test") is xt and ae.n_features == 4 and ae.feature_shape == (4,)
    y, yt = np.array([0, 1, 2, 0, 1, 2]), np.array([2, 1, 0])
    cl = Dataset("toy", x, xt, y, yt, n_classes=3)
    assert not cl.is_autoencoder and cl.targets("train") is y and (cl.n_train, cl.n_test) == (6, 3)
    assert "3-class" in repr(cl)
    with pytest.raises(DataError, match="split 'val'"):
        cl.targets("val")


@pytest.mark.parametrize("make, message", [
    (lambda x, xt: Dataset("t", x.astype(np.int32), xt), "real floating"),
    (lambda x, xt: Dataset("t", x, xt[:, :3]), "same feature shape"),
    (lambda x, xt: Dataset("t", x, xt.astype(np.float64)), "cast both"),
    (lambda x, xt: Dataset("t", np.where(x > 0.5, np.inf, x), xt), "NaN or Inf"),
    (lambda x, xt: Dataset("t", x[:, 0], xt[:, 0]), "same feature shape"),
    (lambda x, xt: Dataset("t", x[:0], xt), "empty"),
    (lambda x, xt: Dataset("t", x, xt, np.zeros(6, np.int64)), "both splits or for neither"),
    (lambda x, xt: Dataset("t", x, xt, np.zeros(6), np.zeros(3), n_classes=2), "must be int64"),
    (lambda x, xt: Dataset("t", x, xt, np.zeros(5, np.int64), np.zeros(3, np.int64), n_classes=2), r"shape \(6,\)"),
    (lambda x, xt: Dataset("t", x, xt, np.full(6, 3), np.zeros(3, np.int64), n_classes=3), "outside 0..2"),
    (lambda x, xt: Dataset("t", x, xt, np.zeros(6, np.int64), np.zeros(3, np.int64)), "n_classes >= 2"),
])
def test_malformed_records_raise(make, message):
    with pytest.raises(DataError, match=message):
        make(*arrays())


def test_check_array_range_and_shape_messages():
    a = np.array([[0.0, 1.5]])
    with pytest.raises(DataError, match=r"^f\.mat: values span \[0, 1.5\] but must lie in \[0, 1\]"):
        check_array(a, "f.mat", value_range=(0.0, 1.0))
    with pytest.raises(DataError, match=r"expected shape \('N', 3\)"):
        check_array(a, "f.mat", shape=(None, 3))


def test_load_dispatch():
    assert set(data.DATASETS) == {"mnist", "mnist-classify", "curves", "faces"}
    assert data.load("curves", n_train=10, n_test=5, cache=False).name == "curves"
    with pytest.raises(DataError, match="unknown data set 'cifar'; choose one of mnist"):
        data.load("cifar")
    with pytest.raises(DataError, match="does not take those options"):
        data.load("curves", flatten=False)


def test_float_targets_make_a_regression_set():
    """Item 8 of the first-hour issue: data.Dataset refused float regression targets."""
    rng = np.random.default_rng(0)
    ds = Dataset("reg", rng.random((10, 3)), rng.random((4, 3)), y_train=rng.random((10, 2)), y_test=rng.random((4, 2)))
    assert ds.is_regression and not ds.is_autoencoder and "regression" in repr(ds)
    with pytest.raises(DataError, match="must be int64"):  # with n_classes, float targets are malformed labels
        Dataset("reg", rng.random((10, 3)), rng.random((4, 3)), y_train=rng.random((10, 2)), y_test=rng.random((4, 2)),
                n_classes=2)
    with pytest.raises(DataError, match="same output shape"):
        Dataset("reg", rng.random((10, 3)), rng.random((4, 3)), y_train=rng.random((10, 2)), y_test=rng.random((4, 3)))
    with pytest.raises(DataError, match="NaN or Inf"):
        Dataset("reg", rng.random((10, 3)), rng.random((4, 3)), y_train=np.full((10, 2), np.nan), y_test=rng.random((4, 2)))
