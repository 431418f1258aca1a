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
    options = {"--batch": 16, "--fraction": None}
    for flag in options:
        if flag in names:
            k = names.index(flag)
            options[flag] = float(names[k + 1])
            names = names[:k] + names[k + 2:]
    batch, fraction = int(options["--batch"]), options["--fraction"]
    comm = MPICommunicator()
    result = {}
    for name in names:
        tr = trainer(net, name, batch=batch, comm=comm, fraction=fraction)
        with numpy.errstate(over="ignore"):
            tr.run(epochs=1)
        flat = numpy.concatenate([p.ravel() for p in tr.params])
        digests = comm.comm.allgather(hashlib.sha256(flat.tobytes()).hexdigest())
        result[f"{name}/loss"] = numpy.array(tr.history.steps["loss"])
        result[f"{name}/params"] = flat
        result[f"{name}/same_on_all_ranks"] = numpy.array(len(set(digests)) == 1)
        result[f"{name}/comm_bytes"] = numpy.array(tr.history.steps["comm_bytes"])
        for key in ("powell_damping", "skipped_H_g", "skipped_H_a"):
            if key in tr.history.steps:
                result[f"{name}/{key}"] = numpy.array(tr.history.steps[key])
        plan = getattr(tr.solver, "factor_plan", lambda: None)()
        if plan is not None:  # every rank's state must be complete after a gather (what a checkpoint writes)
            layout = {k: (v.shape, v.dtype) for k, v in tr.solver_state.items() if hasattr(v, "ndim")}
            state = tr.solver.gather_state(dict(tr.solver_state))
            result[f"{name}/state_layout_kept"] = numpy.array(layout == {k: (v.shape, v.dtype) for k, v in state.items()
                                                                           if hasattr(v, "ndim")})
            blob = b"".join(numpy.ascontiguousarray(v).tobytes() for k, v in sorted(state.items()) if hasattr(v, "ndim"))
            result[f"{name}/state_same_on_all_ranks"] = numpy.array(len(set(comm.comm.allgather(hashlib.sha256(blob).hexdigest()))) == 1)
    if comm.rank == 0:
        numpy.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1:])
