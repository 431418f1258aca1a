"""The dataset record, the error every loader raises, and the array checks they share.

A :class:`Dataset` holds host (NumPy) arrays in row-major ``(N, features...)`` layout. An
autoencoder set has no labels (``y_train is None``): its target is its input. A classification
set has int64 labels in ``0 .. n_classes - 1``. Construction validates everything, so a
malformed set fails when it is made, not half-way through a run (DESIGN.md convention 7).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DataError", "Dataset", "check_dtype", "check_array", "check_count", "check_seed", "take_first"]


class DataError(ValueError):
    """A data file or array is missing, corrupt, foreign or malformed.

    The message is one sentence naming the file (or array), the problem and the fix.
    """


_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_dtype(dtype) -> np.dtype:
    """``dtype`` as a NumPy dtype, which must be float32 or float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        dt = None
    if dt not in _FLOAT_DTYPES:
        raise DataError(f"dtype {dtype!r} is not supported for data arrays; use float32 or float64")
    return dt


def check_array(a, where: str, *, ndim: int | None = None, shape: tuple | None = None,
                value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Validate a real floating array: rank, shape (``None`` entries match anything), finiteness,
    and optionally that every value lies in ``value_range``. ``where`` names the file/array in the
    error message. Returns ``a`` unchanged."""
    if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
        kind = type(a).__name__ if not isinstance(a, np.ndarray) else f"array of {a.dtype}"
        raise DataError(f"{where}: expected a real floating NumPy array but got {kind}; "
                        "convert it with numpy.asarray(..., dtype=numpy.float32)")
    if shape is not None:
        ndim = len(shape)
    if ndim is not None and a.ndim != ndim:
        raise DataError(f"{where}: expected a {ndim}-d array but got shape {a.shape}; "
                        f"reshape it to {shape or ('N', '...')}")
    if shape is not None and any(s is not None and s != t for s, t in zip(shape, a.shape, strict=True)):
        want = tuple("N" if s is None else s for s in shape)
        raise DataError(f"{where}: expected shape {want} but got {a.shape}; supply data of that shape")
    if a.size == 0:
        raise DataError(f"{where}: the array is empty (shape {a.shape}); supply at least one example")
    if not np.isfinite(a).all():
        bad = int(a.size - np.count_nonzero(np.isfinite(a)))
        raise DataError(f"{where}: {bad} value(s) are NaN or Inf; remove or repair those examples")
    if value_range is not None:
        lo, hi = float(a.min()), float(a.max())
        if lo < value_range[0] or hi > value_range[1]:
            raise DataError(f"{where}: values span [{lo:.6g}, {hi:.6g}] but must lie in "
                            f"[{value_range[0]:g}, {value_range[1]:g}]; rescale the data")
    return a


def _is_int(n) -> bool:
    return isinstance(n, (int, np.integer)) and not isinstance(n, bool)


def check_count(n, default: int, what: str) -> int:
    """``n`` (``default`` for ``None``) as a positive int."""
    if n is None:
        return default
    if not _is_int(n) or n < 1:
        raise DataError(f"{what}={n!r} is not a positive number of examples; pass an integer >= 1")
    return int(n)


def check_seed(seed, what: str) -> int:
    """``seed`` as a non-negative int (what ``numpy.random.SeedSequence`` accepts)."""
    if not _is_int(seed) or seed < 0:
        raise DataError(f"{what}={seed!r} is not a non-negative integer; pass one")
    return int(seed)


def take_first(a: np.ndarray, n: int | None, where: str) -> np.ndarray:
    """The first ``n`` rows of ``a`` (all of them for ``None``), refusing impossible counts."""
    if n is None:
        return a
    if not _is_int(n) or not 1 <= n <= len(a):
        raise DataError(f"{where}: asked for {n!r} examples but only 1..{len(a)} are available; "
                        "pass a count in that range")
    return a[: int(n)]


@dataclass(eq=False)
class Dataset:
    """Train and test arrays of one data set, plus where they came from.

    ``x_*`` are real float arrays ``(N, features...)`` with the same feature shape; ``y_*`` are
    int64 labels ``(N,)`` with ``n_classes`` (a classification set), real float targets
    ``(N, outputs...)`` with no ``n_classes`` (a regression set), or ``None`` for an autoencoder
    set (target = input). ``substitute`` is
    True for sets regenerated from a published description rather than read from the original
    files: numbers obtained on them are not comparable with published ones.
    """

    name: str
    x_train: np.ndarray
    x_test: np.ndarray
    y_train: np.ndarray | None = None
    y_test: np.ndarray | None = None
    description: str = ""
    substitute: bool = False
    source: str = ""
    n_classes: int | None = None

    def __post_init__(self):
        check_array(self.x_train, f"{self.name} x_train")
        check_array(self.x_test, f"{self.name} x_test")
        if self.x_train.ndim < 2 or self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(f"{self.name}: x_train {self.x_train.shape} and x_test {self.x_test.shape} must both be "
                            "(N, features...) with the same feature shape; reshape them")
        if self.x_train.dtype != self.x_test.dtype:
            raise DataError(f"{self.name}: x_train is {self.x_train.dtype} but x_test is {self.x_test.dtype}; "
                            "cast both to one dtype")
        if (self.y_train is None) != (self.y_test is None):
            raise DataError(f"{self.name}: give labels for both splits or for neither (y_train and y_test)")
        if self.y_train is None:
            if self.n_classes is not None:
                raise DataError(f"{self.name}: n_classes={self.n_classes} given without labels; "
                                "pass y_train and y_test")
            return
        if self.is_regression:
            self._check_regression_targets()
            return
        if self.n_classes is None or self.n_classes < 2:
            raise DataError(f"{self.name}: a labelled set needs n_classes >= 2 (got {self.n_classes!r}); "
                            "pass the number of classes, or give float targets for regression")
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if not isinstance(y, np.ndarray) or y.dtype != np.int64 or y.shape != (len(x),):
                got = f"{y.dtype} {y.shape}" if isinstance(y, np.ndarray) else type(y).__name__
                raise DataError(f"{self.name} y_{split}: labels must be int64 of shape ({len(x)},) but are {got}; "
                                "convert them with numpy.asarray(labels, dtype=numpy.int64)")
            if y.min() < 0 or y.max() >= self.n_classes:
                raise DataError(f"{self.name} y_{split}: labels span [{y.min()}, {y.max()}] outside "
                                f"0..{self.n_classes - 1}; fix the labels or n_classes")

    def _check_regression_targets(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            check_array(y, f"{self.name} y_{split}")
            if len(y) != len(x) or y.ndim < 1 or y.shape[1:] != self.y_train.shape[1:]:
                raise DataError(f"{self.name} y_{split}: regression targets must be (N, outputs...) with N = {len(x)} "
                                f"and the same output shape in both splits, got {y.shape}")

    @property
    def is_regression(self) -> bool:
        """True for real-valued targets (a regression set)."""
        return (self.n_classes is None and isinstance(self.y_train, np.ndarray)
                and np.issubdtype(self.y_train.dtype, np.floating))

    @property
    def n_train(self) -> int:
        return len(self.x_train)

    @property
    def n_test(self) -> int:
        return len(self.x_test)

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def n_features(self) -> int:
        return int(np.prod(self.feature_shape))

    @property
    def is_autoencoder(self) -> bool:
        """True when the target is the input (no labels)."""
        return self.y_train is None

    def targets(self, split: str) -> np.ndarray:
        """The training targets of ``split`` ('train' or 'test'): labels, or the inputs themselves."""
        if split not in ("train", "test"):
            raise DataError(f"split {split!r} is not one of 'train', 'test'")
        y = self.y_train if split == "train" else self.y_test
        if y is None:
            return self.x_train if split == "train" else self.x_test
        return y

    def __repr__(self) -> str:
        kind = "autoencoder" if self.is_autoencoder else "regression" if self.is_regression else f"{self.n_classes}-class"
        tag = ", substitute" if self.substitute else ""
        return (f"Dataset({self.name!r}, {kind}, train {self.x_train.shape}, test {self.x_test.shape}, "
                f"{self.x_train.dtype}{tag})")
