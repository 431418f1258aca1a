"""KAISA's distribution of the Kronecker solvers' per-layer factor work over the ranks
(Pauloski, Huang, Xu, Venkataraman, Chard, Foster, Zhang, "KAISA: An Adaptive Second-Order
Optimizer Framework for Deep Neural Networks", SC'21; the kfac-pytorch design).

With R ranks and grad-worker fraction f, g = f R ranks (a divisor of R) are the *gradient workers*
of each layer:

* every layer gets one owner, its *inverse worker*, by a greedy load balance of the layers' factor
  costs over the ranks (:func:`engine.parallel.assign_layers`; cost (d_in+1)^3 + d_out^3 for K-FAC's
  inversions, (d_in+1)^2 + d_out^2 for K-BFGS's rank-two updates);
* the ranks are split into R/g *worker groups* of g consecutive ranks; the owner computes the
  layer's factor work (K-FAC: the damped inverses; K-BFGS: the H_g and H_a updates) and broadcasts
  the result within its group, whose members then hold the layer's inverse factors;
* each step, the layer's group computes the preconditioned momentum P = H_g M H_a, and every other
  rank receives P from the member of that group with its own index within a group (the *receiver
  groups*: ranks with the same index in every worker group).

f = 1 (g = R) is KAISA's COMM-OPT: every rank holds every inverse, only the factor results travel.
f = 1/R (g = 1) is MEM-OPT: only the owner holds a layer's inverse factors, and P travels every
step. Between the two, HYBRID-OPT. The results are the single-process numbers bit for bit: the
owner computes exactly what every rank would have.

The state entries of a layer outside a rank's group go stale on that rank; :meth:`KaisaPlan.gather`
broadcasts every layer's entries from their owner to all ranks (before a checkpoint is written).
"""

from __future__ import annotations

from engine.backend import array_module
from engine.parallel import assign_layers

__all__ = ["KaisaPlan", "worker_group_size"]


def worker_group_size(fraction: float, size: int) -> int:
    """g = fraction * size gradient workers per layer; it must be a divisor of ``size``."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--grad-worker-fraction must be in (0, 1], got {fraction}")
    g = round(fraction * size)
    if g < 1 or size % g or abs(g - fraction * size) > 1e-9:
        choices = ", ".join(f"{d}/{size}" for d in range(1, size + 1) if size % d == 0)
        raise ValueError(f"--grad-worker-fraction {fraction} on {size} ranks does not give a whole group of gradient workers "
                         f"dividing the ranks; choose one of {choices}")
    return g


class KaisaPlan:
    """Who computes and who holds each Kronecker layer's factor work (see the module docstring).

    ``comm``: the world communicator; ``costs``: ``{layer: cost}``; ``fraction``: the grad-worker
    fraction. Built once per solver, collectively (it splits the communicator).
    """

    def __init__(self, comm, costs: dict, fraction: float):
        self.comm, self.fraction = comm, fraction
        self.rank, self.size = comm.rank, comm.size
        self.group = worker_group_size(fraction, self.size)
        self.owner = assign_layers(costs, self.size)
        self.costs = dict(costs)
        g = self.group
        self.workers = comm.split(self.rank // g, self.rank) if 1 < g < self.size else (comm if g == self.size else None)
        self.receivers = comm.split(self.rank % g, self.rank) if 1 < g < self.size else (comm if g == 1 else None)

    # --- who --------------------------------------------------------------------------------
    def owns(self, layer: int) -> bool:
        """This rank computes the layer's factor work."""
        return self.owner[layer] == self.rank

    def grad_worker(self, layer: int) -> bool:
        """This rank holds the layer's inverse factors and computes its preconditioned momentum."""
        return self.owner[layer] // self.group == self.rank // self.group

    def record(self) -> dict:
        """The assignment for the run file: owner, cost and gradient workers of every layer."""
        g = self.group
        return {"grad_worker_fraction": g / self.size, "grad_workers_per_layer": g, "world_size": self.size,
                "layers": {str(i): {"owner": r, "cost": self.costs[i],
                                    "grad_workers": list(range(r // g * g, r // g * g + g))}
                           for i, r in sorted(self.owner.items())}}

    # --- collectives (every rank calls them with the same layers, in the same order) ----------
    def share_factors(self, state: dict, keys_of) -> None:
        """Broadcast each layer's factor entries ``keys_of(layer)`` from its owner to its worker group."""
        if self.group == 1:
            return
        for layer in sorted(self.owner):
            if self.grad_worker(layer):
                root = self.owner[layer] % self.group  # the owner's rank within its group
                for key in keys_of(layer):
                    self.workers.broadcast(state[key], root=root)

    def share_steps(self, steps: dict, shape_of, xp, dtype) -> dict:
        """``{layer: P}`` for every layer: a rank outside a layer's worker group receives P from the
        group member with its own index within a group (nothing travels when every rank is a
        gradient worker)."""
        if self.group == self.size:
            return steps
        out = {}
        for layer in sorted(self.owner):
            P = steps.get(layer)
            if P is None:
                P = xp.empty(shape_of(layer), dtype=dtype)
            self.receivers.broadcast(P, root=self.owner[layer] // self.group)
            out[layer] = P
        return out

    def gather(self, state: dict, keys_of) -> None:
        """Every layer's entries ``keys_of(layer)`` from its owner to every rank (before a checkpoint)."""
        for layer in sorted(self.owner):
            for key in keys_of(layer):
                value = state[key]
                if hasattr(value, "ndim"):
                    if not value.flags.c_contiguous:  # (ascontiguousarray would also turn a 0-d count into 1-d)
                        value = array_module(value).ascontiguousarray(value).reshape(value.shape)
                    self.comm.broadcast(value, root=self.owner[layer])
                    state[key] = value

    def sum_counts(self, info: dict, names, xp) -> None:
        """Sum the per-layer event counts of ``info`` over the ranks (each counted its own layers)."""
        values = [info[n] for n in names]
        total = xp.stack([xp.asarray(v, dtype=xp.int64).reshape(()) for v in values])
        self.comm.allreduce(total)
        for k, n in enumerate(names):
            info[n] = total[k]
