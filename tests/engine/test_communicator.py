"""engine/communicator.py: the single-process communicator, the launcher detection, the choice of
MPI or NCCL by backend with its one-line errors, and the NCCL calls against CuPy's documented
``NcclCommunicator`` signatures (a fake NCCL that performs a 2-rank sum in memory, on the CuPy
stand-in or a real device). The MPI communicator itself runs with real processes in
tests/engine/app/test_distributed.py."""

from __future__ import annotations

import ctypes
import types

import numpy
import pytest

from engine import communicator
from engine.communicator import (CommunicatorError, MPICommunicator, NCCLCommunicator, SingleProcess, launcher_world,
                                 make_communicator)


def test_single_process_collectives_are_the_identity(xp):
    comm = SingleProcess()
    a = xp.arange(6.0).reshape(2, 3)
    assert comm.allreduce(a) is a and comm.broadcast(a) is a
    g = comm.allgather(a)
    assert g.shape == (1, 2, 3) and bool((g[0] == a).all())
    comm.barrier()
    assert (comm.rank, comm.size, comm.bcast_object({"k": 1})) == (0, 1, {"k": 1})


@pytest.mark.parametrize("env, want", [
    ({}, (0, 1)),
    ({"PMI_RANK": "1", "PMI_SIZE": "4"}, (1, 4)),                       # MPICH / Hydra, Intel MPI
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "3"}, (2, 3)),  # Open MPI
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (5, 8)),               # srun
    ({"PMI_RANK": "1", "PMI_SIZE": "4", "CSTEP_COMM": "single"}, (0, 1)),
])
def test_launcher_world_reads_the_launchers_variables(env, want):
    assert launcher_world(env) == want


def test_without_a_launcher_the_communicator_is_single_process():
    assert isinstance(make_communicator("numpy", {}), SingleProcess)
    assert isinstance(make_communicator("cupy", {}), SingleProcess)  # no NCCL needed for one rank


def test_missing_mpi4py_is_one_sentence(monkeypatch):
    real_import = __builtins__["__import__"] if isinstance(__builtins__, dict) else __builtins__.__import__

    def no_mpi4py(name, *args, **kwargs):
        if name.startswith("mpi4py"):
            raise ImportError("No module named 'mpi4py'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_mpi4py)
    with pytest.raises(CommunicatorError) as err:
        make_communicator("numpy", {"PMI_RANK": "0", "PMI_SIZE": "2"})
    message = str(err.value)
    assert "\n" not in message and "mpi4py" in message and "pip install 'cstep[mpi]'" in message


class FakeMPI:
    """What NCCLCommunicator uses of its MPI rendezvous."""

    def __init__(self, rank=0, size=2, local_rank=None):
        self.rank, self.size = rank, size
        self.local_rank = rank if local_rank is None else local_rank
        self.broadcasts, self.barriers = [], 0

    def bcast_object(self, obj, root=0):
        self.broadcasts.append((obj, root))
        return obj if self.rank == root else ("uid-from-rank", root)

    def barrier(self):
        self.barriers += 1


def fake_nccl(log):
    """A stand-in for ``cupy.cuda.nccl`` with CuPy's documented signatures; its "other rank" holds
    the same data, so an allreduce doubles the buffer and an allgather repeats it."""
    ctype = {7: ctypes.c_float, 8: ctypes.c_double, 4: ctypes.c_int64, 2: ctypes.c_int32}

    def view(ptr, count, datatype):
        return numpy.ctypeslib.as_array((ctype[datatype] * count).from_address(ptr))

    class NcclCommunicator:
        def __init__(self, ndev, commId, rank):
            log.append(("init", ndev, commId, rank))

        def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
            assert sendbuf == recvbuf and op == mod.NCCL_SUM
            log.append(("allReduce", count, datatype, stream))
            view(recvbuf, count, datatype)[...] *= 2

        def bcast(self, buff, count, datatype, root, stream):
            log.append(("bcast", count, datatype, root, stream))

        def allGather(self, sendbuf, recvbuf, count, datatype, stream):
            log.append(("allGather", count, datatype, stream))
            src = view(sendbuf, count, datatype).copy()
            out = view(recvbuf, 2 * count, datatype)
            out[:count], out[count:] = src, src

    mod = types.SimpleNamespace(available=True, NCCL_SUM=0, NCCL_INT32=2, NCCL_INT64=4, NCCL_FLOAT32=7, NCCL_FLOAT64=8,
                                get_unique_id=lambda: ("uid",), NcclCommunicator=NcclCommunicator)
    return mod


@pytest.fixture
def nccl_on(cupy_only, monkeypatch):
    log = []
    monkeypatch.setattr(cupy_only.cuda, "nccl", fake_nccl(log), raising=False)
    return cupy_only, log


def test_nccl_rendezvous_broadcasts_rank_0s_unique_id(nccl_on):
    cupy, log = nccl_on
    for rank in (0, 1):
        mpi = FakeMPI(rank=rank, local_rank=rank)
        comm = NCCLCommunicator(mpi, cupy)
        assert (comm.rank, comm.size, comm.local_rank) == (rank, 2, rank)
        assert mpi.broadcasts[0][1] == 0  # the id travels from rank 0
    assert log[0] == ("init", 2, ("uid",), 0)  # rank 0 drew it
    assert log[1] == ("init", 2, ("uid-from-rank", 0), 1)  # rank 1 received it


@pytest.mark.parametrize("dtype, nccl_type, per_value", [(numpy.float64, 8, 1), (numpy.float32, 7, 1),
                                                         (numpy.complex128, 8, 2), (numpy.complex64, 7, 2)])
def test_nccl_allreduce_sums_in_place_complex_as_real_pairs(nccl_on, dtype, nccl_type, per_value):
    cupy, log = nccl_on
    comm = NCCLCommunicator(FakeMPI(), cupy)
    a = cupy.asarray(numpy.arange(6).reshape(2, 3) * (1 + (1j if per_value == 2 else 0)), dtype=dtype)
    before = cupy.asnumpy(a)
    assert comm.allreduce(a) is a
    numpy.testing.assert_array_equal(cupy.asnumpy(a), 2 * before)
    assert log[-1] == ("allReduce", 6 * per_value, nccl_type, cupy.cuda.get_current_stream().ptr)
    assert comm.bytes == a.nbytes and comm.calls == 1


def test_nccl_allgather_and_broadcast(nccl_on):
    cupy, log = nccl_on
    comm = NCCLCommunicator(FakeMPI(), cupy)
    a = cupy.asarray(numpy.arange(4.0))
    g = comm.allgather(a)
    assert g.shape == (2, 4)
    numpy.testing.assert_array_equal(cupy.asnumpy(g), numpy.stack([numpy.arange(4.0)] * 2))
    assert comm.broadcast(a, root=1) is a and log[-1][:4] == ("bcast", 4, 8, 1)
    with pytest.raises(TypeError, match="CuPy arrays"):
        comm.allreduce(numpy.zeros(3))


def test_nccl_missing_is_one_sentence(cupy_only, monkeypatch):
    monkeypatch.setattr(cupy_only.cuda, "nccl", types.SimpleNamespace(available=False), raising=False)
    with pytest.raises(CommunicatorError) as err:
        NCCLCommunicator(FakeMPI(), cupy_only)
    message = str(err.value)
    assert "\n" not in message and "NCCL" in message and "CSTEP_BACKEND=numpy" in message


def test_cupy_backend_under_a_launcher_chooses_nccl(cupy_only, monkeypatch):
    """With several ranks, CuPy means NCCL (after the MPI rendezvous), NumPy means MPI."""
    made = []
    monkeypatch.setattr(communicator, "MPICommunicator", lambda: made.append("mpi") or FakeMPI())
    monkeypatch.setattr(communicator, "NCCLCommunicator", lambda mpi, cp: made.append(("nccl", cp)) or "nccl")
    monkeypatch.setattr(communicator, "_cupy_module", lambda: cupy_only)
    env = {"PMI_RANK": "0", "PMI_SIZE": "2"}
    assert make_communicator("cupy", env) == "nccl" and made == ["mpi", ("nccl", cupy_only)]
    made.clear()
    assert isinstance(make_communicator("numpy", env), FakeMPI) and made == ["mpi"]


def test_mpi_communicator_refuses_device_arrays():
    pytest.importorskip("mpi4py")
    comm = MPICommunicator()  # a singleton world of size 1
    with pytest.raises(TypeError, match="NCCL"):
        comm.allreduce(types.SimpleNamespace())
    a = numpy.arange(3.0)
    assert comm.allreduce(a) is a and comm.bytes == a.nbytes
