"""K-BFGS, K-BFGS(L) and K-FAC epochs: cstep against the authors' PyTorch code, interleaved.

Issue 21 goals: an epoch (MNIST autoencoder, batch 1000, float32, 60 iterations) <= 0.55x the
authors' code for K-BFGS and K-BFGS(L), <= 0.7x for K-FAC, same CPU, same thread count. Each side
runs in its own process, in turn (authors, cstep, authors, cstep, ...), from the same initial
weights (PyTorch's, seed 9999) and the same batches (the reference order), and reports the CPU
time of its training iterations only (both sides use ``time.process_time``, the authors' own
clock, and exclude warm start and evaluation), the training loss after the epoch, and its peak
memory (ru_maxrss).

The authors' code (``renyiryry/kbfgs_neurips2020_public``, not part of this repository) is
given by ``--authors DIR``; without it that column is skipped. It runs unmodified; the driver
here makes the minimal changes it needs on a CPU without its optional packages, all in this
process and none in its files:

* stub modules for imports the MNIST run never uses (``mat4py``, ``psutil``, ``torchvision.transforms``,
  ``torchvision.datasets``) and for ``pytz`` (only a timestamp in verbose printing);
* ``read_data_sets`` replaced by one that hands the same MNIST arrays cstep reads (no
  download) to the authors' own ``DataSet`` class;
* ``train_model(..., if_gpu=False, if_max_epoch=1, max_epoch=E, verbose=False)``: the CPU and
  an epoch budget instead of the Demo's GPU and 500 s;
* ``torch.set_num_threads(T)`` and ``OMP/MKL/OPENBLAS_NUM_THREADS=T`` for both sides.

torch is a benchmark-only dependency (``pip install torch``), never one of cstep.

    python benchmarks/kbfgs_vs_authors.py --authors /path/to/kbfgs_neurips2020_public \\
        [--solvers kbfgs,kbfgs_l,kfac] [--threads 1,2] [--rounds 2] [--epochs 1]

For K-BFGS it also prints the GEMM floor: the CPU time of the iteration's matrix products alone
(:func:`kbfgs_gemms`, each timed on its own at its shape), times 60, and its ratio to the authors'
epoch: the ratio no implementation reaches on this BLAS without doing fewer FLOPs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types

import numpy

#: the Demo's hyper-parameters (docs/kbfgs.md section 7): cstep name -> (authors' name, lr, damping)
SOLVERS = {"kbfgs": ("K-BFGS", 0.3, 0.3), "kbfgs_l": ("K-BFGS(L)", 0.3, 0.3), "kfac": ("KFAC", 1.0, 3.0)}
GOALS = {"kbfgs": 0.55, "kbfgs_l": 0.55, "kfac": 0.7}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_cstep(solver: str, epochs: int, data_dir) -> dict:
    import data  # noqa: PLC0415
    import nets  # noqa: PLC0415
    from engine.app.runs import make_trainer  # noqa: PLC0415
    from solvers import make_solver  # noqa: PLC0415

    _, lr, damping = SOLVERS[solver]
    ds = data.load("mnist", data_dir=data_dir, dtype=numpy.float32)
    model = nets.build("mnist-ae")
    sv = make_solver(solver, model, lr=lr, damping=damping)
    tr = make_trainer(model, sv, ds, batch_size=1000, dtype=numpy.float32, init="torch", order="reference")
    hist = tr.run(epochs=epochs)
    return {"cpu": tr.cpu_time / epochs, "wall": tr.wall_time / epochs, "loss": float(hist.last_epoch()["train_loss"]),
            "peak_mb": _peak_mb()}


def run_authors(solver: str, epochs: int, data_dir, authors: str) -> dict:
    import data  # noqa: PLC0415

    for name in ("mat4py", "psutil", "torchvision", "torchvision.transforms", "torchvision.datasets"):
        sys.modules.setdefault(name, types.ModuleType(name))
    if "pytz" not in sys.modules:
        try:
            import pytz  # noqa: F401, PLC0415
        except ImportError:
            stub = types.ModuleType("pytz")
            stub.timezone = lambda name: None
            sys.modules["pytz"] = stub
    sys.path.insert(0, authors)
    import torch  # noqa: PLC0415
    import training_function as tf  # noqa: PLC0415 (the authors' module)

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    ds = data.load("mnist", data_dir=data_dir, dtype=numpy.float32)

    def read_data_sets(name_dataset, name_model, home_path, one_hot=False):
        sets = types.SimpleNamespace()
        sets.train = tf.DataSet(ds.x_train.copy(), None, True, "none")
        sets.test = tf.DataSet(ds.x_test.copy(), None, True, "none")
        return sets

    tf.read_data_sets = read_data_sets
    name, lr, damping = SOLVERS[solver]
    w0 = time.perf_counter()
    res = tf.train_model(dataset_name="MNIST", algorithm=name, lr=lr, lambda_damping=damping, batch_size=1000,
                         if_gpu=False, if_max_epoch=1, max_epoch=epochs, verbose=False)
    times = numpy.asarray(res["timesCPU"], dtype=float)
    return {"cpu": float(times[-1]) / epochs, "wall": (time.perf_counter() - w0) / epochs, "wall_includes": "setup+eval",
            "loss": float(res["train_losses"][-1]), "peak_mb": _peak_mb()}


def kbfgs_gemms(batch: int = 1000):
    """The matrix products of one K-BFGS iteration on the MNIST autoencoder, as (name, m, k, n) with
    FLOPs 2 m k n (SYRK: m k n), from the layer shapes: per Dense layer (d_in -> d_out) two forward
    products (the gradient pass and the pass at theta_{k+1}), the weight gradient, two input
    gradients (none for the first layer: no pass needs dx there), A's SYRK, and the step
    H_g M H_a (two products)."""
    import nets  # noqa: PLC0415

    dense = [(l.d_in, l.d_out) for l in nets.build("mnist-ae").layers if hasattr(l, "d_in")]
    out = []
    for j, (i, o) in enumerate(dense):
        out += [("forward", batch, i, o)] * 2 + [("weight gradient", o, batch, i)]
        out += [("input gradient", batch, o, i)] * (2 if j else 0)
        out += [("A (SYRK)", i, batch, i), ("H_g M", o, o, i + 1), ("(H_g M) H_a", o, i + 1, i + 1)]
    return out


def gemm_floor(repeats: int = 7) -> dict:
    """The CPU time of K-BFGS's products alone over one epoch (60 iterations): each product of
    :func:`kbfgs_gemms` timed on its own at its shape and layout (float32, the BLAS of this process,
    median of ``repeats``). An epoch cannot take less than this without fewer FLOPs or a faster BLAS."""
    rng = numpy.random.default_rng(0)
    total, flops = 0.0, 0.0
    for name, m, k, n in kbfgs_gemms():
        if name == "A (SYRK)":
            a = rng.standard_normal((k, m), dtype=numpy.float32)
            op, work = (lambda a=a: a.T @ a), m * k * n  # noqa: E731 (NumPy calls SYRK for a.T @ a)
        else:
            x, y = rng.standard_normal((m, k), dtype=numpy.float32), rng.standard_normal((k, n), dtype=numpy.float32)
            op, work = (lambda x=x, y=y: x @ y), 2 * m * k * n  # noqa: E731
        op()
        times = []
        for _ in range(repeats):
            t0 = time.process_time()
            op()
            times.append(time.process_time() - t0)
        total += statistics.median(times)
        flops += work
    return {"cpu": 60 * total, "gflop_per_iteration": flops / 1e9, "gflops": flops / total / 1e9}


def child(args) -> int:
    if args.side == "floor":
        print("RESULT " + json.dumps(gemm_floor()))
        return 0
    out = run_cstep(args.solver, args.epochs, args.data_dir) if args.side == "cstep" else \
        run_authors(args.solver, args.epochs, args.data_dir, args.authors)
    print("RESULT " + json.dumps(out))
    return 0


def spawn(side, solver, threads, args) -> dict | None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--solver", solver, "--epochs", str(args.epochs)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.authors:
        cmd += ["--authors", args.authors]
    if side in ("cstep", "floor"):
        cmd += ["--threads-one", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(f"  {side} {solver} failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--authors", help="folder of the authors' code (renyiryry/kbfgs_neurips2020_public); absent: cstep only")
    ap.add_argument("--solvers", default="kbfgs,kbfgs_l,kfac")
    ap.add_argument("--threads", default="1", help="comma list of thread counts, e.g. 1,2")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved (authors, cstep) pairs per solver and thread count")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--data-dir", default=os.environ.get("CSTEP_DATA_DIR"))
    ap.add_argument("--child", choices=("cstep", "authors", "floor"), dest="side", help=argparse.SUPPRESS)
    ap.add_argument("--solver", default="kbfgs", help=argparse.SUPPRESS)
    ap.add_argument("--threads-one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:
        if args.threads_one:
            from threadpoolctl import threadpool_limits  # noqa: PLC0415

            with threadpool_limits(limits=args.threads_one, user_api="blas"):
                return child(args)
        return child(args)
    authors = args.authors if args.authors and os.path.isfile(os.path.join(args.authors, "training_function.py")) else None
    if args.authors and not authors:
        print(f"--authors {args.authors}: no training_function.py there; the authors' column is skipped")
    args.authors = authors
    print(f"MNIST autoencoder, batch 1000, float32, {args.epochs} epoch(s) of 60 iterations per run; numpy {numpy.__version__}; "
          f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f}; authors' code: {authors or 'absent'}")
    for threads in (int(t) for t in args.threads.split(",")):
        for solver in args.solvers.split(","):
            pairs = []
            for _ in range(args.rounds):
                a = spawn("authors", solver, threads, args) if authors else None
                c = spawn("cstep", solver, threads, args)
                pairs.append((a, c))
                fmt = lambda r: "-" if r is None else f"{r['cpu']:6.2f} s CPU (loss {r['loss']:.2f}, peak {r['peak_mb']:.0f} MB)"  # noqa: E731
                print(f"  {solver:8s} threads={threads}: authors {fmt(a)} | cstep {fmt(c)} | loadavg {os.getloadavg()[0]:.2f}")
            ratios = [c["cpu"] / a["cpu"] for a, c in pairs if a and c]
            if ratios:
                print(f"{solver:8s} threads={threads}: cstep / authors epoch CPU = {statistics.median(ratios):.2f} "
                      f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)}; goal <= {GOALS[solver]})")
            if solver == "kbfgs":
                floor = spawn("floor", solver, threads, args)
                authors_cpu = [a["cpu"] for a, _ in pairs if a]
                if floor:
                    vs = f" = {floor['cpu'] / statistics.median(authors_cpu):.2f}x the authors' epoch" if authors_cpu else ""
                    print(f"kbfgs    threads={threads}: GEMM floor {floor['cpu']:.2f} s CPU per epoch{vs} "
                          f"({floor['gflop_per_iteration']:.1f} GFLOP per iteration at {floor['gflops']:.0f} GFLOP/s, "
                          f"each product timed alone)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
