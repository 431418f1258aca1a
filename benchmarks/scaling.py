"""Data-parallel scaling of K-BFGS and K-FAC on the MNIST autoencoder: measured at 1 and 2 ranks,
projected to 8, 64 and 512 ranks by a cost model (engine/parallel.py, solvers/kaisa.py).

Measured (``mpiexec -n R``, 1 BLAS thread per rank, float32, batch 1000, one global batch per
iteration): the wall time of an iteration (median, after warm-up; ranks synchronised by a barrier
around each step), the bytes this rank hands to MPI per iteration and the number of collectives,
for three splits of the factor work: ``replicated`` (every rank does every layer's factor work),
KAISA ``comm-opt`` (--grad-worker-fraction 1) and KAISA ``mem-opt`` (1/R). The R configurations
run interleaved (1, 2, 1, 2, ...) so that load from other processes hits both alike.

At 1 rank the per-layer costs are timed too: the factor work (K-FAC: the two damped inversions;
K-BFGS: the H_g BFGS update and the H_a Hessian-action update) and the preconditioning H_g M H_a.

Cost model, per iteration, R ranks, network bandwidth beta, latency alpha (defaults 200 Gb/s and
5 us), payload S bytes:

    allreduce(S) = 2 log2(R) alpha + 2 (R - 1)/R S / beta       (tree latency, ring bandwidth)
    broadcast(S) = log2(R) alpha + S / beta                      (pipelined)
    T(R) = t_rows / R + factor(R) + precond(R) + comm(R)

t_rows = (measured 1-rank iteration) - (factor work) - (preconditioning): the part that scales with
the rows of a shard. replicated: factor = sum of all layers, precond = sum; comm-opt: factor = the
largest greedy load over R ranks, precond = sum, plus per layer a broadcast of its inverse factors
(K-FAC: every inverse_freq = 20 steps, amortised; K-BFGS: every step); mem-opt: factor and precond
= the largest load, plus per layer a broadcast of P (d_out x (d_in + 1)). The statistics'
allreduces (gradient, A, G, batch means) are the measured collectives with their measured bytes.
Compute is this machine's CPU time per rank: a GPU divides the compute terms, not the network's.

    PYTHONPATH=. python benchmarks/scaling.py [--iterations 8] [--repeats 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy

ROOT = Path(__file__).resolve().parents[1]
SOLVERS = {"kbfgs": {"lr": 0.3, "damping": 0.3}, "kfac": {"lr": 1.0, "damping": 3.0}}
SPLITS = {"replicated": None, "comm-opt": 1.0, "mem-opt": "1/R"}


def worker(args) -> None:
    """One configuration under mpiexec: time the iterations; rank 0 writes the figures as JSON."""
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 (the benchmark's worker only)

    import data
    import nets
    from engine.communicator import MPICommunicator, SingleProcess
    from engine.curvature.kronecker import block_product, factor_inverses
    from engine.parallel import DataParallel
    from solvers import make_solver

    threadpool_limits(1)
    comm = MPICommunicator() if int(os.environ.get("PMI_SIZE", "1")) > 1 else SingleProcess()
    ds = data.load("mnist", data_dir=os.environ.get("CSTEP_DATA_DIR"), dtype=numpy.float32, n_train=args.batch * 4, n_test=100)
    model = nets.build("mnist-ae")
    fraction = {"replicated": None, "comm-opt": 1.0, "mem-opt": 1.0 / comm.size}[args.split]
    model.parallel = DataParallel(comm, grad_worker_fraction=fraction if comm.size > 1 else None)
    params = model.init(seed=9999, dtype=numpy.float32, xp=numpy)
    solver = make_solver(args.solver, model, **SOLVERS[args.solver])
    state = solver.init(params)
    per_layer = {i: [] for i in solver.kron}
    if args.solver == "kbfgs" and comm.size == 1:  # time each layer's factor work inside the real step
        real = solver._update_pairs

        def timed_update(state, f, *rest):
            t0 = time.perf_counter()
            real(state, f, *rest)
            per_layer[f.layer].append(time.perf_counter() - t0)

        solver._update_pairs = timed_update
    times, sent, calls = [], [], []
    for k in range(args.iterations):
        rows = model.parallel.shard(args.batch)
        x = ds.x_train[(k % 4) * args.batch:((k % 4) + 1) * args.batch][rows]
        comm.barrier()
        b0, c0, t0 = comm.bytes, comm.calls, time.perf_counter()
        params, state, _ = solver.step(params, state, x, x)
        comm.barrier()
        times.append(time.perf_counter() - t0)
        sent.append(comm.bytes - b0)
        calls.append(comm.calls - c0)
    skip = args.skip
    out = {"time": statistics.median(times[skip:]), "times": times, "bytes": statistics.median(sent[skip:]),
           "calls": statistics.median(calls[skip:]), "size": comm.size}
    if comm.size == 1:
        layers, sizes = {}, {}
        for i in solver.kron:
            layer = model.layers[i]
            d_a, d_g = layer.d_in + 1, layer.d_out
            M = numpy.random.default_rng(0).standard_normal((d_g, d_a)).astype(numpy.float32)
            if args.solver == "kfac":
                F = [state[f"layer{i}/A"] + 1.7 * numpy.eye(d_a, dtype=numpy.float32),
                     state[f"layer{i}/G"] + 1.7 * numpy.eye(d_g, dtype=numpy.float32)]
                work = min(_time(lambda: factor_inverses(F)) for _ in range(3))
                left, right = state[f"layer{i}/G_inv"], state[f"layer{i}/A_inv"]
            else:
                work = statistics.median(per_layer[i][skip:])
                left, right = state[f"layer{i}/H_g"], state[f"layer{i}/H_a"]
            pre = min(_time(lambda: block_product(left, M, right)) for _ in range(3))
            layers[str(i)] = {"factor": work, "precond": pre, "d_a": d_a, "d_g": d_g}
            sizes[str(i)] = 4 * (d_a * d_a + d_g * d_g)
        out["layers"] = layers
        out["params_bytes"] = 4 * model.n_params
    if comm.rank == 0:
        Path(args.out).write_text(json.dumps(out))


def _time(f) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def measure(args) -> dict:
    """{solver: {split: {R: [figures per repeat]}}}, configurations interleaved."""
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).with_name("mpiexec"))
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", CSTEP_BACKEND="numpy")
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for solver in args.solvers:
                for split in SPLITS:
                    for ranks in (1, 2):
                        if ranks == 1 and split != "replicated":
                            continue
                        out = Path(tmp) / "out.json"
                        cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", "--solver", solver,
                               "--split", split, "--iterations", str(args.iterations), "--skip", str(args.skip),
                               "--batch", str(args.batch), "--out", str(out)]
                        subprocess.run(cmd, env=env, check=True)
                        fig = json.loads(out.read_text())
                        results.setdefault(solver, {}).setdefault(split, {}).setdefault(ranks, []).append(fig)
                        print(f"  {solver:6s} {split:10s} R={ranks}: {fig['time'] * 1e3:8.1f} ms/iteration, "
                              f"{fig['bytes'] / 1e6:7.2f} MB and {fig['calls']:.0f} collectives per iteration", flush=True)
    return results


def project(one: dict, two: dict, solver: str, split: str, R: int, beta: float, alpha: float, inverse_freq: int = 20) -> float:
    """The cost model of the module docstring: seconds per iteration on R ranks."""
    layers = one["layers"]
    factor = {int(k): v["factor"] for k, v in layers.items()}
    if solver == "kfac":  # inversions every inverse_freq steps at steady state
        factor = {k: v / inverse_freq for k, v in factor.items()}
    pre = {int(k): v["precond"] for k, v in layers.items()}
    t_rows = one["time"] - sum(layers[k]["factor"] for k in layers) - sum(pre.values())
    log = math.log2(R) if R > 1 else 0.0
    stats_bytes, stats_calls = two["replicated"]["bytes"], two["replicated"]["calls"]
    allreduce = stats_calls * 2 * log * alpha + 2 * (R - 1) / R * stats_bytes / beta
    bcast = lambda s: log * alpha + s / beta  # noqa: E731
    if split == "replicated":
        return t_rows / R + sum(factor.values()) + sum(pre.values()) + allreduce
    from engine.parallel import assign_layers  # noqa: PLC0415 (the benchmark's own use)
    owner = assign_layers(factor, R)
    load = lambda t: max(sum(t[k] for k in t if owner[k] == r) for r in range(min(R, len(t))))  # noqa: E731
    if split == "comm-opt":
        every = inverse_freq if solver == "kfac" else 1
        inv = sum(bcast(4 * (v["d_a"] ** 2 + v["d_g"] ** 2)) for v in layers.values()) / every
        return t_rows / R + load(factor) + sum(pre.values()) + allreduce + inv
    steps = sum(bcast(4 * v["d_a"] * v["d_g"]) for v in layers.values())
    return t_rows / R + load(factor) + load(pre) + allreduce + steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--split", default="replicated", choices=list(SPLITS), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--solver", default="kbfgs", choices=list(SOLVERS), help=argparse.SUPPRESS)
    ap.add_argument("--solvers", default="kbfgs,kfac", help="solvers to measure (default kbfgs,kfac)")
    ap.add_argument("--iterations", type=int, default=8)
    ap.add_argument("--skip", type=int, default=2, help="warm-up iterations not timed (k = 0 inverts every factor)")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=2, help="interleaved repeats of every configuration")
    ap.add_argument("--bandwidth-gbps", type=float, default=200.0)
    ap.add_argument("--latency-us", type=float, default=5.0)
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.solvers = args.solvers.split(",")
    import threadpoolctl  # noqa: PLC0415

    blas = [f"{p['internal_api']} {p.get('version')}" for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    print(f"setup: NumPy backend over MPI (mpich), float32, MNIST autoencoder 784-1000-500-250-30 (mirrored), batch {args.batch}, "
          f"1 BLAS thread per rank ({', '.join(blas)}), {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    results = measure(args)
    beta, alpha = args.bandwidth_gbps * 1e9 / 8, args.latency_us * 1e-6
    summary = {"load_average_end": os.getloadavg()[0], "bandwidth_gbps": args.bandwidth_gbps, "latency_us": args.latency_us,
               "measured": {}, "projected": {}}
    print(f"\nmeasured (median over {args.repeats} interleaved repeats; load average now {os.getloadavg()[0]:.2f}):")
    print(f"{'solver':7s} {'split':10s} {'R':>3s} {'ms/it':>8s} {'speed-up':>8s} {'MB/it':>8s} {'coll/it':>7s}")
    for solver, by_split in results.items():
        med = {split: {R: {k: statistics.median(f[k] for f in figs) for k in ("time", "bytes", "calls")}
                       for R, figs in by_r.items()} for split, by_r in by_split.items()}
        base = med["replicated"][1]["time"]
        for split, by_r in med.items():
            for R, m in sorted(by_r.items()):
                print(f"{solver:7s} {split:10s} {R:3d} {m['time'] * 1e3:8.1f} {base / m['time']:8.2f} {m['bytes'] / 1e6:8.2f} {m['calls']:7.0f}")
        summary["measured"][solver] = med
        one = dict(results[solver]["replicated"][1][0], time=base)
        two = {split: med[split][2] for split in med}
        rows = {}
        for R in (2, 8, 64, 512):
            rows[R] = {split: project(one, two, solver, split, R, beta, alpha) for split in SPLITS}
        summary["projected"][solver] = rows
        summary["measured"][solver]["layers"] = one["layers"]
    print(f"\nprojected ms/iteration (cost model; {args.bandwidth_gbps:g} Gb/s, {args.latency_us:g} us; compute of this CPU):")
    print(f"{'solver':7s} {'R':>4s} " + " ".join(f"{s:>11s}" for s in SPLITS))
    for solver, rows in summary["projected"].items():
        for R, row in rows.items():
            print(f"{solver:7s} {R:4d} " + " ".join(f"{row[s] * 1e3:11.1f}" for s in SPLITS))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
