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
from .runfile import RunFileLock

__all__ = ["join_world", "is_root", "root_lock", "barrier", "quiet_unless_root", "root_value", "world_note"]


def join_world(model) -> Communicator:
    """Give ``model`` the data-parallel context of this process's communicator; returns it."""
    comm = world(get_xp().__name__)
    model.parallel = DataParallel(comm)
    return comm


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
