"""Communicators: the collectives data-parallel training needs, behind one small interface.

Three implementations, all with the same five operations (DESIGN.md: "communicator (single-process
/ MPI / NCCL)"):

* :class:`SingleProcess`: world size 1; every collective returns its input untouched (no copy);
* :class:`MPICommunicator`: mpi4py on NumPy buffers (``Allreduce`` with ``MPI.IN_PLACE``,
  ``Bcast``, ``Allgather``): CPU ranks, and the rendezvous of the NCCL ranks;
* :class:`NCCLCommunicator`: NCCL on CuPy arrays through ``cupy.cuda.nccl.NcclCommunicator``
  (CuPy's documented multi-process form: rank 0 draws ``get_unique_id()``, MPI broadcasts it,
  every rank calls ``NcclCommunicator(size, uid, rank)`` on device = local rank). Collectives are
  enqueued on the current stream, so they do not synchronise with the host.

Operations: ``allreduce(a)`` (sum over ranks, in place, returns ``a``), ``broadcast(a, root)``
(in place), ``allgather(a)`` (a new ``(size,) + a.shape`` array), ``barrier()``, ``rank`` and
``size``. Arrays are of the communicator's array module and contiguous; complex arrays are
reduced as pairs of reals (a sum of complex numbers is the sum of their real and imaginary parts).
Every collective adds its payload to :attr:`Communicator.bytes` (what this rank hands to the
transport: ``a.nbytes``, ``size * a.nbytes`` for an allgather), which the trainer records per
iteration.

:func:`world` picks the communicator of this process once: single-process unless the process was
started by an MPI launcher (``mpiexec``/``mpirun``/Slurm's ``srun``, recognised by the rank and
size variables they set) with more than one rank; then MPI for the NumPy backend and NCCL for
CuPy. A missing engine is one sentence naming the fix (:class:`CommunicatorError`).
"""

from __future__ import annotations

import os

import numpy

from .backend import array_module

__all__ = ["Communicator", "SingleProcess", "MPICommunicator", "NCCLCommunicator", "CommunicatorError",
           "launcher_world", "world", "make_communicator"]


class CommunicatorError(RuntimeError):
    """The chosen collective engine (MPI, NCCL) cannot be used here."""


class Communicator:
    """The interface; :class:`SingleProcess` is the trivial implementation."""

    name = "single"
    rank = 0
    size = 1
    #: rank within this node (the GPU a CuPy rank drives)
    local_rank = 0

    def __init__(self, parent: "Communicator | None" = None):
        #: bytes handed to the transport by this rank so far, and the number of collectives (a
        #: sub-communicator from :meth:`split` adds its traffic to its parent's too)
        self.bytes = 0
        self.calls = 0
        self.parent = parent

    def _count(self, nbytes: int) -> None:
        self.bytes += int(nbytes)
        self.calls += 1
        if self.parent is not None:
            self.parent._count(nbytes)

    def split(self, color: int, key: int) -> "Communicator":
        """The sub-communicator of the ranks with the same ``color``, ranked by ``key`` (collective)."""
        return self

    def allreduce(self, a):
        """Sum of ``a`` over the ranks, in place; returns ``a``."""
        return a

    def broadcast(self, a, root: int = 0):
        """``a`` of rank ``root`` on every rank, in place; returns ``a``."""
        return a

    def allgather(self, a):
        """A new array of shape ``(size,) + a.shape``: row r is rank r's ``a``."""
        return array_module(a).stack([a])

    def barrier(self) -> None:
        """Wait until every rank is here."""

    def bcast_object(self, obj, root: int = 0):
        """A small picklable host object of rank ``root`` (configs, decisions), on every rank."""
        return obj

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """World size 1: every collective is the identity."""


def _real_view(a):
    """A complex array as its float pairs (same memory), a real array as itself."""
    if a.dtype.kind == "c":
        return a.view(a.real.dtype)
    return a


class MPICommunicator(Communicator):
    """MPI collectives on NumPy buffers through mpi4py (``comm``: default ``MPI.COMM_WORLD``)."""

    name = "mpi"

    def __init__(self, comm=None, parent=None):
        super().__init__(parent)
        self.MPI = _import_mpi()
        self.comm = comm if comm is not None else self.MPI.COMM_WORLD
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        if parent is not None:  # a sub-communicator: the process (and its GPU) stays where it is
            self.local_rank = parent.local_rank
        else:
            self.local_rank = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED).Get_rank() if self.size > 1 else 0

    def _host(self, a, what: str):
        if not isinstance(a, numpy.ndarray):
            raise TypeError(f"MPI {what} takes NumPy arrays, got {type(a).__name__}; CuPy ranks communicate over NCCL")
        if not a.flags.c_contiguous:
            raise ValueError(f"MPI {what} needs a contiguous array")
        return _real_view(a)

    def allreduce(self, a):
        buf = self._host(a, "allreduce")
        self._count(buf.nbytes)
        if self.size > 1:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return a

    def broadcast(self, a, root: int = 0):
        buf = self._host(a, "broadcast")
        self._count(buf.nbytes)
        if self.size > 1:
            self.comm.Bcast(buf, root=root)
        return a

    def allgather(self, a):
        buf = self._host(a, "allgather")
        out = numpy.empty((self.size,) + a.shape, dtype=a.dtype)
        self._count(self.size * buf.nbytes)
        self.comm.Allgather(buf, _real_view(out))
        return out

    def barrier(self) -> None:
        self.comm.Barrier()

    def bcast_object(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def split(self, color: int, key: int) -> "MPICommunicator":
        return MPICommunicator(self.comm.Split(color, key), parent=self)


class NCCLCommunicator(Communicator):
    """NCCL collectives on CuPy arrays (``cupy.cuda.nccl``), rendezvous through ``mpi``.

    The device is the rank's local rank (one GPU per rank). Collectives run on the current CuPy
    stream; ``barrier`` is MPI's after the stream has drained.
    """

    name = "nccl"

    def __init__(self, mpi: MPICommunicator, cupy, parent=None):
        super().__init__(parent)
        nccl = _import_nccl(cupy)
        self.mpi, self.cupy, self.nccl = mpi, cupy, nccl
        self.rank, self.size = mpi.rank, mpi.size
        self.local_rank = parent.local_rank if parent is not None else mpi.local_rank
        cupy.cuda.Device(self.local_rank).use()
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = mpi.bcast_object(uid, root=0)
        self.comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self._types = {numpy.dtype(numpy.float32): nccl.NCCL_FLOAT32, numpy.dtype(numpy.float64): nccl.NCCL_FLOAT64,
                       numpy.dtype(numpy.int64): nccl.NCCL_INT64, numpy.dtype(numpy.int32): nccl.NCCL_INT32}

    def _device(self, a, what: str):
        if array_module(a) is not self.cupy:
            raise TypeError(f"NCCL {what} takes CuPy arrays, got {type(a).__name__}")
        buf = _real_view(a)
        if not buf.flags.c_contiguous:
            raise ValueError(f"NCCL {what} needs a contiguous array")
        try:
            return buf, self._types[numpy.dtype(buf.dtype)]
        except KeyError:
            raise TypeError(f"NCCL {what}: no NCCL type for {buf.dtype}") from None

    def _stream(self):
        return self.cupy.cuda.get_current_stream().ptr

    def allreduce(self, a):
        buf, kind = self._device(a, "allreduce")
        self._count(buf.nbytes)
        self.comm.allReduce(buf.data.ptr, buf.data.ptr, buf.size, kind, self.nccl.NCCL_SUM, self._stream())
        return a

    def broadcast(self, a, root: int = 0):
        buf, kind = self._device(a, "broadcast")
        self._count(buf.nbytes)
        self.comm.bcast(buf.data.ptr, buf.size, kind, root, self._stream())
        return a

    def allgather(self, a):
        buf, kind = self._device(a, "allgather")
        out = self.cupy.empty((self.size,) + a.shape, dtype=a.dtype)
        self._count(self.size * buf.nbytes)
        self.comm.allGather(buf.data.ptr, _real_view(out).data.ptr, buf.size, kind, self._stream())
        return out

    def barrier(self) -> None:
        self.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def bcast_object(self, obj, root: int = 0):
        return self.mpi.bcast_object(obj, root)

    def split(self, color: int, key: int) -> "NCCLCommunicator":
        """A new NCCL communicator over an MPI split (its own unique id, drawn by its rank 0)."""
        return NCCLCommunicator(self.mpi.split(color, key), self.cupy, parent=self)


# --- selection ------------------------------------------------------------------------------
#: (rank, size) environment variables of the launchers: MPICH/Hydra and Intel MPI (PMI_*), Open MPI,
#: Slurm's srun, PMIx
_LAUNCHER_VARS = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                  ("PMIX_RANK", "PMI_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS"))


def launcher_world(environ=None) -> tuple[int, int]:
    """(rank, size) as an MPI launcher announced them in the environment; (0, 1) without one.

    ``CSTEP_COMM=single`` forces a single process (e.g. a serial command inside an allocation).
    """
    env = os.environ if environ is None else environ
    if env.get("CSTEP_COMM", "").strip().lower() == "single":
        return 0, 1
    for rank_var, size_var in _LAUNCHER_VARS:
        if rank_var in env and size_var in env:
            try:
                return int(env[rank_var]), int(env[size_var])
            except ValueError:
                continue
    return 0, 1


def _import_mpi():
    try:
        from mpi4py import MPI  # noqa: PLC0415 (optional dependency: the [mpi] extra)
    except Exception as exc:  # ImportError, or an mpi4py that cannot find its MPI library
        raise CommunicatorError(f"this process is one of several MPI ranks but mpi4py cannot be used ({type(exc).__name__}: {exc}); "
                                "install it with pip install 'cstep[mpi]'") from None
    return MPI


def _import_nccl(cupy):
    try:
        nccl = cupy.cuda.nccl
    except AttributeError:
        nccl = None
    if nccl is None:
        try:
            from cupy.cuda import nccl  # noqa: PLC0415 (optional: CuPy's NCCL bindings)
        except Exception:
            nccl = None
    if nccl is None or not getattr(nccl, "available", False):
        raise CommunicatorError("CuPy ranks communicate over NCCL but CuPy finds no NCCL library (cupy.cuda.nccl.available is False); "
                                "install it with pip install nvidia-nccl-cu12 (or cu13), or run the ranks on NumPy with CSTEP_BACKEND=numpy")
    return nccl


def make_communicator(backend: str, environ=None) -> Communicator:
    """The communicator for this process and array backend ("numpy" or "cupy"): single-process
    without a multi-rank launcher, else MPI (NumPy) or NCCL over an MPI rendezvous (CuPy)."""
    _, size = launcher_world(environ)
    if size <= 1:
        return SingleProcess()
    mpi = MPICommunicator()
    if backend == "cupy":
        cupy = _cupy_module()
        return NCCLCommunicator(mpi, cupy)
    return mpi


def _cupy_module():
    import cupy  # noqa: PLC0415 (only reached on the CuPy backend, where it is imported already)
    return cupy


_WORLD: Communicator | None = None


def world(backend: str | None = None) -> Communicator:
    """The process's communicator, made once (``backend``: the array backend's name, needed the
    first time)."""
    global _WORLD
    if _WORLD is None:
        if backend is None:
            raise ValueError("world(): give the array backend's name the first time")
        _WORLD = make_communicator(backend)
    return _WORLD

