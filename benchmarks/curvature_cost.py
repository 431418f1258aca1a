"""Cost of one curvature-vector product relative to one real gradient pass.

Issue targets (MNIST autoencoder, batch 1000, float64): HessianCS gradient + Hv together <= 4x a
real gradient pass; HessianRop <= 4x; HessianFD forward 1x (it reuses the gradient at w) and
central 2x. GaussNewton and EmpiricalFisher are printed for reference. Every method is timed
once per round, rounds interleaved, and the median and the minimum per method are reported, so
that load from other processes on a shared machine hits all methods alike. One-time
construction work (the cached forward/backward of HessianRop, the cached gradient of forward FD,
the forward caches of GaussNewton) is reported separately; the ratios are per product, what a
Krylov solver pays per iteration.

    python benchmarks/curvature_cost.py [--net mnist-ae] [--batch 1000] [--rounds 5] [--dtype float64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy

import nets
from engine import backend
from engine.curvature import EmpiricalFisher, GaussNewton, HessianCS, HessianFD, HessianRop


def timed(f):
    backend.synchronize()
    t0 = time.perf_counter()
    out = f()
    backend.synchronize()
    return time.perf_counter() - t0, out


def blas_threads() -> str:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 (optional)
        return ", ".join(f"{i['internal_api']}:{i['num_threads']}" for i in threadpool_info()) or "unknown"
    except ImportError:
        return f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="mnist-ae")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = ap.parse_args()
    xp = backend.get_xp()
    dtype = numpy.dtype(args.dtype)
    model = nets.build(args.net)
    params = model.init(seed=0, dtype=dtype, xp=xp)
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.random((args.batch, model.input_shape[0])), dtype=dtype)  # random inputs in [0, 1]
    y = x if not model.loss_fn.classification else xp.asarray(rng.integers(0, model.output_shape[0], args.batch))
    v = xp.asarray(rng.standard_normal(model.n_params), dtype=dtype)
    print(f"backend={backend.backend_name()} numpy={numpy.__version__} dtype={dtype} net={args.net} "
          f"n_params={model.n_params:,} batch={args.batch} rounds={args.rounds} cpus={os.cpu_count()} "
          f"blas_threads=[{blas_threads()}]")

    setup = {}
    setup["HessianRop (forward + backward cached)"], rop = timed(lambda: HessianRop(model, params, x, y))
    setup["HessianFD forward (gradient at w cached)"], fd_fwd = timed(lambda: HessianFD(model, params, x, y, scheme="forward"))
    setup["GaussNewton (forward cached)"], gn = timed(lambda: GaussNewton(model, params, x, y))
    setup["EmpiricalFisher (captures cached)"], efi = timed(lambda: EmpiricalFisher(model, params, x, y))
    cs = HessianCS(model, params, x, y)
    fd_ctr = HessianFD(model, params, x, y, scheme="central")

    methods = {
        "real gradient pass (reference)": lambda: model.loss_and_grad(params, x, y),
        "HessianCS.matvec_and_grad (Hv + gradient)": lambda: cs.matvec_and_grad(v),
        "HessianRop.matvec": lambda: rop.matvec(v),
        "HessianFD forward .matvec": lambda: fd_fwd.matvec(v),
        "HessianFD central .matvec": lambda: fd_ctr.matvec(v),
        "GaussNewton.matvec": lambda: gn.matvec(v),
        "EmpiricalFisher.matvec": lambda: efi.matvec(v),
    }
    for f in methods.values():  # warm-up (allocator, BLAS threads, CuPy kernels)
        f()
    times = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, f in methods.items():
            times[name].append(timed(f)[0])
    med = {name: statistics.median(t) for name, t in times.items()}
    best = {name: min(t) for name, t in times.items()}
    ref = med["real gradient pass (reference)"]
    ref_best = best["real gradient pass (reference)"]
    targets = {"HessianCS.matvec_and_grad (Hv + gradient)": "<= 4", "HessianRop.matvec": "<= 4",
               "HessianFD forward .matvec": "~ 1", "HessianFD central .matvec": "~ 2"}
    print(f"\n{'per product':48s} {'median ms':>10s} {'ratio':>7s} {'min ms':>10s} {'ratio':>7s}  target")
    for name, t in med.items():
        print(f"{name:48s} {t * 1e3:10.1f} {t / ref:7.2f} {best[name] * 1e3:10.1f} {best[name] / ref_best:7.2f}  {targets.get(name, '')}")
    print(f"\n{'one-time construction':48s} {'ms':>10s} {'ratio':>7s}")
    for name, t in setup.items():
        print(f"{name:48s} {t * 1e3:10.1f} {t / ref:7.2f}")


if __name__ == "__main__":
    main()
