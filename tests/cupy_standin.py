"""A strict CuPy stand-in: CuPy's API surface backed by NumPy, so the CuPy path runs without a GPU.

Installed as ``cupy`` (and ``cupyx``) in ``sys.modules`` by ``tests/conftest.py`` when the tests
run with ``CSTEP_CUPY=standin`` (or ``pytest --cupy-standin``); ``engine.backend`` then finds and
selects it exactly as it would select CuPy. What it models, at CuPy's boundary:

* **No implicit host conversion.** ``ndarray.__array__`` raises CuPy's ``TypeError``, so
  ``numpy.asarray``, h5py, SciPy and numba reject device arrays, as they do CuPy's. Host
  ``numpy.ndarray`` operands are refused in arithmetic and in every function except the
  host-to-device copies (``asarray``, ``array``...), again as CuPy does.
* **Device scalars.** Reductions and integer indexing return 0-d device arrays, never Python or
  NumPy scalars; ``allclose`` and ``array_equal`` return 0-d device booleans.
* **Host syncs are counted by call site**: ``float``, ``int``, ``bool``, ``complex``, ``.item()``,
  ``.tolist()``, ``.get()``, ``asnumpy``, ``repr``, boolean-mask indexing and the functions whose
  output size depends on the data (``nonzero``, ``unique``...). ``cupyx.allow_synchronize(False)``
  makes any of them raise ``cupyx.DeviceSynchronized``, as CuPy does.
* **Array operations are counted** as kernel launches (one per function, operator or computing
  method; views, shape queries and ``empty`` launch nothing).
* **CuPy's linear-algebra errors**: ``cholesky``, ``inv`` and ``solve`` do not raise on a
  singular or indefinite matrix (unless ``cupyx.errstate(linalg="raise")``): ``cholesky`` returns
  the partial factor a LAPACK ``potrf`` leaves (finite and wrong), ``inv``/``solve`` return
  non-finite values.

The names come from the real package (``tests/cupy_names.py``, regenerated with
``python tests/cupy_standin.py --names`` where CuPy is installed); a name CuPy has but NumPy
lacks (``ElementwiseKernel``, ``RawKernel``...) raises ``NotImplementedError`` when used.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import os
import sys
import threading
import types

import numpy

try:
    from . import cupy_names as _names
except ImportError:  # run as a script
    import cupy_names as _names

__all__ = ["make_modules", "install", "counters", "Counters", "FusionError"]

_HERE = os.path.abspath(__file__)
_ROOT = os.path.dirname(os.path.dirname(_HERE))


# --- counters ---------------------------------------------------------------------------------
class Counters:
    """Kernel launches (total and by operation), host syncs by call site, host<->device copies."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.launches = 0
        self.ops = collections.Counter()
        self.syncs = collections.Counter()
        self.h2d = 0
        self.h2d_bytes = 0
        self.d2h = 0

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())

    def copy(self) -> Counters:
        c = Counters()
        c.launches, c.h2d, c.d2h, c.h2d_bytes = self.launches, self.h2d, self.d2h, self.h2d_bytes
        c.ops, c.syncs = self.ops.copy(), self.syncs.copy()
        return c

    def __sub__(self, other: Counters) -> Counters:
        c = Counters()
        c.launches, c.h2d, c.d2h = self.launches - other.launches, self.h2d - other.h2d, self.d2h - other.d2h
        c.h2d_bytes = self.h2d_bytes - other.h2d_bytes
        c.ops, c.syncs = self.ops - other.ops, self.syncs - other.syncs
        return c

    def __repr__(self) -> str:
        return f"Counters(launches={self.launches}, syncs={self.n_syncs}, h2d={self.h2d}, d2h={self.d2h})"


counters = Counters()
_local = threading.local()


def _launch(name: str) -> None:
    if getattr(_local, "fusion", None) is not None:
        raise FusionError(f"cupy.fuse: {name} on a device array inside a fused function (only its arguments, "
                          "as fused values, may be used)")
    if True:
        counters.launches += 1
        counters.ops[name] += 1


_BACKEND = os.path.join(_ROOT, "engine", "backend.py")


def _call_site() -> str:
    """'path:line' of the first frame outside this file and ``engine/backend.py`` (so a sync through
    ``to_host`` is charged to its caller), relative to the repository."""
    f = sys._getframe(2)
    while f is not None and os.path.abspath(f.f_code.co_filename) in (_HERE, _BACKEND):
        f = f.f_back
    if f is None:
        return "?"
    path = os.path.abspath(f.f_code.co_filename)
    if path.startswith(_ROOT + os.sep):
        path = path[len(_ROOT) + 1:]
    return f"{path}:{f.f_lineno}"


class DeviceSynchronized(RuntimeError):
    """Raised when a host sync happens inside ``cupyx.allow_synchronize(False)`` (CuPy's class)."""

    def __init__(self, message=None):
        super().__init__(message or "Device synchronization was detected while disallowed.")


def _sync(what: str) -> None:
    if getattr(_local, "sync_forbidden", 0):
        raise DeviceSynchronized(f"Device synchronization was detected while disallowed ({what} at {_call_site()}).")
    counters.syncs[_call_site()] += 1


_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. "
             "Please use `.get()` to construct a NumPy array explicitly.")


# --- wrapping ---------------------------------------------------------------------------------
def _wrap(x):
    if isinstance(x, numpy.ndarray):
        return ndarray._of(x)
    if isinstance(x, numpy.generic) and not isinstance(x, (numpy.str_, numpy.bytes_, numpy.void)):
        return ndarray._of(numpy.asarray(x))
    if isinstance(x, tuple):
        wrapped = [_wrap(v) for v in x]
        return type(x)(*wrapped) if hasattr(x, "_fields") else tuple(wrapped)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _unwrap(x, host_ok: bool = False):
    """NumPy data of a stand-in array; host ndarrays are refused unless ``host_ok``."""
    if type(x) is ndarray:
        return x._a
    if isinstance(x, numpy.ndarray):
        if host_ok:
            return x
        raise TypeError(f"Unsupported type {type(x)}")
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_unwrap(v, host_ok) for v in x)
    return x


def _unwrap_kwargs(kwargs: dict, host_ok: bool = False) -> dict:
    return {k: _unwrap(v, host_ok) for k, v in kwargs.items()}


# --- ndarray ----------------------------------------------------------------------------------
_VIEW_METHODS = {"reshape", "ravel", "view", "transpose", "swapaxes", "squeeze", "diagonal"}
_HOST_METHODS = {"tobytes", "tofile", "dump", "dumps"}


class _Flags:
    def __init__(self, a: numpy.ndarray):
        self.c_contiguous = bool(a.flags.c_contiguous)
        self.f_contiguous = bool(a.flags.f_contiguous)
        self.owndata = bool(a.flags.owndata)

    def __getitem__(self, key):
        return {"C_CONTIGUOUS": self.c_contiguous, "F_CONTIGUOUS": self.f_contiguous, "OWNDATA": self.owndata}[key]


class ndarray:
    """A device array of the stand-in: a NumPy array that refuses to leave the device implicitly."""

    __slots__ = ("_a",)
    __array_priority__ = 100
    __hash__ = None

    def __init__(self, shape, dtype=float, memptr=None, strides=None, order="C"):
        self._a = numpy.empty(shape, dtype=dtype, order=order)

    @classmethod
    def _of(cls, a: numpy.ndarray) -> ndarray:
        obj = object.__new__(cls)
        obj._a = a
        return obj

    # -- refusal of implicit host conversion
    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        fn = _MODULE_FUNCS.get(ufunc.__name__)
        if method != "__call__" or fn is None:
            return NotImplemented
        return fn(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        fn = _MODULE_FUNCS.get(func.__name__)
        if fn is None:
            return NotImplemented
        return fn(*args, **kwargs)

    # -- host syncs
    def get(self, stream=None, order="C", out=None, blocking=True):
        _sync("ndarray.get")
        counters.d2h += 1
        if out is not None:
            out[...] = self._a
            return out
        return numpy.array(self._a, order=order)

    def set(self, arr, stream=None):
        """A host-to-device copy into this array (asynchronous on CuPy from pinned memory)."""
        counters.h2d += 1
        counters.h2d_bytes += int(numpy.asarray(arr).nbytes)
        self._a[...] = arr

    def item(self, *args):
        _sync("ndarray.item")
        counters.d2h += 1
        return self._a.item(*args)

    def tolist(self):
        _sync("ndarray.tolist")
        counters.d2h += 1
        return self._a.tolist()

    def __float__(self):
        _sync("float()")
        counters.d2h += 1
        return float(self._a)

    def __int__(self):
        _sync("int()")
        counters.d2h += 1
        return int(self._a)

    def __complex__(self):
        _sync("complex()")
        counters.d2h += 1
        return complex(self._a)

    def __bool__(self):
        _sync("bool()")
        counters.d2h += 1
        return bool(self._a)

    def __repr__(self):
        _sync("repr()")
        return repr(self._a)

    def __str__(self):
        _sync("str()")
        return str(self._a)

    def __format__(self, spec):
        _sync("format()")
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # -- shape and views (no launch)
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    itemsize = property(lambda self: self._a.itemsize)
    nbytes = property(lambda self: self._a.nbytes)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    #: the device pointer NCCL's bindings take (``a.data.ptr``); here the host buffer's address
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.ctypes.data))
    base = property(lambda self: None if self._a.base is None else ndarray._of(self._a.base))
    T = property(lambda self: ndarray._of(self._a.T))
    mT = property(lambda self: ndarray._of(self._a.mT))
    device = property(lambda self: _cuda.Device(0))
    #: ``cupy.cuda.MemoryPointer``'s ``ptr``: the address of the first element (views share the buffer)
    data = property(lambda self: types.SimpleNamespace(ptr=self._a.__array_interface__["data"][0]))

    @property
    def real(self):
        return ndarray._of(self._a.real)

    @real.setter
    def real(self, value):
        _launch("real.set")
        self._a.real = _unwrap(value)

    @property
    def imag(self):
        if not numpy.iscomplexobj(self._a):
            _launch("zeros")
            return ndarray._of(numpy.zeros_like(self._a))
        return ndarray._of(self._a.imag)

    @imag.setter
    def imag(self, value):
        _launch("imag.set")
        self._a.imag = _unwrap(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        if self._a.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (ndarray._of(self._a[i:i + 1].reshape(self._a.shape[1:])) for i in range(self._a.shape[0]))

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        out = self._a.astype(dtype, order=order, copy=copy)
        if out is not self._a:
            _launch("astype")
        return ndarray._of(out)

    def copy(self, order="C"):
        _launch("copy")
        return ndarray._of(self._a.copy(order=order))

    def fill(self, value):
        _launch("fill")
        self._a.fill(_unwrap(value))

    # -- indexing
    def __getitem__(self, key):
        key = _index_key(key)
        if isinstance(key, tuple) and all(isinstance(k, (int, numpy.integer)) for k in key) or isinstance(key, (int, numpy.integer)):
            key = (key if isinstance(key, tuple) else (key,)) + (Ellipsis,)  # a 0-d view, as CuPy returns
        out = self._a[key]
        if not isinstance(out, numpy.ndarray) or not numpy.may_share_memory(out, self._a):
            _launch("getitem")
        return _wrap(out)

    def __setitem__(self, key, value):
        key = _index_key(key)
        _launch("setitem")
        if isinstance(value, numpy.ndarray):
            counters.h2d += 1
        self._a[key] = _unwrap(value, host_ok=True)

    # -- operators
    def __abs__(self):
        return _MODULE_FUNCS["absolute"](self)

    def __neg__(self):
        return _MODULE_FUNCS["negative"](self)

    def __pos__(self):
        return _MODULE_FUNCS["positive"](self)

    def __invert__(self):
        return _MODULE_FUNCS["invert"](self)

    def __copy__(self):
        return self.copy()

    def __deepcopy__(self, memo):
        return self.copy()

    def __reduce__(self):
        raise TypeError("the stand-in's device arrays are not picklable; use .get()")


def _index_key(key):
    """A NumPy index from a key that may hold device arrays (a boolean mask syncs: data-dependent size)."""
    parts = key if isinstance(key, tuple) else (key,)
    out = []
    for k in parts:
        if type(k) is ndarray:
            if k._a.dtype == numpy.bool_ and k._a.ndim > 0:
                _sync("boolean-mask indexing")
            out.append(k._a)
        elif isinstance(k, numpy.ndarray):
            counters.h2d += 1
            out.append(k)
        else:
            out.append(k)
    return tuple(out) if isinstance(key, tuple) else out[0]


def _binary(ufunc_name, reflected=False, inplace=False):
    def op(self, other):
        if type(other) is not ndarray and isinstance(other, numpy.ndarray):
            raise TypeError(f"Unsupported type {type(other)}")
        if not (type(other) is ndarray or isinstance(other, (int, float, complex, bool, numpy.generic))):
            return NotImplemented
        fn = getattr(numpy, ufunc_name)
        b = _unwrap(other)
        _launch(ufunc_name)
        if inplace:
            fn(self._a, b, out=self._a, casting="same_kind")
            return self
        return _wrap(fn(b, self._a) if reflected else fn(self._a, b))
    op.__name__ = ufunc_name
    return op


for _dunder, _uf in {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "divide",
                     "floordiv": "floor_divide", "mod": "remainder", "pow": "power", "matmul": "matmul",
                     "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor",
                     "lshift": "left_shift", "rshift": "right_shift"}.items():
    setattr(ndarray, f"__{_dunder}__", _binary(_uf))
    setattr(ndarray, f"__r{_dunder}__", _binary(_uf, reflected=True))
    setattr(ndarray, f"__i{_dunder}__", _binary(_uf, inplace=True))
for _dunder, _uf in {"eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal",
                     "gt": "greater", "ge": "greater_equal"}.items():
    setattr(ndarray, f"__{_dunder}__", _binary(_uf))


def _method(name):
    def method(self, *args, **kwargs):
        out_given = kwargs.get("out")
        res = getattr(self._a, name)(*_unwrap(args), **_unwrap_kwargs(kwargs))
        if name in _VIEW_METHODS:
            if not (isinstance(res, numpy.ndarray) and numpy.may_share_memory(res, self._a)):
                _launch(name)
        else:
            _launch(name)
        return out_given if out_given is not None else _wrap(res)
    method.__name__ = name
    return method


def _host_method(name):
    def method(self, *args, **kwargs):
        _sync(f"ndarray.{name}")
        counters.d2h += 1
        return getattr(self._a, name)(*args, **kwargs)
    method.__name__ = name
    return method


for _name in _names.NDARRAY:
    if _name in ndarray.__dict__ or not hasattr(numpy.ndarray, _name):
        continue
    setattr(ndarray, _name, _host_method(_name) if _name in _HOST_METHODS else _method(_name))
ndarray.__module__ = "cupy"


# --- module functions -------------------------------------------------------------------------
#: host data becomes device data through these (a host-to-device copy), as with CuPy
_FROM_HOST = {"array", "asarray", "asanyarray", "ascontiguousarray", "asfortranarray", "asarray_chkfinite",
              "frombuffer", "fromfile", "fromfunction", "fromiter", "fromstring", "loadtxt", "genfromtxt", "load"}
#: functions that return host metadata, not device data: no launch, results passed through
_HOST_RESULT = {"shape", "ndim", "size", "result_type", "can_cast", "promote_types", "min_scalar_type", "dtype",
                "finfo", "iinfo", "issubdtype", "isscalar", "broadcast_shapes", "common_type", "mintypecode",
                "iscomplexobj", "isrealobj", "get_include", "base_repr", "binary_repr", "typename", "isdtype",
                "ndindex", "printoptions", "set_printoptions", "get_printoptions", "errstate", "geterr", "seterr",
                "may_share_memory", "shares_memory", "show_config", "nditer", "broadcast", "index_exp", "s_",
                "format_float_positional", "format_float_scientific", "iterable", "save", "savez",
                "savez_compressed", "savetxt", "array2string", "array_repr", "array_str"}
#: functions whose output size depends on the data: CuPy synchronises to allocate it
_DATA_DEPENDENT = {"nonzero", "argwhere", "flatnonzero", "unique", "unique_all", "unique_counts", "unique_inverse",
                   "unique_values", "compress", "extract", "trim_zeros", "intersect1d", "union1d", "setdiff1d",
                   "setxor1d"}
#: views and allocations that launch no kernel
_NO_LAUNCH = {"empty", "empty_like", "reshape", "ravel", "transpose", "swapaxes", "moveaxis", "squeeze",
              "expand_dims", "atleast_1d", "atleast_2d", "atleast_3d", "broadcast_to", "broadcast_arrays",
              "diagonal", "real", "imag", "split", "array_split", "hsplit", "vsplit", "dsplit",
              "matrix_transpose", "permute_dims", "rollaxis"}
#: CuPy returns a 0-d device boolean where NumPy returns a Python bool
_DEVICE_BOOL = {"allclose", "array_equal", "array_equiv"}


def _make_function(name, fn):
    def wrapper(*args, **kwargs):
        if _fusion_state() is not None:
            return _fused_call(name, fn, args, kwargs)
        out_given = kwargs.get("out")
        if name in _FROM_HOST:
            if not (args and type(args[0]) is ndarray):
                counters.h2d += 1
                counters.h2d_bytes += int(numpy.asarray(args[0]).nbytes) if args else 0
            res = fn(*_unwrap(args, host_ok=True), **_unwrap_kwargs(kwargs, host_ok=True))
            if not (args and type(args[0]) is ndarray and res is args[0]._a):
                _launch(name)
            return _wrap(res)
        res = fn(*_unwrap(args), **_unwrap_kwargs(kwargs))
        if name in _HOST_RESULT:
            return res
        if name in _DATA_DEPENDENT or (name == "where" and len(args) == 1):
            _sync(f"{name}()")
        if name in _DEVICE_BOOL:
            res = numpy.asarray(res)
        if name in _NO_LAUNCH:
            first = args[0] if args else None
            if not (type(first) is ndarray and isinstance(res, numpy.ndarray) and numpy.may_share_memory(res, first._a)):
                if name not in ("empty", "empty_like") and not isinstance(res, (list, tuple)):
                    _launch(name)
        else:
            _launch(name)
        return out_given if out_given is not None and type(out_given) is ndarray else _wrap(res)
    wrapper.__name__ = wrapper.__qualname__ = name
    wrapper.__doc__ = f"Stand-in for cupy.{name} (NumPy's {name} on the device arrays' data)."
    return wrapper


def _not_implemented(name):
    def missing(*args, **kwargs):
        raise NotImplementedError(f"the CuPy stand-in has no {name}: it only models what NumPy can compute")
    missing.__name__ = name
    return missing


def _asnumpy(a, stream=None, order="C", out=None, blocking=True):
    if type(a) is ndarray:
        return a.get(order=order, out=out)
    return numpy.asarray(a, order=order)


def _get_array_module(*args):
    for a in args:
        if type(a) is ndarray:
            return sys.modules.get("cupy", _MODULE)
    return numpy


# --- cupy.fuse, strict: only what CuPy's kernel fusion accepts -----------------------------------
#: non-ufunc functions CuPy routes into a fused kernel (cupy/_core/fusion.pyx ``_call_ufunc`` callers)
_FUSE_FUNCTIONS = {"where", "real", "imag", "clip", "copy", "around", "round"}
#: reductions a fused kernel may end with (``_call_reduction``): one per kernel, keyword ``axis`` only
_FUSE_REDUCTIONS = {"sum", "prod", "amax", "amin", "max", "min"}
#: NumPy ufuncs that are not elementwise CuPy ufuncs (generalised ufuncs, no CuPy counterpart)
_NOT_FUSABLE_UFUNCS = {"matmul", "vecdot", "matvec", "vecmat", "isnat", "spacing", "frexp", "modf", "divmod"}


class FusionError(TypeError):
    """What ``cupy.fuse`` refuses (raised where CuPy would fail to trace the function as one kernel)."""


class _FusionVar:
    """A variable of a function being fused: CuPy's ``_FusionVarArray``/``_FusionVarScalar``.

    It has ``dtype``, ``ndim``, the arithmetic and comparison operators (ufuncs), the in-place
    operators (writes into an argument array), ``x[...] = v``, ``astype`` and ``copy``: nothing else
    (no ``shape``, ``.real``, ``.T``, indexing, methods such as ``sum``, no ``abs()``, no ``bool()``).
    ``post`` marks a value computed after the kernel's reduction.
    """

    __slots__ = ("_v", "_post", "_writable", "_const")

    def __init__(self, value, post=False, writable=False, const=False):
        self._v, self._post, self._writable, self._const = value, post, writable, const

    dtype = property(lambda self: numpy.asarray(self._v).dtype)
    ndim = property(lambda self: numpy.ndim(self._v))

    __array_ufunc__ = None  # NumPy scalars defer to the reflected operators

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise FusionError(f"cupy.fuse: a fused value has no attribute {name!r} (CuPy's fusion variables have dtype, "
                          "ndim, the operators, astype and copy; use cupy.real(x), or pass x.real as an argument)")

    def __bool__(self):
        raise FusionError("cupy.fuse: a fused value cannot be used as a Python bool (branch with where)")

    def __index__(self):
        raise FusionError("cupy.fuse: a fused value cannot be used as a Python int")

    __float__ = __int__ = __complex__ = __len__ = __iter__ = __index__

    def __getitem__(self, key):
        raise FusionError("cupy.fuse: indexing inside a fused function is not supported (pass the view as an argument)")

    def __setitem__(self, key, value):
        if not (key is Ellipsis or key == slice(None)):
            raise FusionError("cupy.fuse supports only x[...] = v or x[:] = v")
        _fusion_inplace(self, "copyto", value)

    def astype(self, dtype, order=None, casting=None, subok=None, copy=True):
        if order is not None or casting is not None or subok is not None:
            raise FusionError("cupy.fuse: astype takes only the dtype")
        return _fusion_apply("astype", lambda a: numpy.asarray(a).astype(dtype), (self,))

    def copy(self):
        return _fusion_apply("copy", numpy.copy, (self,))

    def __repr__(self):
        return f"<fusion variable {self.dtype} {self.ndim}-d>"


def _fusion_operand(x):
    if isinstance(x, _FusionVar):
        return x
    if type(x) is ndarray or isinstance(x, numpy.ndarray):
        raise FusionError("cupy.fuse: an array used inside a fused function must be one of its arguments "
                          f"(got a {type(x).__name__} from outside)")
    if isinstance(x, (bool, int, float, complex, numpy.generic)):
        return _FusionVar(x, const=True)
    raise FusionError(f"cupy.fuse: unsupported operand type {type(x).__name__}")


def _fusion_apply(name, fn, args, kwargs=None):
    """An elementwise operation on fused values (one more step of the kernel being traced)."""
    vs = [_fusion_operand(a) for a in args]
    posts = {v._post for v in vs if not v._const}
    if len(posts) > 1:
        raise FusionError(f"cupy.fuse: {name} mixes values from before and after the reduction (CuPy: 'Shape mismatch')")
    with numpy.errstate(all="ignore"):
        out = fn(*[v._v for v in vs], **(kwargs or {}))
    if isinstance(out, tuple):
        return tuple(_FusionVar(o, post=bool(posts and posts.pop())) for o in out)
    return _FusionVar(out, post=bool(posts and posts.pop()))


def _fusion_inplace(target, name, value):
    if not target._writable:
        raise FusionError("cupy.fuse: in-place operations write only into array arguments of an elementwise fused kernel")
    v = _fusion_operand(value)
    _fusion_state()["wrote"] = True
    if not v._const and v._post != target._post:
        raise FusionError("cupy.fuse: in-place operation mixes values from before and after the reduction")
    with numpy.errstate(all="ignore"):
        if name == "copyto":
            numpy.copyto(target._v, v._v, casting="same_kind")
        else:
            getattr(numpy, name)(target._v, v._v, out=target._v, casting="same_kind")
    return target


def _fusion_binary(ufunc, reflected=False, inplace=False):
    def op(self, other):
        if inplace:
            return _fusion_inplace(self, ufunc, other)
        fn = getattr(numpy, ufunc)
        return _fusion_apply(ufunc, (lambda a, b: fn(b, a)) if reflected else fn, (self, other))
    return op


for _dunder, _uf in {"add": "add", "sub": "subtract", "mul": "multiply", "truediv": "true_divide",
                     "floordiv": "floor_divide", "mod": "remainder", "pow": "power",
                     "and": "bitwise_and", "or": "bitwise_or", "xor": "bitwise_xor",
                     "lshift": "left_shift", "rshift": "right_shift"}.items():
    setattr(_FusionVar, f"__{_dunder}__", _fusion_binary(_uf))
    setattr(_FusionVar, f"__r{_dunder}__", _fusion_binary(_uf, reflected=True))
    setattr(_FusionVar, f"__i{_dunder}__", _fusion_binary(_uf, inplace=True))
for _dunder, _uf in {"eq": "equal", "ne": "not_equal", "lt": "less", "le": "less_equal",
                     "gt": "greater", "ge": "greater_equal"}.items():
    setattr(_FusionVar, f"__{_dunder}__", _fusion_binary(_uf))
_FusionVar.__neg__ = lambda self: _fusion_apply("negative", numpy.negative, (self,))
_FusionVar.__pos__ = lambda self: _fusion_apply("positive", numpy.positive, (self,))
_FusionVar.__invert__ = lambda self: _fusion_apply("invert", numpy.invert, (self,))
_FusionVar.__hash__ = None


def _fusion_state():
    return getattr(_local, "fusion", None)


def _fused_call(name, fn, args, kwargs):
    """A module function called inside a fused function: a ufunc, where/real/imag/..., or the one reduction."""
    state = _fusion_state()
    if name in _FUSE_REDUCTIONS:
        if len(args) != 1 or set(kwargs) - {"axis"}:
            raise FusionError(f"cupy.fuse: {name}() takes one array and the keyword axis only (got {sorted(kwargs)})")
        v = _fusion_operand(args[0])
        if v._post or state["reduced"]:
            raise FusionError("cupy.fuse: multiple reductions in one fused kernel are not supported")
        if state["wrote"]:
            raise FusionError("cupy.fuse: a fused reduction cannot also write into its arguments in place")
        state["reduced"] = True
        with numpy.errstate(all="ignore"):
            return _FusionVar(fn(v._v, **kwargs), post=True)
    is_ufunc = isinstance(getattr(numpy, name, None), numpy.ufunc) and name not in _NOT_FUSABLE_UFUNCS
    if not (is_ufunc or name in _FUSE_FUNCTIONS) or (name == "where" and len(args) != 3):
        raise FusionError(f"cupy.fuse cannot fuse cupy.{name}: only ufuncs, where, real/imag, clip, copy, around "
                          "and one final reduction (sum, prod, amax, amin) go into a fused kernel")
    out = kwargs.pop("out", None)
    if set(kwargs) - ({"dtype"} if name == "copy" else set()):
        raise FusionError(f"cupy.fuse: {name}() keyword arguments {sorted(kwargs)} are not supported inside a fused kernel")
    if out is not None:
        state["wrote"] = True
        if not isinstance(out, _FusionVar):
            raise FusionError("cupy.fuse: out= must be a fused array")
        res = _fusion_apply(name, fn, args)
        return _fusion_inplace(out, "copyto", res)
    return _fusion_apply(name, fn, args)


def _fuse(*args, **kwargs):
    """``cupy.fuse``, strict: the body is traced on :class:`_FusionVar` values (so anything CuPy's
    fusion refuses raises :class:`FusionError`) and runs as one launch.

    Arguments: device arrays (0-d included), NumPy scalars, Python scalars, None. Elementwise
    kernels return arrays of the broadcast shape of all array arguments (as an ElementwiseKernel);
    a kernel with a reduction returns the reduced values. In-place writes go into array arguments.
    """
    kernel_name = kwargs.pop("kernel_name", None)
    if kwargs:
        raise TypeError(f"fuse() got unexpected keyword arguments {sorted(kwargs)}")

    def decorate(f):
        name = kernel_name or f.__name__

        @functools.wraps(f)
        def fused(*a):
            if _fusion_state() is not None:  # a fused function called from a fused function: inlined
                return f(*a)
            arrays = [x for x in a if type(x) is ndarray]
            if not arrays:
                return f(*a)  # no device array: CuPy calls the plain function
            for x in a:
                if isinstance(x, numpy.ndarray):
                    raise TypeError(f"Invalid argument type for '{name}': host numpy.ndarray")
                if not (type(x) is ndarray or x is None or isinstance(x, (bool, int, float, complex, numpy.generic))):
                    raise TypeError(f"Invalid argument type for '{name}': {type(x).__name__}")
            _launch(f"fuse:{name}")
            _local.fusion = {"reduced": False, "wrote": False}
            try:
                # arrays and scalars alike are the kernel's parameters: values from before its reduction
                vs = [_FusionVar(x._a, writable=True) if type(x) is ndarray else None if x is None else _FusionVar(x)
                      for x in a]
                # in-place writes into a 0-d argument broadcast against larger ones are refused by CuPy
                res = f(*vs)
                reduced = _local.fusion["reduced"]
                if reduced and _local.fusion["wrote"]:
                    raise FusionError("cupy.fuse: a fused reduction cannot also write into its arguments in place")
            finally:
                _local.fusion = None
            shape = numpy.broadcast_shapes(*[x.shape for x in arrays])
            outs = res if isinstance(res, tuple) else (res,)
            if res is None:
                return None
            wrapped = []
            for o in outs:
                if o is None:
                    wrapped.append(None)
                    continue
                if not isinstance(o, _FusionVar):
                    if isinstance(o, (bool, int, float, complex, numpy.generic)):
                        o = _FusionVar(o, post=reduced)
                    else:
                        raise FusionError(f"cupy.fuse: a fused function cannot return {type(o).__name__}")
                value = numpy.asarray(o._v)
                if not reduced:  # an ElementwiseKernel: every output has the broadcast shape of the arguments
                    value = numpy.array(numpy.broadcast_to(value, shape), order="C")  # a fresh C-contiguous array
                elif not o._post:
                    raise FusionError("cupy.fuse: with a reduction, every output must come after it")
                wrapped.append(ndarray._of(numpy.array(value, order="C")))
            return tuple(wrapped) if isinstance(res, tuple) else wrapped[0]
        fused._standin_fused = f
        return fused
    if len(args) == 1 and callable(args[0]) and kernel_name is None:
        return decorate(args[0])
    return decorate


_MODULE_FUNCS: dict = {}


def _module_attribute(name):
    if name == "ndarray":
        return ndarray
    if name == "asnumpy":
        return _asnumpy
    if name in ("get_array_module",):
        return _get_array_module
    if name == "fuse":
        return _fuse
    if name == "is_available":
        return lambda: True
    if not hasattr(numpy, name):
        if name in ("cuda",):
            return None
        return _not_implemented(name)
    obj = getattr(numpy, name)
    if isinstance(obj, type) or isinstance(obj, (int, float, complex, str)) or obj is None or isinstance(obj, types.ModuleType):
        return obj  # dtypes, exceptions, warnings, constants, newaxis
    if callable(obj):
        fn = _make_function(name, obj)
        _MODULE_FUNCS[name] = fn
        return fn
    return obj


# --- linalg: CuPy's error behaviour -------------------------------------------------------------
_linalg_raise = threading.local()


def _linalg_raises() -> bool:
    return getattr(_linalg_raise, "mode", "ignore") == "raise"


def _partial_cholesky(a: numpy.ndarray) -> numpy.ndarray:
    """What LAPACK/cuSOLVER potrf leaves for a matrix that is not positive definite: the factor up
    to the failing column, the rest of the lower triangle as the Schur complement it reached."""
    L = numpy.tril(numpy.array(a, dtype=a.dtype, copy=True))
    n = L.shape[0]
    for j in range(n):
        d = L[j, j] - L[j, :j] @ L[j, :j]
        if not d > 0:
            L[j, j] = d
            return L
        L[j, j] = numpy.sqrt(d)
        if j + 1 < n:
            L[j + 1:, j] = (L[j + 1:, j] - L[j + 1:, :j] @ L[j, :j]) / L[j, j]
    return L


def _linalg_function(name, fn):
    def wrapper(*args, **kwargs):
        a = [_unwrap(x) for x in args]
        _launch(f"linalg.{name}")
        try:
            with numpy.errstate(all="ignore"):
                return _wrap(fn(*a, **_unwrap_kwargs(kwargs)))
        except numpy.linalg.LinAlgError:
            if _linalg_raises():
                raise
            m = a[0]
            if m.ndim != 2:
                raise
            if name == "cholesky":
                return _wrap(_partial_cholesky(m))
            if name in ("inv", "solve"):
                shape = m.shape if name == "inv" else numpy.shape(a[1])
                dtype = numpy.result_type(*[numpy.asarray(x).dtype for x in a], numpy.float32)
                return _wrap(numpy.full(shape, numpy.nan, dtype=dtype))
            raise
    wrapper.__name__ = name
    return wrapper


@contextlib.contextmanager
def _errstate(*, linalg=None):
    """``cupyx.errstate(linalg='raise'|'ignore')``."""
    old = getattr(_linalg_raise, "mode", "ignore")
    if linalg is not None:
        _linalg_raise.mode = linalg
    try:
        yield
    finally:
        _linalg_raise.mode = old


@contextlib.contextmanager
def _allow_synchronize(allow: bool):
    """``cupyx.allow_synchronize(False)``: a host sync inside raises :class:`DeviceSynchronized`."""
    old = getattr(_local, "sync_forbidden", 0)
    _local.sync_forbidden = 0 if allow else 1
    try:
        yield
    finally:
        _local.sync_forbidden = old


# --- random: device arrays from a NumPy generator ----------------------------------------------
class _Generator:
    """``cupy.random.Generator``: the same methods as NumPy's, returning device arrays."""

    def __init__(self, seed=None):
        self._g = numpy.random.default_rng(seed)

    def __getattr__(self, name):
        method = getattr(self._g, name)

        def draw(*args, **kwargs):
            _launch(f"random.{name}")
            return _wrap(method(*_unwrap(args), **_unwrap_kwargs(kwargs)))
        return draw


class _RandomState(_Generator):
    def __init__(self, seed=None):
        self._g = numpy.random.RandomState(seed)


def _random_module():
    mod = types.ModuleType("cupy.random")
    state = _RandomState()
    for name in _names.RANDOM:
        if name == "default_rng":
            setattr(mod, name, _Generator)
        elif name == "RandomState":
            setattr(mod, name, _RandomState)
        elif name == "seed":
            setattr(mod, name, lambda seed=None: state._g.seed(seed))
        elif name in ("get_random_state",):
            setattr(mod, name, lambda: state)
        elif hasattr(numpy.random.RandomState, name):
            setattr(mod, name, getattr(state, name))
        else:
            setattr(mod, name, _not_implemented(f"random.{name}"))
    return mod


# --- lib.stride_tricks and cupyx.scipy.sparse.linalg ------------------------------------------------
def _lib_module():
    lib = types.ModuleType("cupy.lib")
    st = types.ModuleType("cupy.lib.stride_tricks")
    st.as_strided = lambda x, shape=None, strides=None: ndarray._of(
        numpy.lib.stride_tricks.as_strided(_unwrap(x), shape, strides))

    def sliding_window_view(x, window_shape, axis=None, *, subok=False, writeable=False):
        return ndarray._of(numpy.lib.stride_tricks.sliding_window_view(_unwrap(x), window_shape, axis=axis,
                                                                         writeable=writeable))
    st.sliding_window_view = sliding_window_view
    lib.stride_tricks = st
    return lib


class _LinearOperator:
    """``cupyx.scipy.sparse.linalg.LinearOperator``: shape, dtype and the products, on device arrays."""

    def __init__(self, shape, matvec, rmatvec=None, matmat=None, dtype=None, rmatmat=None):
        self.shape, self.dtype = tuple(shape), numpy.dtype(dtype) if dtype is not None else None
        self._mv, self._rmv, self._mm = matvec, rmatvec, matmat

    def matvec(self, x):
        return self._mv(x)

    def rmatvec(self, x):
        return self._rmv(x)

    def matmat(self, X):
        return self._mm(X) if self._mm is not None else _MODULE.stack([self._mv(X[:, j]) for j in range(X.shape[1])], axis=1)

    def dot(self, x):
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    __matmul__ = dot


def _eigsh(a, k=6, *, which="LM", ncv=None, maxiter=None, tol=0, return_eigenvectors=True):
    """``cupyx.scipy.sparse.linalg.eigsh`` on a stand-in operator (SciPy's Lanczos, products on the device)."""
    import scipy.sparse.linalg as sla  # noqa: PLC0415 (only when used)

    def mv(v):
        counters.h2d += 1
        return _MODULE.asnumpy(a.matvec(_MODULE.asarray(numpy.ascontiguousarray(v).reshape(-1))))
    op = sla.LinearOperator(a.shape, matvec=mv, dtype=a.dtype)
    res = sla.eigsh(op, k=k, which=which, ncv=ncv, maxiter=maxiter, tol=tol, return_eigenvectors=return_eigenvectors)
    return _wrap(res)


def _solve_triangular(a, b, trans=0, lower=False, unit_diagonal=False, overwrite_b=False, check_finite=False):
    """``cupyx.scipy.linalg.solve_triangular`` (cuBLAS trsm: no finiteness check, no raise; a zero
    pivot gives inf/NaN, as the substitution itself does)."""
    import scipy.linalg  # noqa: PLC0415 (only when used)
    _launch("linalg.solve_triangular")
    A, B = _unwrap(a), _unwrap(b)
    with numpy.errstate(all="ignore"):
        try:
            return _wrap(scipy.linalg.solve_triangular(A, B, trans=trans, lower=lower, unit_diagonal=unit_diagonal,
                                                       check_finite=False))
        except numpy.linalg.LinAlgError:  # a zero pivot: substitute anyway, dividing by zero
            T = A.T if trans in (1, "T", 2, "C") else A
            low = lower != (T is not A)
            X = numpy.array(B, dtype=numpy.result_type(A, B, numpy.float32), copy=True)
            n = T.shape[0]
            order = range(n) if low else range(n - 1, -1, -1)
            for i in order:
                rest = slice(0, i) if low else slice(i + 1, n)
                X[i] = X[i] - T[i, rest] @ X[rest]
                if not unit_diagonal:
                    X[i] = X[i] / T[i, i]
            return _wrap(X)


def _cupyx_scipy():
    sp = types.ModuleType("cupyx.scipy")
    sp.linalg = types.ModuleType("cupyx.scipy.linalg")
    sp.linalg.solve_triangular = _solve_triangular
    sparse = types.ModuleType("cupyx.scipy.sparse")
    linalg = types.ModuleType("cupyx.scipy.sparse.linalg")
    linalg.LinearOperator = _LinearOperator
    linalg.eigsh = _eigsh
    sparse.linalg = linalg
    sp.sparse = sparse
    return sp


# --- cuda: one pretend device -------------------------------------------------------------------
class _Stream:
    ptr = 0  # the default stream's handle

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=0):
        pass

    def record(self, event=None):
        event = event or _Event()
        event.record(self)
        return event

    def wait_event(self, event):
        pass  # the stand-in runs every operation at once, in order

    def synchronize(self):
        counters.syncs["stream.synchronize"] += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self


class _Event:
    def __init__(self, *args, **kwargs):
        import time  # noqa: PLC0415 (only the stand-in's clock)
        self._clock = time.perf_counter
        self._t = None

    def record(self, stream=None):
        self._t = self._clock()

    def synchronize(self):
        counters.syncs["event.synchronize"] += 1

    @property
    def done(self):
        return True


def _get_elapsed_time(start: _Event, end: _Event) -> float:
    return (end._t - start._t) * 1e3


class _Device:
    def __init__(self, device=0):
        self.id = int(device)
        self.compute_capability = "90"

    def use(self):
        return self

    def synchronize(self):
        counters.syncs["device.synchronize"] += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _cuda_module():
    cuda = types.ModuleType("cupy.cuda")
    runtime = types.ModuleType("cupy.cuda.runtime")
    runtime.getDeviceCount = lambda: 1
    runtime.getDevice = lambda: 0
    runtime.getDeviceProperties = lambda i: {"name": b"CuPy stand-in (NumPy)", "totalGlobalMem": 0, "major": 9, "minor": 0}
    runtime.runtimeGetVersion = lambda: 12000
    runtime.driverGetVersion = lambda: 12000
    runtime.deviceSynchronize = lambda: _Device().synchronize()
    runtime.memGetInfo = lambda: (64 << 30, 80 << 30)  # (free, total) bytes of a pretend 80 GB device
    runtime.is_hip = False
    cuda.runtime = runtime
    cuda.Device = _Device
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.get_elapsed_time = _get_elapsed_time
    cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 1, Device=_Device)
    stream = _Stream()
    cuda.get_current_stream = lambda: stream
    cuda.is_available = lambda: True
    return cuda


_cuda = types.SimpleNamespace(Device=_Device)


# --- GEMM math mode: CuPy's compute types and the cuBLAS handle's math mode -------------------------
_COMPUTE_TYPES = ("COMPUTE_TYPE_TBD", "COMPUTE_TYPE_DEFAULT", "COMPUTE_TYPE_PEDANTIC", "COMPUTE_TYPE_FP16",
                  "COMPUTE_TYPE_FP32", "COMPUTE_TYPE_FP64", "COMPUTE_TYPE_BF16", "COMPUTE_TYPE_TF32")
#: per dtype index (float16, float32/complex64, float64/complex128), as cupy._core._routines_linalg keeps it
gemm_state = {"compute_types": [0, 0, 0], "math_mode": 0}


def _linalg_internals():
    mod = types.ModuleType("cupy._core._routines_linalg")

    def index(dtype):
        char = numpy.dtype(dtype).char
        return {"e": 0, "f": 1, "F": 1, "d": 2, "D": 2}[char]

    def get_compute_type(dtype):  # as CuPy: TBD resolves from CUPY_TF32 on first use
        i = index(dtype)
        if gemm_state["compute_types"][i] == 0:
            tf32 = numpy.dtype(dtype).char in "fF" and int(os.getenv("CUPY_TF32", "0")) > 0
            gemm_state["compute_types"][i] = 7 if tf32 else 1
        return gemm_state["compute_types"][i]

    def set_compute_type(dtype, compute_type):
        if compute_type not in range(len(_COMPUTE_TYPES)):
            raise ValueError(f"Unknown compute type: {compute_type}")
        gemm_state["compute_types"][index(dtype)] = compute_type

    mod.get_compute_type, mod.set_compute_type = get_compute_type, set_compute_type
    mod.compute_type_to_str = lambda t: _COMPUTE_TYPES[t] if t in range(len(_COMPUTE_TYPES)) else t
    core = types.ModuleType("cupy._core")
    core._routines_linalg = mod
    return core


def _cublas_module():
    mod = types.ModuleType("cupy_backends.cuda.libs.cublas")
    mod.CUBLAS_DEFAULT_MATH, mod.CUBLAS_TENSOR_OP_MATH, mod.CUBLAS_PEDANTIC_MATH, mod.CUBLAS_TF32_TENSOR_OP_MATH = 0, 1, 2, 3
    mod.setMathMode = lambda handle, mode: gemm_state.__setitem__("math_mode", int(mode))
    mod.getMathMode = lambda handle: gemm_state["math_mode"]
    return mod


# --- assembly -----------------------------------------------------------------------------------
def make_modules() -> tuple[types.ModuleType, types.ModuleType]:
    """(cupy, cupyx) stand-in modules."""
    mod = types.ModuleType("cupy", "CuPy stand-in: CuPy's API on NumPy data (tests/cupy_standin.py)")
    mod.__version__ = _names.CUPY_VERSION
    mod.__file__ = _HERE
    mod._standin = True
    mod.counters = counters
    for name in sorted(_names.MODULE):
        value = _module_attribute(name)
        if value is not None or name == "newaxis":
            setattr(mod, name, value)
    mod.cuda = _cuda_module()
    mod._core = _linalg_internals()
    linalg = types.ModuleType("cupy.linalg")
    for name in _names.LINALG:
        if name == "LinAlgError":
            linalg.LinAlgError = numpy.linalg.LinAlgError
        elif hasattr(numpy.linalg, name):
            setattr(linalg, name, _linalg_function(name, getattr(numpy.linalg, name)))
        else:
            setattr(linalg, name, _not_implemented(f"linalg.{name}"))
    mod.linalg = linalg
    mod.random = _random_module()
    mod.lib = _lib_module()
    mod.get_default_memory_pool = lambda: types.SimpleNamespace(used_bytes=lambda: 0, total_bytes=lambda: 0,
                                                               free_all_blocks=lambda: None)
    mod.get_default_pinned_memory_pool = mod.get_default_memory_pool

    x = types.ModuleType("cupyx", "cupyx stand-in (tests/cupy_standin.py)")
    x._standin = True
    for name in _names.CUPYX:
        setattr(x, name, _not_implemented(f"cupyx.{name}"))
    x.scipy = _cupyx_scipy()
    x.errstate = _errstate
    x.allow_synchronize = _allow_synchronize
    x.DeviceSynchronized = DeviceSynchronized
    x.seterr = lambda **kw: None
    x.geterr = lambda: {"linalg": getattr(_linalg_raise, "mode", "ignore")}
    x.empty_pinned = lambda shape, dtype=float, order="C": numpy.empty(shape, dtype, order)
    x.zeros_pinned = lambda shape, dtype=float, order="C": numpy.zeros(shape, dtype, order)
    x.empty_like_pinned = lambda a, dtype=None: numpy.empty_like(a, dtype)
    x.zeros_like_pinned = lambda a, dtype=None: numpy.zeros_like(a, dtype)
    return mod, x


_MODULE, _CUPYX = make_modules()
_CUBLAS = _cublas_module()


def install() -> types.ModuleType:
    """Put the stand-in in ``sys.modules`` as ``cupy``/``cupyx`` (before anything imports CuPy)."""
    real = sys.modules.get("cupy")
    if real is not None and not getattr(real, "_standin", False):
        raise RuntimeError("the real CuPy is already imported; install the stand-in before anything imports cupy")
    sys.modules["cupy"] = _MODULE
    sys.modules["cupy.linalg"] = _MODULE.linalg
    sys.modules["cupy.random"] = _MODULE.random
    sys.modules["cupy.cuda"] = _MODULE.cuda
    sys.modules["cupy.lib"] = _MODULE.lib
    sys.modules["cupy.lib.stride_tricks"] = _MODULE.lib.stride_tricks
    sys.modules["cupy._core"] = _MODULE._core
    sys.modules["cupy._core._routines_linalg"] = _MODULE._core._routines_linalg
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["cupy_backends.cuda.libs.cublas"] = _CUBLAS
    sys.modules["cupy_backends.cuda.libs"].cublas = _CUBLAS
    sys.modules["cupyx"] = _CUPYX
    sys.modules["cupyx.scipy"] = _CUPYX.scipy
    sys.modules["cupyx.scipy.linalg"] = _CUPYX.scipy.linalg
    sys.modules["cupyx.scipy.sparse"] = _CUPYX.scipy.sparse
    sys.modules["cupyx.scipy.sparse.linalg"] = _CUPYX.scipy.sparse.linalg
    return _MODULE


if __name__ == "__main__":  # pragma: no cover - maintenance: regenerate tests/cupy_names.py
    if sys.argv[1:] != ["--names"]:
        sys.exit("usage: python tests/cupy_standin.py --names   (needs the real cupy installed)")
    import textwrap

    import cupy
    import cupyx

    def public(m):
        return sorted(n for n in dir(m) if not n.startswith("_") and n != "annotations")

    def block(name, items):
        body = textwrap.fill(", ".join(repr(x) for x in items), 100, initial_indent="    ", subsequent_indent="    ")
        return f"{name} = frozenset({{\n{body}\n}})\n"

    doc = open(os.path.join(os.path.dirname(_HERE), "cupy_names.py")).read().split('"""')[1]
    text = (f'"""{doc}"""\n\nCUPY_VERSION = "{cupy.__version__}"\n\n'
            + "\n".join(block(n, public(m)) for n, m in (("MODULE", cupy), ("NDARRAY", cupy.ndarray),
                                                           ("LINALG", cupy.linalg), ("RANDOM", cupy.random),
                                                           ("CUPYX", cupyx))))
    with open(os.path.join(os.path.dirname(_HERE), "cupy_names.py"), "w") as fh:
        fh.write(text)
    print(f"wrote tests/cupy_names.py from CuPy {cupy.__version__}")
