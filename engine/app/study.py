"""Precision study: the complex step against forward and central differences (``cstep study``).

For every target and every step h of a grid reaching from 1e-1 down to the subnormal range the
study measures the relative error of three derivative approximations (docs/complex-step.md section 7.1):

* complex step   ``f'(x) ~ Im f(x + i h) / h``            (Lyness & Moler 1967; Squire & Trapp 1998)
* forward FD     ``f'(x) ~ (f(x + h) - f(x)) / h``          error (h/2)|f''| + 2 eps |f| / h
* central FD     ``f'(x) ~ (f(x + h) - f(x - h)) / (2 h)``  error (h^2/6)|f'''| + eps |f| / h

in float64 (the complex step in complex128) and float32 (complex64). Targets:

* ``demo``: f(x) = e^x / sqrt(sin^3 x + cos^3 x) at x = 1.5 (Martins, Sturdza & Alonso 2003);
* ``st-power``, ``st-exp``: Squire & Trapp's (1998) x^(9/2) and e^x / (sin^3 x + cos^3 x) at 1.5;
  the references for these three are 50-digit mpmath derivatives (docs/complex-step.md section 7.2);
* ``mlp-hvp-<act>``: the Hessian-vector product H v of a small softmax cross-entropy MLP along a
  unit-norm random v, by the complex step of the gradient ``Im grad L(w + i h v) / h`` and by
  forward/central differences of the gradient, against Pearlmutter's exact R-operator product
  (docs/complex-step.md sections 2 and 7.3);
* ``mlp-grad-<act>``: the directional derivative <grad L, v> of the same loss, against backprop.

The error is ``|approx - exact| / |exact|`` (vector 2-norms for H v). Results come back as a
:class:`StudyResult` that prints a table and writes JSON, CSV and a log-log PNG.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy

from .. import __version__
from ..backend import backend_name, get_xp, to_host
from .plots import plot_study
from .report import write_text
from .study_targets import (ACTIVATIONS, DEFAULT_SEED, METHODS, PRECISIONS, SCALAR_FUNCTIONS, TARGETS, X0, MLPSetup,
                            _check_steps, _grad_flat, _loss_flat, _mpmath, default_steps, exact_hvp, kinks_crossed,
                            mlp_setup, parse_steps, scalar_reference)

__all__ = ["METHODS", "PRECISIONS", "TARGETS", "SCALAR_FUNCTIONS", "default_steps", "parse_steps", "scalar_reference",
           "mlp_setup", "kinks_crossed", "exact_hvp", "Curve", "Case", "StudyResult", "run_study", "write_text"]


# --- results --------------------------------------------------------------------------------

@dataclass
class Curve:
    """Relative error against h for one method in one precision."""

    method: str
    precision: str
    steps: list[float]
    errors: list[float]

    @property
    def best(self) -> tuple[float, float]:
        """(smallest finite error, the h where it occurs); (nan, nan) if none is finite."""
        finite = [(e, h) for h, e in zip(self.steps, self.errors) if math.isfinite(e)]
        if not finite:
            return math.nan, math.nan
        return min(finite, key=lambda eh: (eh[0], -eh[1]))

    def error_at(self, h: float) -> float:
        for hh, e in zip(self.steps, self.errors):
            if hh == h:
                return e
        raise KeyError(f"h = {h:g} is not on this curve's step grid")

    def to_dict(self) -> dict:
        best_err, best_h = self.best
        return {
            "method": self.method,
            "method_label": METHODS[self.method],
            "precision": self.precision,
            "dtype": PRECISIONS[self.precision][1 if self.method == "cs" else 0],
            "h": list(self.steps),
            "error": [_json_number(e) for e in self.errors],
            "min_error": _json_number(best_err),
            "h_at_min": _json_number(best_h),
        }


@dataclass
class Case:
    """One target (a scalar function, or an MLP quantity) with its curves."""

    name: str
    title: str
    kind: str  # "scalar-derivative", "hessian-vector-product" or "directional-derivative"
    reference: dict
    curves: list[Curve] = field(default_factory=list)

    def curve(self, method: str, precision: str = "float64") -> Curve:
        for c in self.curves:
            if c.method == method and c.precision == precision:
                return c
        raise KeyError(f"no {method} curve in {precision} for target {self.name}")


def _json_number(x: float):
    """JSON has no NaN/Infinity: non-finite values become null."""
    return float(x) if math.isfinite(x) else None


def _fmt(e: float) -> str:
    if not math.isfinite(e):
        return "nan" if math.isnan(e) else "inf"
    return f"{e:.1e}" if e else "0"


def _fmt_h(h: float) -> str:
    k = math.log10(h)
    return f"1e{round(k):d}" if abs(k - round(k)) < 1e-9 else f"{h:.3g}"


@dataclass
class StudyResult:
    """The curves of a precision study plus its setup (versions, backend, seed, sizes)."""

    cases: list[Case]
    setup: dict

    def case(self, name: str) -> Case:
        for c in self.cases:
            if c.name == name:
                return c
        raise KeyError(f"no target {name!r} in this study; it has {', '.join(c.name for c in self.cases)}")

    # --- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict:
        targets = {}
        for c in self.cases:
            curves: dict = {}
            for cv in c.curves:
                curves.setdefault(cv.precision, {})[cv.method] = cv.to_dict()
            targets[c.name] = {"title": c.title, "kind": c.kind, "reference": c.reference, "curves": curves}
        return {"setup": self.setup, "targets": targets}

    def to_json(self, path: str | None = None) -> str:
        """JSON text (written to ``path`` when given): ``{"setup": ..., "targets": {name: {"title",
        "kind", "reference", "curves": {precision: {method: {"h", "error", "min_error",
        "h_at_min", ...}}}}}}``; non-finite errors are null."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False)
        if path is not None:
            write_text(path, text + "\n")
        return text

    def to_csv(self, path: str | None = None) -> str:
        """Long-format CSV: target, precision, method, dtype, h, relative_error (one row per point)."""
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["target", "precision", "method", "dtype", "h", "relative_error"])
        for c in self.cases:
            for cv in c.curves:
                dtype = PRECISIONS[cv.precision][1 if cv.method == "cs" else 0]
                for h, e in zip(cv.steps, cv.errors):
                    writer.writerow([c.name, cv.precision, cv.method, dtype, repr(h), repr(e)])
        text = buf.getvalue()
        if path is not None:
            write_text(path, text)
        return text

    # --- terminal table -------------------------------------------------------------------
    def table(self) -> str:
        """Per target: relative error by h (rows) and method/precision (columns), then the best
        error and its h for each column."""
        lines = []
        for c in self.cases:
            cols = c.curves
            head = [f"{METHODS[cv.method].replace(' FD', '')} {cv.precision.replace('float', 'f')}" for cv in cols]
            width = max(9, *(len(s) for s in head))
            lines.append(f"{c.name}: {c.title}")
            lines.append(f"{'h':>7}  " + "  ".join(f"{s:>{width}}" for s in head))
            steps = cols[0].steps if cols else []
            for k, h in enumerate(steps):
                lines.append(f"{_fmt_h(h):>7}  " + "  ".join(f"{_fmt(cv.errors[k]):>{width}}" for cv in cols))
            lines.append(f"{'best':>7}  " + "  ".join(f"{_fmt(cv.best[0]):>{width}}" for cv in cols))
            lines.append(f"{'at h':>7}  " + "  ".join(f"{_fmt_h(cv.best[1]) if math.isfinite(cv.best[1]) else '-':>{width}}" for cv in cols))
            lines.append("")
        return "\n".join(lines).rstrip("\n")

    def summary(self) -> str:
        """One line per target: complex-step plateau and the best FD errors (float64)."""
        out = []
        for c in self.cases:
            parts = []
            for cv in c.curves:
                if cv.precision != "float64":
                    continue
                if cv.method == "cs":
                    flat = [e for h, e in zip(cv.steps, cv.errors) if 1e-300 <= h <= 1e-8]
                    if flat:
                        parts.append(f"complex step <= {_fmt(max(flat))} for h in [1e-300, 1e-8]")
                    h_last = cv.steps[-1]
                    if h_last < numpy.finfo(numpy.float64).tiny:
                        parts.append(f"{_fmt(cv.errors[-1])} at the subnormal h={_fmt_h(h_last)}")
                else:
                    e, h = cv.best
                    parts.append(f"best {METHODS[cv.method]} {_fmt(e)} at h={_fmt_h(h)}")
            out.append(f"{c.name}: " + "; ".join(parts))
        return "\n".join(out)

    def plot(self, path: str, dpi: int = 130) -> str:
        """Log-log PNG, one panel per target (:func:`engine.app.plots.plot_study`). Returns ``path``."""
        return plot_study(self, path, dpi)


# --- the study ------------------------------------------------------------------------------

def _expand_targets(targets) -> list[str]:
    if isinstance(targets, str):
        targets = [targets]
    names = []
    for t in targets:
        for item in str(t).split(","):
            item = item.strip().lower()
            if not item:
                continue
            if item not in TARGETS:
                raise ValueError(f"unknown study target {item!r}; choose from {', '.join(TARGETS)}")
            expand = {"all": ["demo", "st-power", "st-exp", "mlp-hvp", "mlp-grad"],
                      "squire-trapp": ["st-power", "st-exp"]}.get(item, [item])
            names += [n for n in expand if n not in names]
    if not names:
        raise ValueError(f"no study target given; choose from {', '.join(TARGETS)}")
    order = ["demo", "st-power", "st-exp", "mlp-hvp", "mlp-grad"]
    return sorted(names, key=order.index)


def _expand_list(values, allowed, what, both=None) -> list[str]:
    if isinstance(values, str):
        values = [values]
    out = []
    for v in values:
        for item in str(v).split(","):
            item = item.strip().lower()
            if not item:
                continue
            items = list(both) if both and item == "both" else [item]
            for it in items:
                if it not in allowed:
                    raise ValueError(f"unknown {what} {it!r}; choose from {', '.join(allowed)}{' or both' if both else ''}")
                if it not in out:
                    out.append(it)
    if not out:
        raise ValueError(f"no {what} given; choose from {', '.join(allowed)}")
    return [a for a in allowed if a in out]


def _rel_err_mp(approx: float, exact) -> float:
    """|approx - exact| / |exact| evaluated in mpmath, so the reference's rounding adds nothing."""
    import mpmath
    if not math.isfinite(approx):
        return math.nan if math.isnan(approx) else math.inf
    with mpmath.workdps(50):
        return float(abs(mpmath.mpf(approx) - exact) / abs(exact))


def _rel_err_vec(approx: numpy.ndarray, exact: numpy.ndarray, exact_norm: float) -> float:
    if not numpy.all(numpy.isfinite(approx)):
        return math.nan
    return float(numpy.linalg.norm(approx - exact) / exact_norm)


def _divide_by_step(num, h_used: float):
    """num / h in float64 on the host, with the step as it was actually representable; a step
    that rounded to 0 in the working precision perturbs nothing, so the estimate is 0."""
    num = numpy.asarray(to_host(num), dtype=numpy.float64)
    return num / h_used if h_used > 0 else num * 0.0


def _complex_point(xp, x, v, h, real_dt, cplx_dt):
    """x + i h v built in an explicit complex dtype (NEP 50 would otherwise pick it for us)."""
    z = xp.zeros(x.shape, dtype=cplx_dt)
    z.real = x
    z.imag = xp.asarray(h, dtype=real_dt) * v
    return z


def _scalar_curves(name, steps, methods, precisions, bar):
    xp = get_xp()
    f = SCALAR_FUNCTIONS[name][0]
    exact = scalar_reference(name)
    curves = []
    for prec in precisions:
        real_dt, cplx_dt = (numpy.dtype(d) for d in PRECISIONS[prec])
        x = xp.asarray(float(X0), dtype=real_dt)
        one = xp.asarray(1.0, dtype=real_dt)
        fx = f(x)
        errs = {m: [] for m in methods}
        for h in steps:
            h_used = float(real_dt.type(h))
            hr = xp.asarray(h, dtype=real_dt)
            for m in methods:
                if m == "cs":
                    approx = _divide_by_step(f(_complex_point(xp, x, one, h, real_dt, cplx_dt)).imag, h_used)
                elif m == "forward":
                    approx = _divide_by_step(f(x + hr) - fx, h_used)
                else:
                    approx = _divide_by_step(f(x + hr) - f(x - hr), 2 * h_used)
                errs[m].append(_rel_err_mp(float(approx), exact))
            bar.update(len(methods))
        curves += [Curve(m, prec, list(steps), errs[m]) for m in methods]
    reference = {"x": float(X0), "derivative": str(exact), "digits": 50, "source": "mpmath.diff at 70 digits"}
    return curves, reference


def _mlp_curves(kind, setup: MLPSetup, steps, methods, precisions, bar):
    xp = get_xp()
    model = setup.model
    curves = []
    reference = {}
    for prec in precisions:
        real_dt, cplx_dt = (numpy.dtype(d) for d in PRECISIONS[prec])
        # The study compares approximations at the point they can represent: in float32 the
        # exact value is taken at the float32-rounded weights, direction and data.
        w_h, v_h, x_h = (a.astype(real_dt).astype(numpy.float64) for a in (setup.w, setup.v, setup.x))
        if kind == "hvp":
            exact = exact_hvp(setup, w_h, v_h)
        else:
            import mpmath
            g = to_host(_grad_flat(model, xp.asarray(w_h), xp.asarray(x_h), xp.asarray(setup.y)))
            with mpmath.workdps(50):
                exact = float(mpmath.fsum(mpmath.mpf(float(a)) * mpmath.mpf(float(b)) for a, b in zip(g, v_h)))
        exact_norm = float(numpy.linalg.norm(exact)) if kind == "hvp" else abs(exact)
        if not exact_norm > 0:
            raise ValueError(f"the exact {'H v' if kind == 'hvp' else '<grad L, v>'} of the {setup.act} MLP is 0 at seed "
                             f"{setup.seed}, so relative errors are undefined; choose another --seed")
        reference[prec] = ({"norm": exact_norm, "source": "exact R-operator product (Pearlmutter 1994, engine.curvature.HessianRop) in float64"}
                           if kind == "hvp" else
                           {"value": exact, "source": "<grad L, v> by float64 backprop, dot product in 50-digit mpmath"})
        w, v, x, y = xp.asarray(w_h, dtype=real_dt), xp.asarray(v_h, dtype=real_dt), xp.asarray(x_h, dtype=real_dt), xp.asarray(setup.y)
        fn = (lambda p: _grad_flat(model, p, x, y)) if kind == "hvp" else (lambda p: _loss_flat(model, p, x, y))
        f0 = fn(w)
        errs = {m: [] for m in methods}
        for h in steps:
            h_used = float(real_dt.type(h))
            hv = xp.asarray(h, dtype=real_dt) * v
            for m in methods:
                if m == "cs":
                    approx = _divide_by_step(fn(_complex_point(xp, w, v, h, real_dt, cplx_dt)).imag, h_used)
                elif m == "forward":
                    approx = _divide_by_step(fn(w + hv) - f0, h_used)
                else:
                    approx = _divide_by_step(fn(w + hv) - fn(w - hv), 2 * h_used)
                if kind == "hvp":
                    errs[m].append(_rel_err_vec(approx, exact, exact_norm))
                else:
                    a = float(approx)
                    errs[m].append(abs(a - exact) / exact_norm if math.isfinite(a) else math.nan)
            bar.update(len(methods))
        curves += [Curve(m, prec, list(steps), errs[m]) for m in methods]
    return curves, reference


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def run_study(targets=("all",), methods=("cs", "forward", "central"), precisions=("float64", "float32"),
              steps=None, mlp: dict | None = None, acts=("tanh", "relu"), progress: bool = True) -> StudyResult:
    """Run the precision study and return its curves.

    ``targets``: names from :data:`TARGETS` (``squire-trapp`` = ``st-power`` + ``st-exp``,
    ``all`` = every target); ``methods`` from :data:`METHODS`; ``precisions`` float64 and/or
    float32; ``steps`` a list of positive h (default :func:`default_steps`); ``mlp`` keyword
    arguments of :func:`mlp_setup` (``sizes``, ``batch``, ``seed``; an ``activation`` key
    overrides ``acts``); ``acts`` the hidden activations of the MLP targets, one case each
    (``mlp-hvp-tanh``, ``mlp-hvp-relu``, ...). ``progress`` shows a tqdm bar on stderr (when it is a
    terminal) once the study has run for half a second. All argument errors raise ``ValueError`` before any work.
    """
    names = _expand_targets(targets)
    methods = _expand_list(methods, tuple(METHODS), "method")
    precisions = _expand_list(precisions, tuple(PRECISIONS), "precision", both=tuple(PRECISIONS))
    steps = default_steps() if steps is None else (parse_steps(steps) if isinstance(steps, str) else _check_steps(steps))
    mlp = dict(mlp or {})
    if "activation" in mlp:
        acts = mlp.pop("activation")
    unknown = set(mlp) - {"sizes", "batch", "seed"}
    if unknown:
        raise ValueError(f"unknown MLP option {sorted(unknown)[0]!r}; use sizes, activation, batch or seed")
    mlp_kw = {"sizes": (6, 10, 10, 4), "batch": 16, "seed": DEFAULT_SEED, **mlp}
    acts = _expand_list(acts, ACTIVATIONS, "activation", both=ACTIVATIONS)
    has_mlp = any(n.startswith("mlp") for n in names)
    setups = {a: mlp_setup(act=a, **mlp_kw) for a in acts} if has_mlp else {}
    _mpmath()

    n_cases = sum(len(acts) if n.startswith("mlp") else 1 for n in names)
    total = n_cases * len(precisions) * len(steps) * len(methods)
    bar = _NoBar()
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415
        # shown only on a terminal (disable=None) and only once the study outlasts half a second
        bar = tqdm(total=total, desc="cstep study", unit="eval", delay=0.5, file=sys.stderr, leave=False, disable=None)
    started = time.time()
    cases = []
    try:
        for name in names:
            if name in SCALAR_FUNCTIONS:
                curves, ref = _scalar_curves(name, steps, methods, precisions, bar)
                cases.append(Case(name, SCALAR_FUNCTIONS[name][2], "scalar-derivative", ref, curves))
                continue
            kind = "hvp" if name == "mlp-hvp" else "grad"
            for a in acts:
                s = setups[a]
                curves, ref = _mlp_curves(kind, s, steps, methods, precisions, bar)
                arch = "-".join(map(str, s.sizes))
                title = (f"MLP {arch} {a}, batch {s.batch}: H v" if kind == "hvp"
                         else f"MLP {arch} {a}, batch {s.batch}: <grad L, v>")
                ref = {**ref, "n_params": s.model.n_params, "direction": "unit-norm Gaussian v"}
                if a == "relu":
                    ref["kinks_crossed"] = [kinks_crossed(s, h) for h in steps]
                    ref["kinks_note"] = ("per h: ReLU pre-activations over the batch whose sign flips between w and "
                                         "w + h v or w - h v (float64); finite differences there measure a jump")
                cases.append(Case(f"{name}-{a}", title, "hessian-vector-product" if kind == "hvp" else "directional-derivative", ref, curves))
    finally:
        bar.close()
    import mpmath  # noqa: PLC0415
    setup = {
        "cstep": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "mpmath": mpmath.__version__,
        "backend": backend_name(),
        "platform": platform.platform(),
        "targets": [c.name for c in cases],
        "methods": methods,
        "precisions": precisions,
        "steps": steps,
        "mlp": ({"sizes": list(next(iter(setups.values())).sizes), "activations": acts, "batch": mlp_kw["batch"],
                 "seed": mlp_kw["seed"], "loss": "softmax_xent", "n_params": next(iter(setups.values())).model.n_params,
                 "init": "PyTorch Linear default U(-1/sqrt(d_in), 1/sqrt(d_in))",
                 "data": "standard normal inputs, uniform random labels, unit-norm Gaussian direction"} if setups else None),
        "error": "relative: |approx - exact| / |exact| (2-norm for H v)",
        "formulas": {"cs": "Im f(x + i h v) / h", "forward": "(f(x + h v) - f(x)) / h", "central": "(f(x + h v) - f(x - h v)) / (2 h)"},
        "seconds": round(time.time() - started, 3),
    }
    return StudyResult(cases, setup)


