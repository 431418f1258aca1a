"""Warm start and evaluation against one training epoch, in one real training run (the Trainer).

Issue 21 goals: warm start <= 0.25x and evaluation <= 0.1x of a training epoch (MNIST
autoencoder, batch 1000, float32). The run is the command line's: warm start (one epoch of
forward passes; K-BFGS needs only the A statistics, K-FAC also G), ``--epochs`` training epochs,
and the evaluation after each (regularised loss on the 60,000 training and 10,000 test images,
forward only). Each part is timed in process CPU time (the steadier figure at one BLAS thread on a
loaded machine) and wall time; the evaluation is timed before and after the training epochs.

Floor of the evaluation ratio: it is 70 forward passes of 1000 rows, against 60 iterations that
each make a full forward and backward pass, a second forward and input-gradient pass and the
factor products, so at equal GEMM speed it is about 70 / (60 x 6 to 7 passes' work) ~ 0.17. For
K-BFGS the script prints that ratio of GEMM FLOPs, counted from the layer shapes
(``kbfgs_vs_authors.kbfgs_gemms``).

    python benchmarks/epoch_parts.py [--solver kbfgs] [--epochs 1] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy
from threadpoolctl import threadpool_info, threadpool_limits

import data
import nets
from engine.app.runs import make_trainer
from engine.backend import get_xp, synchronize
from solvers import make_solver


def timed(f):
    synchronize()
    c0, w0 = time.process_time(), time.perf_counter()
    f()
    synchronize()
    return time.process_time() - c0, time.perf_counter() - w0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--solver", default="kbfgs", choices=("kbfgs", "kbfgs_l", "kfac"))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--init", default="torch", choices=("torch", "numpy"), help="initial weights (torch: the reference code's)")
    ap.add_argument("--data-dir", default=os.environ.get("CSTEP_DATA_DIR"))
    args = ap.parse_args(argv)
    xp = get_xp()
    ds = data.load("mnist", data_dir=args.data_dir, dtype=numpy.float32)
    model = nets.build("mnist-ae")
    solver = make_solver(args.solver, model)
    tr = make_trainer(model, solver, ds, batch_size=1000, dtype=numpy.float32, init=args.init, xp=xp)
    with threadpool_limits(limits=args.threads, user_api="blas"):
        blas = ", ".join(f"{p['internal_api']} {p['version']} x{p['num_threads']}" for p in threadpool_info() if p["user_api"] == "blas")
        print(f"solver={args.solver} net=mnist-ae float32 batch=1000 BLAS: {blas} loadavg(before)={os.getloadavg()[0]:.2f}")
        ws = timed(tr.warm_start)
        evals = [timed(tr.evaluate)]
        tr.run(epochs=args.epochs)  # training epochs (and their evaluations, which the trainer's clocks exclude)
        evals.append(timed(tr.evaluate))
        ep = (tr.cpu_time, tr.wall_time)  # the trainer's own clocks: training iterations only
        ev = [sum(e[0] for e in evals) / len(evals), sum(e[1] for e in evals) / len(evals)]
    n = args.epochs
    print(f"training epoch : CPU {ep[0] / n:7.2f} s   wall {ep[1] / n:7.2f} s  (mean of {n})")
    print(f"warm start     : CPU {ws[0]:7.2f} s   wall {ws[1]:7.2f} s   ratio CPU {ws[0] / (ep[0] / n):.3f}, wall {ws[1] / (ep[1] / n):.3f}  (goal <= 0.25)")
    print(f"evaluation     : CPU {ev[0]:7.2f} s   wall {ev[1]:7.2f} s   ratio CPU {ev[0] / (ep[0] / n):.3f}, wall {ev[1] / (ep[1] / n):.3f}  (goal <= 0.1; mean of 2, before and after training)")
    if args.solver == "kbfgs":
        from kbfgs_vs_authors import kbfgs_gemms  # noqa: PLC0415 (this folder's sibling script)

        products = kbfgs_gemms()
        flops = lambda name, m, k, n: (1 if name.endswith("(SYRK)") else 2) * m * k * n  # noqa: E731
        epoch = 60 * sum(flops(*p) for p in products)
        evaluation = 70 * sum(flops(*p) for p in products if p[0] == "forward") / 2  # one forward pass per 1000 images
        print(f"GEMM FLOPs     : evaluation {evaluation / 1e9:.0f} G / epoch {epoch / 1e9:.0f} G = {evaluation / epoch:.3f} "
              "(the evaluation ratio at equal GEMM speed)")
    print(f"threads={args.threads} loadavg(after)={os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
