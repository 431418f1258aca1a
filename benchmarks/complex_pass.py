"""Cost of one complex-step pass (gradient + Hessian-vector product) vs one real gradient pass.

Issue target: complex128 pass <= 4x the float64 gradient pass on the MNIST autoencoder at
batch 1000. Prints the setup and the median of several repetitions.

    python benchmarks/complex_pass.py [--net mnist-ae] [--batch 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy

import nets
from engine import backend


def timeit(f, repeat):
    f()
    times = []
    for _ in range(repeat):
        backend.synchronize()
        t0 = time.perf_counter()
        f()
        backend.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="mnist-ae")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    xp = backend.get_xp()
    model = nets.build(args.net)
    params = model.init(seed=0, xp=xp)
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.random((args.batch, model.input_shape[0])))
    v = rng.standard_normal(model.n_params)
    v /= numpy.linalg.norm(v)
    w = model.flatten(params)
    wc = model.unflatten(w.astype(xp.complex128) + 1e-30j * xp.asarray(v).astype(xp.complex128))
    print(f"backend={backend.backend_name()} numpy={numpy.__version__} net={args.net} n_params={model.n_params} "
          f"batch={args.batch} threads(OMP_NUM_THREADS)={os.environ.get('OMP_NUM_THREADS', 'unset')} cpus={os.cpu_count()}")
    t_real = timeit(lambda: model.loss_and_grad(params, x, x), args.repeat)
    t_cplx = timeit(lambda: model.loss_and_grad(wc, x, x), args.repeat)
    print(f"real float64 gradient pass      : {t_real * 1e3:8.1f} ms")
    print(f"complex128 pass (gradient + Hv) : {t_cplx * 1e3:8.1f} ms")
    print(f"ratio complex/real              : {t_cplx / t_real:8.2f}  (target <= 4)")


if __name__ == "__main__":
    main()
