"""``cstep analyze``: curvature spectra of a run (or a preset at its initial point) on a fixed
batch, by several Hessian-vector products side by side: complex step (exact), the R-operator
(exact, the reference), central and forward finite differences, Gauss-Newton, Fisher.

For each curvature: the top-k eigenvalues by Lanczos with full reorthogonalisation, the trace by
Hutchinson and Hutch++ (with standard errors), the spectral density by stochastic Lanczos
quadrature, and per layer the top eigenvalue and trace of the layer's diagonal block
(:mod:`engine.curvature.spectral`, :mod:`engine.curvature.analysis`). Every figure comes with its
cost: operator products and seconds. The cheap probes that ``cstep train --probe-every`` records during
training are :mod:`engine.app.probes`.
"""

from __future__ import annotations

import time

import numpy
from tqdm import tqdm

import nets

from ..backend import get_xp, to_device
from ..curvature import (EmpiricalFisher, Fisher, GaussNewton, HessianCS, HessianFD, HessianRop, hutchinson_trace,
                         hutchpp_trace, lanczos, layer_blocks, slq_density)
from .options import UsageError, check_dtype, check_net
from .runfile import load_run
from .runs import load_dataset

#: --curvature names -> (label, operator factory(model, params, x, y, seed))
CURVATURES = {
    "cs": ("complex step", lambda m, p, x, y, s: HessianCS(m, p, x, y)),
    "rop": ("R-operator", lambda m, p, x, y, s: HessianRop(m, p, x, y)),
    "fd-central": ("central FD", lambda m, p, x, y, s: HessianFD(m, p, x, y, scheme="central")),
    "fd-forward": ("forward FD", lambda m, p, x, y, s: HessianFD(m, p, x, y, scheme="forward")),
    "gn": ("Gauss-Newton", lambda m, p, x, y, s: GaussNewton(m, p, x, y)),
    "fisher": ("Fisher", lambda m, p, x, y, s: Fisher(m, p, x, seed=s)),
    "empirical-fisher": ("empirical Fisher", lambda m, p, x, y, s: EmpiricalFisher(m, p, x, y)),
}
def parse_curvatures(text: str) -> list[str]:
    names = [c.strip().lower().replace("_", "-") for c in str(text).split(",") if c.strip()]
    unknown = [c for c in names if c not in CURVATURES]
    if unknown or not names:
        raise UsageError(f"unknown curvature {unknown[0] if unknown else text!r}; choose from {', '.join(CURVATURES)}")
    return list(dict.fromkeys(names))


def load_target(args):
    """(model, params, x, y, description) from a run file (its last checkpoint) or a preset at init."""
    xp = get_xp()
    if args.run:
        rec = load_run(args.run)
        cfg = rec.config
        model = nets.build(check_net(cfg["net"]))
        dtype = check_dtype(args.dtype or cfg["dtype"])
        params = model.unflatten(to_device(numpy.concatenate([p.reshape(-1) for p in rec.state["params"]]), xp, dtype=dtype))
        ds = load_dataset(cfg["dataset"], args.data_dir or cfg.get("data_dir"), dtype, None, None)
        where = f"{args.run} (epoch {rec.progress['epoch']}, iteration {rec.progress['iteration']})"
    else:
        net = check_net(args.net)
        model = nets.build(net)
        dtype = check_dtype(args.dtype or "float64")
        params = model.init(seed=args.seed, dtype=dtype, xp=xp, init="torch")
        ds = load_dataset(nets.PRESETS[net][1], args.data_dir, dtype, None, None)
        where = f"{net} at its initial point (seed {args.seed})"
    n = min(args.batch, ds.x_train.shape[0])
    x = to_device(ds.x_train[:n], xp, dtype=dtype)
    y = x if ds.y_train is None else to_device(ds.y_train[:n], xp)
    return model, params, x, y, f"{where}; the first {n} training examples, {numpy.dtype(dtype).name}"


class _Bar:
    """One tqdm bar over every operator product of the analysis (on a terminal only)."""

    def __init__(self, total: int, quiet: bool):
        self.bar = None if quiet else tqdm(total=total, unit="Hv", desc="cstep analyze", leave=False, disable=None)

    def __call__(self, *_):
        if self.bar is not None:
            self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _timed(f, *args, **kwargs):
    t0 = time.perf_counter()
    out = f(*args, **kwargs)
    return out, time.perf_counter() - t0


def analyze_operator(op, model, args, progress) -> dict:
    """Every requested analysis of one operator, each with its products and seconds."""
    out = {}
    if args.top_k:
        res, sec = _timed(lanczos, op, k=args.top_k, which="LA", n_iter=args.lanczos_iter, seed=args.seed, progress=progress)
        out["top_eigenvalues"] = {"values": res.eigenvalues[::-1].tolist(), "residuals": res.residual_norms[::-1].tolist(),
                                  "products": res.n_products, "seconds": sec}
    if args.trace:
        hutch, sec = _timed(hutchinson_trace, op, n_probes=args.probes, seed=args.seed, progress=progress)
        pp, sec2 = _timed(hutchpp_trace, op, n_products=args.probes, seed=args.seed, progress=progress)
        out["trace"] = {"hutchinson": hutch.estimate, "hutchinson_std_error": hutch.std_error,
                        "hutchpp": pp.estimate, "hutchpp_std_error": pp.std_error,
                        "products": hutch.n_products + pp.n_products, "seconds": sec + sec2}
    if args.density:
        dens, sec = _timed(slq_density, op, n_probes=args.density_probes, n_iter=args.lanczos_iter, seed=args.seed,
                           progress=progress)
        out["density"] = {"grid": dens.grid.tolist(), "density": dens.density.tolist(), "sigma": dens.sigma,
                          "products": dens.n_products, "seconds": sec}
    if args.per_layer:
        out["layers"] = {}
        for layer, block in layer_blocks(op, model).items():
            top, sec = _timed(lanczos, block, k=1, which="LA", n_iter=min(args.lanczos_iter or 30, block.shape[0]),
                              seed=args.seed, progress=progress)
            tr, sec2 = _timed(hutchinson_trace, block, n_probes=args.probes, seed=args.seed, progress=progress)
            out["layers"][str(layer)] = {"type": type(model.layers[layer]).__name__, "n_params": block.shape[0],
                                         "top_eigenvalue": float(top.eigenvalues[-1]), "trace": tr.estimate,
                                         "trace_std_error": tr.std_error, "products": top.n_products + tr.n_products,
                                         "seconds": sec + sec2}
    return out


def estimated_products(args, n_layers: int) -> int:
    m = args.lanczos_iter or max(2 * args.top_k + 10, 30)
    total = (m if args.top_k else 0) + (2 * args.probes if args.trace else 0)
    total += args.density_probes * (args.lanczos_iter or 30) if args.density else 0
    total += n_layers * ((args.lanczos_iter or 30) + args.probes) if args.per_layer else 0
    return total


def product_cost(model, params, x, y, op) -> dict:
    """Seconds of one gradient pass and one product of ``op`` (medians of three), for the cost column."""
    v = op.xp.ones(op.shape[0], dtype=op.dtype)
    grad = sorted(_timed(model.loss_and_grad, params, x, y)[1] for _ in range(3))[1]
    prod = sorted(_timed(op.matvec, v)[1] for _ in range(3))[1]
    return {"gradient_pass_seconds": grad, "product_seconds": prod, "product_per_gradient_pass": prod / grad}


def run_analysis(args) -> dict:
    curvatures = parse_curvatures(args.curvature)
    model, params, x, y, where = load_target(args)
    n_layers = sum(1 for layer in model.layers if layer.param_shapes())
    bar = _Bar(estimated_products(args, n_layers) * len(curvatures), args.quiet)
    result = {"target": where, "n_params": model.n_params, "curvatures": {}}
    try:
        for name in curvatures:
            label, make = CURVATURES[name]
            op = make(model, params, x, y, args.seed)
            entry = {"label": label, **analyze_operator(op, model, args, bar)}
            entry["cost"] = product_cost(model, params, x, y, op)
            result["curvatures"][name] = entry
    finally:
        bar.close()
    return result


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def table(result: dict) -> str:
    """The terminal table: per curvature its top eigenvalues, trace and costs; differences from the
    R-operator (the exact reference) when it was computed; per-layer blocks when asked for."""
    lines = [f"curvature analysis of {result['target']} ({result['n_params']:,} parameters)"]
    ref = result["curvatures"].get("rop")
    for name, c in result["curvatures"].items():
        cost = c["cost"]
        lines.append(f"\n{c['label']} ({name}): one product {cost['product_seconds']:.3g} s = "
                     f"{cost['product_per_gradient_pass']:.2f} gradient passes")
        if "top_eigenvalues" in c:
            t = c["top_eigenvalues"]
            lines.append(f"  top {len(t['values'])} eigenvalues: {', '.join(_fmt(v) for v in t['values'])}  "
                         f"({t['products']} products, {t['seconds']:.1f} s)")
            if ref and name != "rop" and "top_eigenvalues" in ref:
                rel = [abs(a - b) / abs(b) for a, b in zip(t["values"], ref["top_eigenvalues"]["values"])]
                lines.append(f"    relative difference from the R-operator: max {max(rel):.2e}, top {rel[0]:.2e}")
        if "trace" in c:
            t = c["trace"]
            lines.append(f"  trace: Hutchinson {_fmt(t['hutchinson'])} ± {t['hutchinson_std_error']:.2g}, Hutch++ "
                         f"{_fmt(t['hutchpp'])} ± {t['hutchpp_std_error']:.2g}  ({t['products']} products, {t['seconds']:.1f} s)")
        if "density" in c:
            d = c["density"]
            lines.append(f"  spectral density: SLQ on {len(d['grid'])} points, sigma {d['sigma']:.3g}  "
                         f"({d['products']} products, {d['seconds']:.1f} s)")
        for layer, b in c.get("layers", {}).items():
            lines.append(f"  layer {layer:>3} {b['type']:<8} {b['n_params']:>9,} params: top eigenvalue {_fmt(b['top_eigenvalue'])}, "
                         f"trace {_fmt(b['trace'])} ± {b['trace_std_error']:.2g}")
    return "\n".join(lines)
