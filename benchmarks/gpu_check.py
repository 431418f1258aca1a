"""One-shot GPU check: does the CuPy path agree with NumPy, and how fast is it?

Run by ``benchmarks/gpu_check.sh`` on a machine with a CUDA device (after ``pytest -m cupy``);
prints, in one run:

1. the setup: device, CuPy/NumPy versions, BLAS and threads, load average;
2. CuPy against NumPy on the same model, parameters and batch: one complex-step Hessian-vector
   product (float64; relative difference of H v, and of each against the exact R-operator) and
   one K-BFGS step after a warm start (float64 and float32: relative difference of the new
   parameters, of the loss, and of the H_g factors);
3. timings, each the median of interleaved repeats with a device synchronisation around each:
   the complex-step pass (gradient + H v) against the real gradient pass, MNIST autoencoder,
   batch 1000, float32 and float64; and one K-BFGS epoch of the MNIST autoencoder in float32
   (60 iterations of batch 1000, warm start excluded), with the per-iteration time;
4. the fused kernels against the same formulas op by op (``engine.fuse.unfused``): a K-BFGS, a
   K-FAC and an Adam step of the MNIST autoencoder in float32, interleaved medians (and the
   launches per step where they can be counted: on the stand-in);
5. ``--cuda-graph``: K-BFGS and K-BFGS(L) steps replayed from CUDA graphs against eager steps
   (interleaved blocks of 10 steps) and the two runs' losses over 25 iterations (skipped on the
   stand-in, which cannot capture).

    python benchmarks/gpu_check.py [--data-dir DIR] [--iterations 60] [--repeats 10]

Without MNIST files (``--data-dir`` / ``CSTEP_DATA_DIR``) the epoch runs on random data of MNIST's
shape (timing only; printed as such). With ``CSTEP_CUPY=standin`` it runs on the tests' CuPy
stand-in instead of a GPU: a dry run of this script, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy

if os.environ.get("CSTEP_CUPY") == "standin":  # dry run of the script without a GPU
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import cupy_standin

    cupy_standin.install()

import data  # noqa: E402
import nets  # noqa: E402
from engine.backend import cupy_available, synchronize, to_host  # noqa: E402
from engine.curvature import HessianCS, HessianRop  # noqa: E402
from engine.fuse import unfused  # noqa: E402
from engine.cuda_graph import GraphedStep  # noqa: E402
from solvers import make_solver  # noqa: E402


def rel(a, b) -> float:
    a, b = numpy.asarray(to_host(a), dtype=numpy.float64), numpy.asarray(to_host(b), dtype=numpy.float64)
    return float(numpy.linalg.norm(a - b) / max(numpy.linalg.norm(b), 1e-300))


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info  # noqa: PLC0415 (optional, informative)
        pools = [f"{p.get('internal_api')} {p.get('version')} x{p.get('num_threads')}" for p in threadpool_info()
                 if p.get("user_api") == "blas"]
        return ", ".join(pools) or "unknown"
    except Exception:
        return "unknown (threadpoolctl missing)"


def setup_line(cp) -> str:
    try:
        props = cp.cuda.runtime.getDeviceProperties(0)
        name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    except Exception:
        name = "?"
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",)
    return (f"device {name}; CuPy {cp.__version__}, NumPy {numpy.__version__}, Python {platform.python_version()}; "
            f"host BLAS {blas_info()}; {os.cpu_count()} CPUs, load {', '.join(f'{v:.2f}' for v in load)}")


def timed(cp, f) -> float:
    synchronize(cp)
    t0 = time.perf_counter()
    f()
    synchronize(cp)
    return time.perf_counter() - t0


def mnist(data_dir, dtype):
    if data_dir:
        try:
            return data.load("mnist", data_dir=data_dir, dtype=dtype).x_train, "MNIST"
        except Exception as exc:  # a missing data set falls back to random data
            print(f"(MNIST not readable from {data_dir}: {exc}; using random data of its shape)")
    rng = numpy.random.default_rng(0)
    return rng.random((60000, 784), dtype=numpy.float64).astype(dtype), "random data of MNIST's shape"


def compare(cp, x_host) -> None:
    print("\n== CuPy against NumPy (same model, parameters, batch)")
    model = nets.build("mnist-ae")
    xb = x_host[:200].astype(numpy.float64)
    params_np = model.init(seed=9999, dtype=numpy.float64, xp=numpy)
    params_cp = [cp.asarray(p) for p in params_np]
    v = numpy.random.default_rng(1).standard_normal(model.n_params)
    hv_np = HessianCS(model, params_np, xb, xb).matvec(v)
    hv_cp = HessianCS(model, params_cp, cp.asarray(xb), cp.asarray(xb)).matvec(cp.asarray(v))
    exact = HessianRop(model, params_np, xb, xb).matvec(v)
    print(f"complex-step H v, float64, batch 200: |cupy - numpy| / |numpy| = {rel(hv_cp, hv_np):.2e}; "
          f"against the R-operator: numpy {rel(hv_np, exact):.2e}, cupy {rel(hv_cp, exact):.2e}")
    for dtype in (numpy.float64, numpy.float32):
        xs = x_host[:1000].astype(dtype)
        out = {}
        for name, xp in (("numpy", numpy), ("cupy", cp)):
            params = model.init(seed=9999, dtype=dtype, xp=xp)
            solver = make_solver("kbfgs", model, lr=0.3, damping=0.3)
            x = xp.asarray(xs)
            state = solver.warm_start(params, solver.init(params), [(x, x)])
            for _ in range(2):
                params, state, info = solver.step(params, state, x, x)
            out[name] = (model.flatten(params), info["loss"], state[f"layer{solver.kron[0]}/H_g"])
        (p0, l0, h0), (p1, l1, h1) = out["numpy"], out["cupy"]
        print(f"K-BFGS, 2 steps, {numpy.dtype(dtype).name}, batch 1000: parameters {rel(p1, p0):.2e}, "
              f"loss {rel(l1, l0):.2e}, first H_g {rel(h1, h0):.2e} (relative differences cupy vs numpy)")


def pass_timings(cp, x_host, repeats) -> None:
    print(f"\n== complex-step pass against the real gradient pass (MNIST-AE, batch 1000, median of {repeats}, interleaved)")
    model = nets.build("mnist-ae")
    for dtype in (numpy.float32, numpy.float64):
        params = model.init(seed=9999, dtype=dtype, xp=cp)
        x = cp.asarray(x_host[:1000].astype(dtype))
        v = cp.asarray(numpy.random.default_rng(2).standard_normal(model.n_params).astype(dtype))
        H = HessianCS(model, params, x, x)
        H.matvec(v), model.loss_and_grad(params, x, x)  # compile and cache kernels
        real, cs = [], []
        for _ in range(repeats):
            real.append(timed(cp, lambda: model.loss_and_grad(params, x, x)))
            cs.append(timed(cp, lambda: H.matvec_and_grad(v)))
        r, c = statistics.median(real), statistics.median(cs)
        print(f"{numpy.dtype(dtype).name}: gradient pass {1e3 * r:7.2f} ms, complex-step pass {1e3 * c:7.2f} ms, "
              f"ratio {c / r:.2f}x")


def epoch_timing(cp, x_host, source, iterations) -> None:
    print(f"\n== K-BFGS epoch, MNIST autoencoder, float32, batch 1000, {iterations} iterations ({source})")
    model = nets.build("mnist-ae")
    params = model.init(seed=9999, dtype=numpy.float32, xp=cp, init="torch")
    solver = make_solver("kbfgs", model, lr=0.3, damping=0.3)
    x_dev = cp.asarray(x_host.astype(numpy.float32))  # the data set lives on the device
    n = 1000
    batches = [x_dev[i * n:(i + 1) * n] for i in range(x_dev.shape[0] // n)]
    t0 = time.perf_counter()
    state = solver.warm_start(params, solver.init(params), ((b, b) for b in batches))
    synchronize(cp)
    warm = time.perf_counter() - t0
    losses, times = [], []
    synchronize(cp)
    t0 = time.perf_counter()
    for k in range(iterations):
        x = batches[k % len(batches)]
        t1 = time.perf_counter()
        params, state, info = solver.step(params, state, x, x)
        losses.append(float(info["loss"]))  # the trainer's one host sync per iteration
        times.append(time.perf_counter() - t1)
    epoch = time.perf_counter() - t0
    print(f"warm start {warm:.2f} s; epoch {epoch:.2f} s; iteration median {1e3 * statistics.median(times):.1f} ms "
          f"(first {1e3 * times[0]:.1f} ms); loss {losses[0]:.2f} -> {losses[-1]:.2f}")


def fusion_timing(cp, x_host, repeats) -> None:
    print(f"\n== fused kernels against the same formulas op by op (MNIST-AE, float32, batch 1000, median of {repeats}, interleaved)")
    model = nets.build("mnist-ae")
    x = cp.asarray(x_host[:1000].astype(numpy.float32))
    for name in ("kbfgs", "kbfgs_l", "kfac", "adam"):
        params = model.init(seed=9999, dtype=numpy.float32, xp=cp)
        solver = make_solver(name, model)
        state = solver.init(params)
        if solver.needs_warm_start:
            state = solver.warm_start(params, state, [(x, x)])
        state["k"] = 21 if name == "kfac" else 1  # a steady-state step (past K-FAC's inverse refreshes)
        box = {"params": params, "state": state}

        def step():
            box["params"], box["state"], _ = solver.step(box["params"], box["state"], x, x)
        step()
        with unfused():
            step()  # compile both
        fused_t, plain_t, launches = [], [], ""
        for _ in range(repeats):
            fused_t.append(timed(cp, step))
            with unfused():
                plain_t.append(timed(cp, step))
        if getattr(cp, "_standin", False):
            counts = []
            for ctx in (None, unfused):
                before = cp.counters.launches
                if ctx is None:
                    step()
                else:
                    with ctx():
                        step()
                counts.append(cp.counters.launches - before)
            launches = f"; launches {counts[0]} fused, {counts[1]} op by op"
        f, u = statistics.median(fused_t), statistics.median(plain_t)
        print(f"{name}: fused {1e3 * f:8.2f} ms, op by op {1e3 * u:8.2f} ms, ratio {u / f:.2f}x{launches}")


def graph_timing(cp, x_host, repeats) -> None:
    """``--cuda-graph``: K-BFGS and K-BFGS(L) steps replayed from CUDA graphs against eager steps
    (interleaved blocks of 10 iterations), and the two runs' losses over 25 iterations."""
    print(f"\n== CUDA graphs (--cuda-graph): MNIST-AE, float32, batch 1000, blocks of 10 steps, median of {repeats}, interleaved")
    if getattr(cp, "_standin", False):
        print("skipped: the stand-in cannot capture CUDA graphs (tests/engine/test_cuda_graph.py checks the rest)")
        return
    model = nets.build("mnist-ae")
    x = cp.asarray(x_host[:1000].astype(numpy.float32))
    for name in ("kbfgs", "kbfgs_l"):
        runs = {}
        for graphed in (False, True):
            params = model.init(seed=9999, dtype=numpy.float32, xp=cp)
            solver = make_solver(name, model)
            state = solver.warm_start(params, solver.init(params), [(x, x)])
            runs[graphed] = {"step": GraphedStep(solver, cp) if graphed else solver.step, "params": params,
                             "state": state, "losses": []}
        for k in range(25):  # the same iterations: equal losses (and everything compiled and captured)
            for r in runs.values():
                r["params"], r["state"], info = r["step"](r["params"], r["state"], x, x)
                r["losses"].append(float(info["loss"]))
        times = {False: [], True: []}
        for _ in range(repeats):
            for graphed, r in runs.items():
                def block(r=r):
                    for _ in range(10):
                        r["params"], r["state"], _ = r["step"](r["params"], r["state"], x, x)
                times[graphed].append(timed(cp, block) / 10)
        e, g = statistics.median(times[False]), statistics.median(times[True])
        diff = max(abs(a - b) / abs(a) for a, b in zip(runs[False]["losses"], runs[True]["losses"]))
        print(f"{name}: eager {1e3 * e:7.2f} ms/step, graph {1e3 * g:7.2f} ms/step, ratio {e / g:.2f}x; "
              f"25-step losses graph vs eager: max rel diff {diff:.1e}; replays {runs[True]['step'].replays}, "
              f"refused {runs[True]['step'].refused or 'none'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=os.environ.get("CSTEP_DATA_DIR"))
    ap.add_argument("--iterations", type=int, default=60, help="K-BFGS iterations timed (60 = one MNIST epoch)")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    if not cupy_available():
        from engine.backend import _CUPY_REASON  # noqa: PLC0415
        print(f"no CUDA device: {_CUPY_REASON}")
        return 2
    import cupy as cp  # noqa: PLC0415

    print("cstep GPU check:", setup_line(cp))
    if getattr(cp, "_standin", False):
        print("(CuPy stand-in: a dry run of this script on NumPy, not a measurement)")
    x_host, source = mnist(args.data_dir, numpy.float64)
    compare(cp, x_host)
    pass_timings(cp, x_host, args.repeats)
    epoch_timing(cp, x_host, source, args.iterations)
    fusion_timing(cp, x_host, max(3, args.repeats // 2))
    graph_timing(cp, x_host, max(3, args.repeats // 2))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
