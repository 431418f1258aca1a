"""Data-parallel runs of ``cstep train`` / ``cstep resume`` under an MPI launcher.

``mpiexec -n R cstep train ...`` (or ``srun -n R cstep train ...``) starts R copies of the same
command. Each builds the same run (same data, same batch order, same initial weights), joins the
world communicator (:func:`engine.communicator.world`: MPI for NumPy ranks, NCCL for CuPy ranks)
and takes its shard of every global batch (engine/parallel.py). Rank 0 alone takes the run
file's lock, writes the run file and prints; every rank checks the options the same way, so a
usage error stops all of them with the same one-line message.
"""

from __future__ import annotations

import contextlib
import sys

from ..backend import get_xp
from ..communicator import Communicator, world
from ..parallel import DataParallel
from solvers.kaisa import worker_group_size

from .runfile import RunFileLock

__all__ = ["join_world", "collective_flags", "is_root", "root_lock", "barrier", "quiet_unless_root", "root_value", "world_note", "world_size"]


def join_world(model, grad_worker_fraction: float | None = None) -> Communicator:
    """Give ``model`` the data-parallel context of this process's communicator (with KAISA's
    ``grad_worker_fraction``, checked against the world size); returns the communicator."""
    comm = world(get_xp().__name__)
    if comm.size > 1 and grad_worker_fraction is not None:
        worker_group_size(grad_worker_fraction, comm.size)  # a fraction that makes no whole group: one line, now
    model.parallel = DataParallel(comm, grad_worker_fraction=grad_worker_fraction)
    return comm


def collective_flags(comm: Communicator, *flags):
    """Rank 0's values of per-rank decisions (a checkpoint is due by the clock, a signal asked to
    stop), on every rank: checkpoints are collective when KAISA spreads the solver state."""
    return comm.bcast_object(flags, root=0) if comm.size > 1 else flags


def world_size() -> int:
    """The number of ranks this process is one of (1 without a launcher)."""
    return world(get_xp().__name__).size


def is_root() -> bool:
    """Rank 0 (or a single process): the one that writes run files and prints."""
    return world(get_xp().__name__).rank == 0


@contextlib.contextmanager
def root_lock(path):
    """The run file's lock, taken by rank 0 alone (the other ranks never write the file); when
    rank 0 cannot take it, every rank raises its error."""
    comm = world(get_xp().__name__)
    lock = RunFileLock(path) if comm.rank == 0 else None
    error = None
    if lock is not None:
        try:
            lock.__enter__()
        except (OSError, ValueError) as exc:  # RunFileError (another writer), an unwritable directory
            error, lock = exc, None
    error = comm.bcast_object(error, root=0)
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.__exit__(None, None, None)


def barrier() -> None:
    """Every rank waits here (e.g. until all have checked the run file before rank 0 writes it)."""
    world(get_xp().__name__).barrier()


def root_value(value):
    """Rank 0's ``value`` on every rank (e.g. a time-stamped run file name)."""
    return world(get_xp().__name__).bcast_object(value, root=0)


def quiet_unless_root(args) -> None:
    """Only rank 0 prints progress and the summary."""
    if not is_root():
        args.quiet, args.json = True, False


def world_note(path, saved: int | None, now: int) -> None:
    """On resume: say (rank 0, stderr) when the world size differs from the checkpoint's."""
    if saved is not None and int(saved) != now and is_root():
        print(f"cstep resume: note: run {path} was checkpointed with {saved} rank(s) and continues on {now}; the global "
              "batches are the same but the sums are split differently, so it will not be bit for bit what "
              f"{saved} rank(s) give", file=sys.stderr)
