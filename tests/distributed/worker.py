"""Run under ``mpiexec -n R``: train each requested case data-parallel over MPI and write, from
rank 0, its loss trajectory and final parameters (and a digest of every rank's parameters) to
an .npz file. Usage: python -m tests.distributed.worker OUT.npz NET SOLVER [SOLVER...] [--batch N]."""

from __future__ import annotations

import hashlib
import sys

import numpy

from engine.communicator import MPICommunicator
from tests.distributed.cases import trainer


def main(argv):
    out, net, *names = argv
    batch = 16
    if "--batch" in names:
        k = names.index("--batch")
        batch = int(names[k + 1])
        names = names[:k] + names[k + 2:]
    comm = MPICommunicator()
    result = {}
    for name in names:
        tr = trainer(net, name, batch=batch, comm=comm)
        with numpy.errstate(over="ignore"):
            tr.run(epochs=1)
        flat = numpy.concatenate([p.ravel() for p in tr.params])
        digests = comm.comm.allgather(hashlib.sha256(flat.tobytes()).hexdigest())
        result[f"{name}/loss"] = numpy.array(tr.history.steps["loss"])
        result[f"{name}/params"] = flat
        result[f"{name}/same_on_all_ranks"] = numpy.array(len(set(digests)) == 1)
        result[f"{name}/comm_bytes"] = numpy.array(tr.history.steps["comm_bytes"])
    if comm.rank == 0:
        numpy.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1:])
