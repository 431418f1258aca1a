"""Cost of one complex-step pass (gradient + Hessian-vector product) vs one real gradient pass.

Issue 21 target: the complex-step pass <= 2.9x the float64 gradient pass at 1 thread (MNIST
autoencoder, batch 1000). Three passes, timed interleaved (real, full, cs, real, full, cs, ...):

* ``real``: the float64 gradient pass;
* ``full``: the pass at w + i h v with the library's complex GEMMs (4 real products' work each;
  what a complex pass costs outside :func:`engine.products.complex_step`);
* ``cs``: the same pass declared a complex-step pass (real-by-complex products as 2 real GEMMs,
  complex-by-complex as 3, the O(h^2) term dropped: docs/complex-step.md section 5.2), what
  :class:`engine.curvature.HessianCS` runs (with the first-order elementwise forms of
  docs/complex-step.md section 5.3);
* ``cs-ew``: the ``cs`` pass with the first-order elementwise forms switched off (complex
  softplus, sigmoid, ...: what the pass cost before them), to isolate their gain.

Also prints how far the two complex passes' Hv (Im / h) and gradients (Re) are apart.
With ``--torch`` (torch installed) it adds torch.func's forward-over-reverse HVP on the same
network (float64, same threads) for the <= 0.45x goal.

    python benchmarks/complex_pass.py [--net mnist-ae] [--batch 1000] [--repeat 5] [--threads 1] [--torch]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy
from threadpoolctl import threadpool_info, threadpool_limits

import nets
from engine import backend, ops
from engine.products import complex_step


def blas_line():
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(f"{p.get('internal_api')} {p.get('version')} x{p.get('num_threads')}" for p in pools) or "unknown"


def interleaved(fns: dict, repeat: int) -> tuple[dict, dict]:
    """Median wall and CPU seconds of each callable, timed in rounds A, B, C, A, B, C, ... after one
    warm-up each. At one thread the CPU time is the steadier figure on a loaded machine."""
    for f in fns.values():
        f()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            backend.synchronize()
            t0, c0 = time.perf_counter(), time.process_time()
            f()
            backend.synchronize()
            wall[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return ({k: statistics.median(v) for k, v in wall.items()}, {k: statistics.median(v) for k, v in cpu.items()})


def torch_hvp(model, x_host, w_host, v_host):
    """A callable running torch.func's jvp-of-grad HVP on the same layers (Dense + activations)."""
    import torch  # noqa: PLC0415 (benchmark-only dependency)
    from torch.func import grad, jvp  # noqa: PLC0415

    acts = {"sigmoid": torch.sigmoid, "relu": torch.relu, "tanh": torch.tanh, "identity": lambda t: t}
    shapes = model.shapes
    x = torch.as_tensor(x_host)

    def unflat(flat):
        out, pos = [], 0
        for s in shapes:
            n = int(numpy.prod(s))
            out.append(flat[pos:pos + n].reshape(s))
            pos += n
        return out

    names = [getattr(layer, "name", "dense") for layer in model.layers]

    def loss(flat):
        ps, h, k = unflat(flat), x, 0
        for layer, name in zip(model.layers, names):
            if layer.param_shapes():
                h = torch.nn.functional.linear(h, ps[k], ps[k + 1])
                k += 2
            else:
                h = acts[name](h)
        return torch.nn.functional.binary_cross_entropy_with_logits(h, x, reduction="sum") / x.shape[0]

    w, v = torch.as_tensor(w_host), torch.as_tensor(v_host)
    return lambda: jvp(grad(loss), (w,), (v,))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="mnist-ae")
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (threadpoolctl; torch.set_num_threads too)")
    ap.add_argument("--torch", action="store_true", help="also time torch.func's HVP (mnist-ae style nets only)")
    args = ap.parse_args()
    xp = backend.get_xp()
    model = nets.build(args.net)
    params = model.init(seed=0, xp=xp)
    rng = numpy.random.default_rng(0)
    x = xp.asarray(rng.random((args.batch, model.input_shape[0])))
    v = rng.standard_normal(model.n_params)
    v /= numpy.linalg.norm(v)
    h = 1e-30
    w = model.flatten(params)
    wc = model.unflatten(w.astype(xp.complex128) + (1j * h) * xp.asarray(v).astype(xp.complex128))

    def cs_pass():
        with complex_step(h):
            return model.loss_and_grad(wc, x, x)

    def cs_complex_elementwise():
        first_order = ops.first_order
        ops.first_order = lambda z: False  # engine.ops and engine.losses look it up on the module
        try:
            return cs_pass()
        finally:
            ops.first_order = first_order

    fns = {"real": lambda: model.loss_and_grad(params, x, x), "full": lambda: model.loss_and_grad(wc, x, x), "cs": cs_pass,
           "cs-ew": cs_complex_elementwise}
    with threadpool_limits(limits=args.threads, user_api="blas"):
        if args.torch:
            import torch  # noqa: PLC0415

            torch.set_num_threads(args.threads)
            fns["torch"] = torch_hvp(model, backend.to_host(x), backend.to_host(w), v)
        print(f"backend={backend.backend_name()} numpy={numpy.__version__} net={args.net} n_params={model.n_params} "
              f"batch={args.batch} dtype=float64/complex128 BLAS: {blas_line()} cpus={os.cpu_count()} "
              f"loadavg(before)={os.getloadavg()[0]:.2f}")
        _, g_full = fns["full"]()
        _, g_cs = fns["cs"]()
        hv_full = numpy.concatenate([backend.to_host(g.imag).ravel() for g in g_full]) / h
        hv_cs = numpy.concatenate([backend.to_host(g.imag).ravel() for g in g_cs]) / h
        gr_full = numpy.concatenate([backend.to_host(g.real).ravel() for g in g_full])
        gr_cs = numpy.concatenate([backend.to_host(g.real).ravel() for g in g_cs])
        t, c = interleaved(fns, args.repeat)
    print(f"||Hv_cs - Hv_full|| / ||Hv_full|| = {numpy.linalg.norm(hv_cs - hv_full) / numpy.linalg.norm(hv_full):.2e}, "
          f"gradients: {numpy.linalg.norm(gr_cs - gr_full) / numpy.linalg.norm(gr_full):.2e}")
    print("median of interleaved rounds    wall ms (ratio)      CPU ms (ratio)")
    rows = [("real", "real float64 gradient pass", "real"), ("full", "complex pass, complex GEMMs", "real"),
            ("cs", "complex-step pass, real GEMMs", "real"),
            ("cs-ew", "  same, complex elementwise", "real"), ("torch", "torch.func jvp(grad) HVP", None)]
    for key, label, _ in rows:
        if key in t:
            print(f"{label:30s} {t[key] * 1e3:8.1f} ({t[key] / t['real']:5.2f})   {c[key] * 1e3:8.1f} ({c[key] / c['real']:5.2f})")
    print(f"first-order elementwise forms: cs / cs-ew -> wall {t['cs'] / t['cs-ew']:.2f}, CPU {c['cs'] / c['cs-ew']:.2f}")
    print(f"goal: cs / real <= 2.9 -> wall {t['cs'] / t['real']:.2f}, CPU {c['cs'] / c['real']:.2f}")
    if "torch" in t:
        print(f"goal: cs / torch <= 0.45 -> wall {t['cs'] / t['torch']:.2f}, CPU {c['cs'] / c['torch']:.2f}")
    print(f"threads={args.threads} repeat={args.repeat} loadavg(after)={os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
