"""Data parallelism: which rows of a global batch this rank takes, and the global batch means.

Each rank of a data-parallel run sees the same global batches (the same batch order as one
process) and takes a contiguous shard of rows, rank r the rows [N r / R, N (r + 1) / R) of the N
rows (R ranks; :meth:`DataParallel.shard`). Every pass on the shard computes what one process
would compute on those rows: means over the shard's n_r rows (the loss, the gradient, the
Kronecker statistics A and G, the batch means of K-BFGS). The global batch mean of any such
quantity is

    q = (1/N) sum_n q_n = sum_r (n_r / N) q_r          (q_r the mean over rank r's rows)

so :meth:`DataParallel.mean` scales each rank's shard mean by its weight n_r / N and sums over
the ranks with one allreduce of one packed buffer: the loss normalisation is the global batch
size, whatever the shards' sizes. With one rank every method returns its input unchanged (no
copy, no arithmetic: a single-process run is bit for bit what it was before).

Random draws per example (K-FAC's sampled targets) must be the single-process draws for the
global batch: :meth:`DataParallel.generator` wraps the host generator so that a draw for the
shard's rows draws for all N rows (same generator state afterwards on every rank) and returns
the shard's.

KAISA's factor-work assignment (Pauloski et al., SC'21) is :func:`assign_layers`: a greedy load
balance of per-layer costs over the ranks.
"""

from __future__ import annotations

import numpy

from .backend import array_module
from .communicator import Communicator, SingleProcess

__all__ = ["DataParallel", "ShardedGenerator", "shard_rows", "assign_layers"]


def shard_rows(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank ``rank`` of ``size`` in a batch of ``n``: contiguous, sizes differing by at most 1."""
    return n * rank // size, n * (rank + 1) // size


class ShardedGenerator:
    """A host generator that draws for the global batch and hands back this rank's rows.

    ``random(shape)`` / ``standard_normal(shape)`` with ``shape[0]`` the shard's rows draw
    ``(N,) + shape[1:]`` values from ``rng`` (so the generator advances exactly as the
    single-process one does) and return rows ``lo:hi``.
    """

    def __init__(self, rng: numpy.random.Generator, lo: int, hi: int, n: int):
        self.rng, self.lo, self.hi, self.n = rng, lo, hi, n

    def _global(self, shape):
        shape = tuple(shape)
        if not shape or shape[0] != self.hi - self.lo:
            raise ValueError(f"a sharded draw must be per row of the shard ({self.hi - self.lo} rows), got shape {shape}")
        return (self.n,) + shape[1:]

    def random(self, shape):
        return self.rng.random(self._global(shape))[self.lo:self.hi]

    def standard_normal(self, shape):
        return self.rng.standard_normal(self._global(shape))[self.lo:self.hi]


class DataParallel:
    """The data-parallel context of a model: its communicator and the current batch's shard.

    ``comm``: a :class:`engine.communicator.Communicator` (default single-process). The trainer
    calls :meth:`shard` with each global batch's size before the solver step; the passes and the
    solvers then call :meth:`mean` where they have formed a batch mean. ``grad_worker_fraction``:
    KAISA's split of the Kronecker solvers' factor work (solvers/kaisa.py), None for none.
    """

    def __init__(self, comm: Communicator | None = None, grad_worker_fraction: float | None = None):
        self.comm = comm if comm is not None else SingleProcess()
        #: KAISA's fraction of ranks holding each layer's inverse factors (solvers/kaisa.py); None: every
        #: rank does every layer's factor work itself
        self.grad_worker_fraction = grad_worker_fraction
        self.rows = (0, 0, 0)
        self.weight = 1.0

    @property
    def active(self) -> bool:
        """More than one rank."""
        return self.comm.size > 1

    def shard(self, n: int) -> slice:
        """The rows of a global batch of ``n`` this rank takes; remembers them and the weight n_r / N."""
        rank, size = self.comm.rank, self.comm.size
        if n < size:
            raise ValueError(f"a batch of {n} rows cannot be split over {size} ranks; use a batch of at least {size}")
        lo, hi = shard_rows(n, rank, size)
        self.rows = (lo, hi, n)
        self.weight = (hi - lo) / n
        return slice(lo, hi)

    def mean(self, arrays: list) -> list:
        """Global batch means from this rank's shard means (``None`` entries pass): sum over the
        ranks of (n_r / N) a_r, in one allreduce of one packed buffer. Returns new arrays (views of
        the buffer) with one rank per entry; with a single rank, ``arrays`` itself."""
        if not self.active:
            return arrays
        present = [a for a in arrays if a is not None]
        if not present:
            return arrays
        xp = array_module(*present)
        dtype = numpy.result_type(*[a.dtype for a in present])
        flat = xp.concatenate([xp.asarray(a, dtype=dtype).reshape(-1) for a in present])
        flat *= self.weight
        self.comm.allreduce(flat)
        out, offset = [], 0
        for a in arrays:
            if a is None:
                out.append(None)
                continue
            out.append(flat[offset:offset + a.size].reshape(a.shape))
            offset += a.size
        return out

    def mean_fields(self, records, names) -> None:
        """:meth:`mean` of the attributes ``names`` (those not ``None``) of every record, in place
        (one allreduce for all of them); e.g. the :class:`engine.curvature.kronecker.KronFactors`."""
        if not self.active:
            return
        slots = [(r, name) for r in records for name in names if getattr(r, name, None) is not None]
        for (r, name), value in zip(slots, self.mean([getattr(r, name) for r, name in slots])):
            setattr(r, name, value)

    def mean_tree(self, tree):
        """:meth:`mean` of every array in a nest of lists, tuples and dicts (one allreduce); the
        same structure back, the tree itself with a single rank."""
        if not self.active:
            return tree
        leaves = []

        def collect(t):
            if isinstance(t, dict):
                for v in t.values():
                    collect(v)
            elif isinstance(t, (list, tuple)):
                for v in t:
                    collect(v)
            else:
                leaves.append(t)

        collect(tree)
        reduced = iter(self.mean(leaves))

        def rebuild(t):
            if isinstance(t, dict):
                return {k: rebuild(v) for k, v in t.items()}
            if isinstance(t, (list, tuple)):
                return type(t)(rebuild(v) for v in t)
            return next(reduced)

        return rebuild(tree)

    def generator(self, rng):
        """``rng`` itself on one rank; else a :class:`ShardedGenerator` over the current shard."""
        if not self.active:
            return rng
        return ShardedGenerator(rng, *self.rows)


def assign_layers(costs: dict, size: int) -> dict:
    """KAISA's greedy load balance: each layer (largest cost first; ties by layer index) goes to the
    rank with the least assigned cost so far (ties: the lowest rank). Returns ``{layer: rank}``."""
    load = [0.0] * size
    owner = {}
    for layer in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(size), key=lambda q: (load[q], q))
        owner[layer] = r
        load[r] += costs[layer]
    return owner
