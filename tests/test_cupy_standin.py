"""The CuPy stand-in itself (tests/cupy_standin.py): it must be as strict as CuPy at its boundary,
or the CuPy halves of the suite prove nothing. Also: every array-module name the code uses exists
in CuPy (the names the stand-in was built from)."""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys

import h5py
import numpy
import pytest

from tests import cupy_names, cupy_standin

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def cp():
    """The stand-in module (whether or not this pass installed it as ``cupy``)."""
    mod, _ = cupy_standin._MODULE, cupy_standin._CUPYX
    return mod


@pytest.fixture
def cpx():
    return cupy_standin._CUPYX


def test_no_implicit_conversion_to_numpy(cp, tmp_path):
    a = cp.arange(6.0)
    for convert in (numpy.asarray, numpy.array, lambda v: numpy.concatenate([v, numpy.ones(2)])):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed|Unsupported type"):
            convert(a)
    with h5py.File(tmp_path / "x.h5", "w") as f, pytest.raises(TypeError):
        f.create_dataset("a", data=a)
    numpy.testing.assert_array_equal(a.get(), numpy.arange(6.0))
    numpy.testing.assert_array_equal(cp.asnumpy(a), numpy.arange(6.0))


def test_host_and_device_arrays_do_not_mix(cp):
    a, h = cp.ones(3), numpy.ones(3)
    for op in (lambda: a + h, lambda: h + a, lambda: a * h, lambda: a @ numpy.eye(3), lambda: cp.dot(a, h),
               lambda: cp.where(a > 0, h, 0), lambda: cp.stack([a, h])):
        with pytest.raises(TypeError, match="Unsupported type"):
            op()
    assert (a + numpy.float32(2)).dtype == numpy.float64  # NumPy scalars are fine, as in CuPy
    b = cp.asarray(h)  # the explicit host-to-device copy
    assert isinstance(b, cp.ndarray)


def test_reductions_and_indexing_give_device_scalars(cp):
    a = cp.arange(6.0).reshape(2, 3)
    for v in (a.sum(), a.max(), cp.dot(a[0], a[1]), a[1, 2], cp.allclose(a, a), cp.linalg.norm(a)):
        assert isinstance(v, cp.ndarray) and v.shape == ()
    v = a[1, 2]
    v[...] = 10.0  # a 0-d view, as CuPy's
    assert float(a[1, 2]) == 10.0


def test_syncs_are_counted_by_call_site(cp):
    a = cp.arange(4.0)
    before = cp.counters.copy()
    float(a.sum())
    bool(a[0] > 0)
    a.sum().item()
    cp.asnumpy(a)
    a[a > 1]  # boolean mask: the output size is data-dependent
    delta = cp.counters - before
    assert delta.n_syncs == 5
    assert all(site.startswith("tests/test_cupy_standin.py:") for site in delta.syncs), delta.syncs
    before = cp.counters.copy()
    b = (a * 2 + 1).sum()
    delta = cp.counters - before
    assert delta.n_syncs == 0 and delta.launches == 3 and isinstance(b, cp.ndarray)


def test_allow_synchronize_false_raises_on_a_sync(cp, cpx):
    a = cp.arange(3.0)
    with cpx.allow_synchronize(False):
        a.sum() * 2  # device work is fine
        with pytest.raises(cpx.DeviceSynchronized):
            float(a.sum())
    float(a.sum())


def test_linalg_does_not_raise_unless_asked(cp, cpx):
    indefinite = cp.asarray(numpy.array([[1.0, 2.0], [2.0, 1.0]]))
    L = cp.linalg.cholesky(indefinite)  # CuPy returns a wrong factor instead of raising
    assert bool(cp.isfinite(L).all()) and not numpy.allclose((L @ L.T).get(), indefinite.get())
    assert not bool(cp.isfinite(cp.linalg.inv(cp.zeros((2, 2)))).all())
    with cpx.errstate(linalg="raise"), pytest.raises(numpy.linalg.LinAlgError):
        cp.linalg.cholesky(indefinite)
    spd = cp.asarray(numpy.array([[4.0, 2.0], [2.0, 3.0]]))
    numpy.testing.assert_allclose(cp.linalg.cholesky(spd).get(), numpy.linalg.cholesky(spd.get()))


def test_numpy_functions_dispatch_to_the_device_as_in_cupy(cp):
    a = cp.arange(3.0)
    assert isinstance(numpy.exp(a), cp.ndarray) and isinstance(numpy.sum(a), cp.ndarray)


def test_the_stand_in_has_exactly_cupys_names(cp, cpx):
    exported = {n for n in dir(cp) if not n.startswith("_")} - {"counters"}
    assert cupy_names.MODULE <= exported
    assert cupy_names.LINALG <= {n for n in dir(cp.linalg) if not n.startswith("_")}
    assert cupy_names.CUPYX <= {n for n in dir(cpx) if not n.startswith("_")}
    with pytest.raises(NotImplementedError, match="stand-in"):
        cp.RawKernel("", "f")


def _real_cupy():
    """The real cupy package when it is installed (it imports without a GPU), else None."""
    mod = sys.modules.get("cupy")
    if mod is not None:
        return None if getattr(mod, "_standin", False) else mod
    if importlib.util.find_spec("cupy") is None:
        return None
    try:
        return importlib.import_module("cupy")
    except Exception:  # a broken CUDA install
        return None


def test_names_match_the_installed_cupy():
    cupy = _real_cupy()
    if cupy is None:
        pytest.skip("the real cupy package is not importable here (pip install cupy-cuda12x imports without a GPU)")
    public = {n for n in dir(cupy) if not n.startswith("_") and n != "annotations"}
    assert public == set(cupy_names.MODULE), "regenerate tests/cupy_names.py: python tests/cupy_standin.py --names"


def _array_module_names(path: pathlib.Path) -> set[tuple[str, ...]]:
    """Attribute chains used on a variable named ``xp`` (``xp.linalg.inv`` -> ('linalg', 'inv'))."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            chain, cur = [], node
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id in ("xp", "cp", "cupy"):
                names.add(tuple(reversed(chain)))
    return names


def test_every_array_module_name_the_code_uses_exists_in_cupy():
    """``xp.something`` in engine/, solvers/, nets/ and data/ must exist in CuPy (the lowest supported
    version's API, read off the real package): a NumPy-only name would fail only on a GPU."""
    namespaces = {"linalg": cupy_names.LINALG, "random": cupy_names.RANDOM}
    allowed_submodules = {"lib": {"stride_tricks"}, "cuda": None}  # cuda.* is CuPy's own API
    missing = []
    for folder in ("engine", "solvers", "nets", "data"):
        for path in sorted((REPO / folder).rglob("*.py")):
            for chain in _array_module_names(path):
                head = chain[0]
                if head in namespaces and len(chain) > 1:
                    ok = chain[1] in namespaces[head]
                elif head in allowed_submodules:
                    ok = allowed_submodules[head] is None or len(chain) == 1 or chain[1] in allowed_submodules[head]
                else:
                    ok = head in cupy_names.MODULE or head in ("__name__", "__version__", "ndarray")
                if not ok:
                    missing.append(f"{path.relative_to(REPO)}: xp.{'.'.join(chain)}")
    assert not missing, "not in CuPy " + cupy_names.CUPY_VERSION + ": " + ", ".join(sorted(missing))


# --- cupy.fuse, strict ------------------------------------------------------------------------------
_REFUSED_IN_FUSE = {
    "the .real attribute": lambda cp: lambda x: x.real,
    "a method (sum)": lambda cp: lambda x: x.sum(),
    "indexing": lambda cp: lambda x: x[0],
    "a GEMM": lambda cp: lambda x: cp.dot(x, x),
    "a non-ufunc routine": lambda cp: lambda x: cp.concatenate([x, x]),
    "two reductions": lambda cp: lambda x: cp.sum(cp.amax(x, axis=0)),
    "mixing values from before and after the reduction": lambda cp: lambda x: cp.sum(x) + x,
    "a reduction keyword CuPy drops (keepdims)": lambda cp: lambda x: cp.sum(x, axis=0, keepdims=True),
    "a Python branch on a value": lambda cp: lambda x: x if x > 0 else -x,
    "abs() (no __abs__ on fusion variables)": lambda cp: lambda x: abs(x),
    "an array from outside the arguments": lambda cp: (lambda outside: lambda x: x + outside)(cp.ones(3)),
    "a scalar argument after the reduction (CuPy: 'Shape mismatch')": lambda cp: None,
}


@pytest.mark.parametrize("what", sorted(_REFUSED_IN_FUSE))
def test_fuse_refuses_what_cupy_fusion_refuses(cp, what):
    if what.startswith("a scalar argument"):
        def body(x, n):
            return cp.sum(x) / n
        with pytest.raises(TypeError):
            cp.fuse(body)(cp.ones(3), 2.0)
        return
    body = _REFUSED_IN_FUSE[what](cp)
    with pytest.raises(TypeError):
        cp.fuse(body)(cp.asarray(numpy.arange(6.0).reshape(2, 3)))


def test_fuse_runs_what_cupy_fusion_accepts_as_one_launch(cp):
    x = cp.asarray(numpy.array([[-1.0, 2.0, -3.0], [4.0, -5.0, 6.0]]))
    z = (x + 0.5j).astype(numpy.complex128)

    @cp.fuse(kernel_name="mixed")
    def mixed(x, z, zr, a):
        mask = zr > 0
        return cp.where(mask, z, 0) * a, mask, cp.exp(-x) + cp.real(z)

    before = cp.counters.launches
    y, mask, e = mixed(x, z, z.real, 2.0)
    assert cp.counters.launches - before == 1 and cp.counters.ops["fuse:mixed"] >= 1
    numpy.testing.assert_array_equal(y.get(), numpy.where(x.get() > 0, 2 * z.get(), 0))
    numpy.testing.assert_array_equal(e.get(), numpy.exp(-x.get()) + x.get())

    @cp.fuse
    def inplace_then_nothing(a, b, w):
        a *= w
        a += b
    a = cp.ones((2, 3))
    inplace_then_nothing(a, x, 0.5)
    numpy.testing.assert_array_equal(a.get(), 0.5 + x.get())

    @cp.fuse
    def map_reduce_then_map(v, n):
        return cp.sqrt(cp.sum(v * v / n, axis=1)) * 2  # a literal may follow the reduction, an argument may not
    numpy.testing.assert_allclose(map_reduce_then_map(x, 2.0).get(), numpy.sqrt((x.get() ** 2 / 2).sum(axis=1)) * 2)


def test_fuse_outputs_have_the_broadcast_shape_of_all_arguments(cp):
    """An ElementwiseKernel's outputs take the shape of all its array arguments together: a result
    computed from 0-d arguments only comes back full-size when a vector is also passed."""
    v, c = cp.ones(4), cp.asarray(numpy.float64(3.0))

    @cp.fuse
    def scalar_part(c, v):
        return c * 2

    assert scalar_part(c, v).shape == (4,)
    assert scalar_part(c, c).shape == ()
