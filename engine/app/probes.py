"""Cheap curvature probes taken during training (``cstep train --probe-every N --probe top-eig,trace``):
the top Hessian eigenvalue (Lanczos on complex-step products) and the Hessian trace (Hutchinson),
on a fixed batch, recorded in the run's ``/history/probes``. Their products run outside the
training clocks."""

from __future__ import annotations

import argparse
import time

from ..curvature import HessianCS, hutchinson_trace, lanczos

PROBES = ("top-eig", "trace")


def parse_probes(text: str) -> list[str]:
    """``--probe top-eig,trace`` as a list (an argparse ``type=``: a bad name is a usage error)."""
    names = [p.strip().lower().replace("_", "-") for p in str(text).split(",") if p.strip()]
    unknown = [p for p in names if p not in PROBES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown probe {unknown[0] if unknown else text!r}; choose from {', '.join(PROBES)}")
    return list(dict.fromkeys(names))


def probe(model, params, x, y, probes, seed: int, n_iter: int = 20, n_probes: int = 10) -> dict:
    """The cheap curvature probes of ``cstep train --probe-every``: the top Hessian eigenvalue (Lanczos,
    complex-step products) and the Hessian trace (Hutchinson), on a fixed batch."""
    op = HessianCS(model, params, x, y)
    row, t0 = {}, time.perf_counter()
    products = 0
    if "top-eig" in probes:
        res = lanczos(op, k=1, which="LA", n_iter=min(n_iter, op.shape[0]), seed=seed)
        row["top_eig"] = float(res.eigenvalues[-1])
        products += res.n_products
    if "trace" in probes:
        tr = hutchinson_trace(op, n_probes=n_probes, seed=seed)
        row["trace"], row["trace_std_error"] = tr.estimate, tr.std_error
        products += tr.n_products
    row["products"], row["seconds"] = products, time.perf_counter() - t0
    return row
