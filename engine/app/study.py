"""Precision study: the complex step against forward and central differences (``cstep study``).

For every target and every step h of a grid reaching from 1e-1 down to the subnormal range the
study measures the relative error of three derivative approximations (complex-step.md section 7.1):

* complex step   ``f'(x) ~ Im f(x + i h) / h``            (Lyness & Moler 1967; Squire & Trapp 1998)
* forward FD     ``f'(x) ~ (f(x + h) - f(x)) / h``          error (h/2)|f''| + 2 eps |f| / h
* central FD     ``f'(x) ~ (f(x + h) - f(x - h)) / (2 h)``  error (h^2/6)|f'''| + eps |f| / h

in float64 (the complex step in complex128) and float32 (complex64). Targets:

* ``demo``: f(x) = e^x / sqrt(sin^3 x + cos^3 x) at x = 1.5 (Martins, Sturdza & Alonso 2003);
* ``st-power``, ``st-exp``: Squire & Trapp's (1998) x^(9/2) and e^x / (sin^3 x + cos^3 x) at 1.5;
  the references for these three are 50-digit mpmath derivatives (complex-step.md section 7.2);
* ``mlp-hvp-<act>``: the Hessian-vector product H v of a small softmax cross-entropy MLP along a
  unit-norm random v, by the complex step of the gradient ``Im grad L(w + i h v) / h`` and by
  forward/central differences of the gradient, against Pearlmutter's exact R-operator product
  (complex-step.md sections 2 and 7.3);
* ``mlp-grad-<act>``: the directional derivative <grad L, v> of the same loss, against backprop.

The error is ``|approx - exact| / |exact|`` (vector 2-norms for H v). Results come back as a
:class:`StudyResult` that prints a table and writes JSON, CSV and a log-log PNG.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy

from . import __version__
from .backend import array_module, backend_name, get_xp, to_host
from .curvature import HessianRop
from .layers import Dense, activation
from .model import Model

__all__ = [
    "METHODS",
    "PRECISIONS",
    "TARGETS",
    "SCALAR_FUNCTIONS",
    "default_steps",
    "parse_steps",
    "scalar_reference",
    "mlp_setup",
    "kinks_crossed",
    "exact_hvp",
    "Curve",
    "Case",
    "StudyResult",
    "run_study",
    "add_parser",
    "cmd_study",
]

#: method key -> label used in tables, legends and CSV.
METHODS = {"cs": "complex step", "forward": "forward FD", "central": "central FD"}
#: precision -> (real dtype, complex dtype); the complex step of a float32 study runs in complex64.
PRECISIONS = {"float64": ("float64", "complex128"), "float32": ("float32", "complex64")}
#: names accepted by ``--target`` and ``run_study(targets=...)``.
TARGETS = ("demo", "squire-trapp", "st-power", "st-exp", "mlp-hvp", "mlp-grad", "all")
ACTIVATIONS = ("tanh", "relu")
X0 = "1.5"  # the evaluation point of every scalar test function (exact in binary)
#: Default MLP seed. A representative draw: no pre-activation closer than 1e-3 to a ReLU kink and
#: <grad L, v> not unusually small against ||grad L||. (Seed 0 has a pre-activation 5.6e-6 from a
#: kink, so ReLU finite differences fail up to h = 1e-4 there, and <grad L, v> 2000x below
#: ||grad L||, which costs the directional derivative two digits in every method.)
DEFAULT_SEED = 1


# --- step grid ----------------------------------------------------------------------------------

def default_steps() -> list[float]:
    """1e-1 ... 1e-20 every decade, then 1e-30 ... 1e-100 every ten decades, 1e-150 ... 1e-300
    every fifty, 1e-305 (just above the float64 normal range, 2.2e-308) and the subnormal 1e-310,
    where the complex step finally loses digits (complex-step.md section 3)."""
    exps = list(range(1, 21)) + list(range(30, 101, 10)) + [150, 200, 250, 300, 305, 310]
    return [float(f"1e-{k}") for k in exps]


def parse_steps(text: str) -> list[float]:
    """Steps from ``"1e-1,1e-8,1e-30"``: positive finite numbers, returned unique and decreasing."""
    steps = []
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            h = float(item)
        except ValueError:
            raise ValueError(f"--steps entry {item!r} is not a number; give a comma list such as 1e-1,1e-8,1e-30") from None
        steps.append(h)
    return _check_steps(steps)


def _check_steps(steps) -> list[float]:
    steps = [float(h) for h in steps]
    if not steps:
        raise ValueError("the step list is empty; give at least one step such as 1e-8")
    bad = [h for h in steps if not (math.isfinite(h) and h > 0)]
    if bad:
        raise ValueError(f"steps must be positive finite numbers, got {bad[0]!r}; use e.g. 1e-1,1e-8,1e-30")
    return sorted(set(steps), reverse=True)


# --- scalar test functions (complex-step.md section 7.2) -----------------------------------------

def _demo(x):
    """e^x / sqrt(sin^3 x + cos^3 x): analytic near x = 1.5 (the root's argument is ~0.997 > 0)."""
    xp = array_module(x)
    return xp.exp(x) / xp.sqrt(xp.sin(x) ** 3 + xp.cos(x) ** 3)


def _st_power(x):
    """x^(9/2) written as x^4 sqrt(x): principal branch, analytic for Re x > 0, no complex pow."""
    xp = array_module(x)
    x2 = x * x
    return x2 * x2 * xp.sqrt(x)


def _st_exp(x):
    """e^x / (sin^3 x + cos^3 x) (Squire & Trapp 1998, no square root)."""
    xp = array_module(x)
    return xp.exp(x) / (xp.sin(x) ** 3 + xp.cos(x) ** 3)


def _demo_mp(x):
    import mpmath
    return mpmath.exp(x) / mpmath.sqrt(mpmath.sin(x) ** 3 + mpmath.cos(x) ** 3)


def _st_power_mp(x):
    import mpmath
    return mpmath.power(x, mpmath.mpf(9) / 2)


def _st_exp_mp(x):
    import mpmath
    return mpmath.exp(x) / (mpmath.sin(x) ** 3 + mpmath.cos(x) ** 3)


#: name -> (array-module function, mpmath function, title for tables and plots)
SCALAR_FUNCTIONS = {
    "demo": (_demo, _demo_mp, "e^x/sqrt(sin^3 x + cos^3 x) at x = 1.5"),
    "st-power": (_st_power, _st_power_mp, "Squire-Trapp x^(9/2) at x = 1.5"),
    "st-exp": (_st_exp, _st_exp_mp, "Squire-Trapp e^x/(sin^3 x + cos^3 x) at x = 1.5"),
}


def _mpmath():
    try:
        import mpmath
    except ImportError:  # pragma: no cover - mpmath ships with the project's dependencies
        raise ValueError("the precision study needs mpmath for its 50-digit references; pip install mpmath") from None
    return mpmath


def scalar_reference(name: str, dps: int = 50):
    """f'(1.5) of the scalar function ``name`` as an mpmath number with ``dps`` digits.

    ``mpmath.diff`` differentiates at a raised working precision, so all ``dps`` digits are
    correct; the test suite checks them against the literature values of complex-step.md 7.2.
    """
    mpmath = _mpmath()
    f_mp = SCALAR_FUNCTIONS[name][1]
    with mpmath.workdps(dps + 20):
        d = mpmath.diff(f_mp, mpmath.mpf(X0))
    with mpmath.workdps(dps):
        return +d  # rounded to dps digits


# --- MLP targets ----------------------------------------------------------------------------

@dataclass
class MLPSetup:
    """The model, data, point and direction of the MLP targets (host float64 arrays)."""

    model: Model
    sizes: tuple[int, ...]
    act: str
    batch: int
    seed: int
    w: numpy.ndarray  # flat parameters
    v: numpy.ndarray  # unit-norm direction
    x: numpy.ndarray  # inputs, batch x sizes[0]
    y: numpy.ndarray  # integer labels in [0, sizes[-1])


def _check_mlp(sizes, act, batch, seed):
    try:
        sizes = tuple(int(s) for s in sizes)
    except (TypeError, ValueError):
        raise ValueError(f"MLP sizes must be integers such as 6,10,10,4, got {sizes!r}") from None
    if len(sizes) < 2 or min(sizes) < 1:
        raise ValueError(f"MLP sizes need at least an input and an output width, all positive, got {','.join(map(str, sizes))}")
    if sizes[-1] < 2:
        raise ValueError(f"the MLP output width must be at least 2 classes for softmax cross-entropy, got {sizes[-1]}")
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown MLP activation {act!r}; choose tanh or relu")
    if int(batch) < 1:
        raise ValueError(f"the MLP batch size must be positive, got {batch}")
    if int(seed) < 0:
        raise ValueError(f"the seed must be a non-negative integer, got {seed}")
    return sizes, int(batch), int(seed)


def mlp_setup(sizes=(6, 10, 10, 4), act: str = "tanh", batch: int = 16, seed: int = DEFAULT_SEED) -> MLPSetup:
    """A softmax cross-entropy MLP with hidden activation ``act`` and a linear output layer,
    PyTorch-default initial weights from ``seed``, standard normal inputs, uniform random labels
    and a unit-norm Gaussian direction v (complex-step.md section 7.3's setup)."""
    sizes, batch, seed = _check_mlp(sizes, act, batch, seed)
    layers = []
    for k, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(d_in, d_out))
        if k < len(sizes) - 2:
            layers.append(activation(act))
    model = Model(layers, "softmax_xent", input_shape=(sizes[0],), name=f"mlp {'-'.join(map(str, sizes))} {act}")
    w = to_host(model.flatten(model.init(seed=seed, dtype=numpy.float64, xp=numpy)))
    rng = numpy.random.default_rng([seed, 2009_07098])
    x = rng.standard_normal((batch, sizes[0]))
    y = rng.integers(0, sizes[-1], size=batch)
    v = rng.standard_normal(model.n_params)
    v /= numpy.linalg.norm(v)
    return MLPSetup(model, sizes, act, batch, seed, w, v, x, y)


def _grad_flat(model, flat, x, y):
    """Flat gradient of the mean loss at the flat parameters ``flat`` (real or complex)."""
    _, grads = model.loss_and_grad(model.unflatten(flat), x, y)
    xp = array_module(flat)
    return xp.concatenate([g.reshape(-1) for g in grads])


def _loss_flat(model, flat, x, y):
    return model.loss(model.unflatten(flat), x, y)


def kinks_crossed(setup: MLPSetup, h: float) -> int:
    """Number of ReLU pre-activations (over the batch) whose sign differs between w and w + h v
    or w - h v: where a finite difference of a ReLU network steps across a kink and measures a
    jump instead of a derivative (the complex step never moves the real point). 0 for tanh."""
    model = setup.model
    relu = [i for i, layer in enumerate(model.layers) if getattr(layer, "name", "") == "relu"]
    if not relu:
        return 0
    xp = get_xp()
    w, v, x = (xp.asarray(a) for a in (setup.w, setup.v, setup.x))

    def masks(flat):
        _, caches = model.forward(model.unflatten(flat), x)
        return [caches[i] for i in relu]

    base = masks(w)
    plus, minus = masks(w + h * v), masks(w - h * v)
    return int(sum(int(to_host(((b != p) | (b != m)).sum())) for b, p, m in zip(base, plus, minus)))


def exact_hvp(setup: MLPSetup, w=None, v=None) -> numpy.ndarray:
    """The exact H v (host float64) of the setup's loss at flat weights ``w`` along ``v``
    (default: the setup's own), by Pearlmutter's R-operator (:class:`engine.curvature.HessianRop`),
    which shares no code path with the complex step."""
    w = setup.w if w is None else w
    v = setup.v if v is None else v
    xp = get_xp()
    wd, vd, xd = (xp.asarray(a, dtype=numpy.float64) for a in (w, v, setup.x))
    op = HessianRop(setup.model, setup.model.unflatten(wd), xd, xp.asarray(setup.y))
    return to_host(op.matvec(vd))


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
            _write_text(path, text + "\n")
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
            _write_text(path, text)
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

    # --- plot -----------------------------------------------------------------------------
    def plot(self, path: str, dpi: int = 130) -> str:
        """Log-log PNG: one panel per target, one curve per method (colour) and precision
        (solid float64, dashed float32). Returns ``path``.

        The h axis is logarithmic: one unit per decade down to 1e-20, then one unit per
        :data:`_TAIL_DECADES` decades, so the finite-difference valleys (1e-1 ... 1e-16) stay
        readable while the complex-step plateau is followed down to the subnormal 1e-310 (shaded).
        Errors below 1e-18 (including an exact 0) are drawn on the 1e-18 floor.
        """
        import matplotlib  # noqa: PLC0415 (import cost only when plotting)

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt  # noqa: PLC0415
        from matplotlib.lines import Line2D  # noqa: PLC0415

        floor = 1e-18
        tiny64 = float(numpy.finfo(numpy.float64).tiny)
        colors = {"cs": "#1f5fbf", "forward": "#d62728", "central": "#2a9d3a"}
        styles = {"float64": dict(ls="-", marker="o", ms=3.0, lw=1.7),
                  "float32": dict(ls="--", marker="s", ms=2.4, lw=1.1, alpha=0.7)}
        n = len(self.cases)
        ncols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
        nrows = math.ceil(n / ncols)
        spare = nrows * ncols - n
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.7 * nrows + (0.7 if not spare else 0.3)), squeeze=False)
        all_steps = sorted({h for c in self.cases for cv in c.curves for h in cv.steps}, reverse=True)
        t_max = max(_axis_pos(h) for h in all_steps)
        t_min = min(_axis_pos(h) for h in all_steps)
        deepest = -math.log10(all_steps[-1])
        ticks = [k for k in (0, 4, 8, 12, 16, 20, 50, 100, 150, 200, 250, 300) if k <= deepest + 0.5]
        if not ticks or deepest > 20 and _axis_pos(10.0 ** -ticks[-1]) < t_min:
            ticks = sorted({round(-math.log10(h)) for h in all_steps})[:: max(1, len(all_steps) // 8)]
        precisions_used = [p for p in PRECISIONS if any(cv.precision == p for c in self.cases for cv in c.curves)]
        methods_used = [m for m in METHODS if any(cv.method == m for c in self.cases for cv in c.curves)]
        for ax, c in zip(axes.flat, self.cases):
            ax.axhspan(floor / 3, floor, color="0.94", lw=0)
            for prec in precisions_used:
                eps = float(numpy.finfo(numpy.dtype(prec)).eps)
                ax.axhline(eps, color="0.6", ls=":", lw=0.9)
                # float64 label on the left (the CS curve is still high there), float32 on the
                # right (its curves have failed there): neither sits on a curve
                right = prec == "float32" and t_max > t_min + 10
                ax.text(t_max - 0.5 if right else t_min - 0.2, eps * 1.5, f"{prec} eps", fontsize=6.5, color="0.45",
                        va="bottom", ha="right" if right else "left")
            if deepest > 20 and t_min < 20:
                ax.axvline(20, color="0.8", lw=0.8)
            if all_steps[-1] < tiny64:
                ax.axvspan(_axis_pos(tiny64), t_max + 2, color="#ffe9b3", lw=0)
            for cv in c.curves:
                xs = [_axis_pos(h) for h in cv.steps]
                ys = [max(e, floor) if math.isfinite(e) else math.nan for e in cv.errors]
                ax.plot(xs, ys, color=colors[cv.method], **styles[cv.precision])
            ax.set_yscale("log")
            ax.set_ylim(floor / 3, 3e2)
            ax.set_xlim(t_min - 0.3, t_max + (0.8 if all_steps[-1] < tiny64 else 0.3))
            ax.set_xticks([_axis_pos(10.0 ** -k) for k in ticks])
            ax.set_xticklabels([f"$10^{{-{k}}}$" if k else "1" for k in ticks], fontsize=7.5)
            ax.set_yticks([10.0 ** k for k in range(-18, 3, 3)])
            ax.tick_params(axis="y", labelsize=7.5)
            ax.grid(True, which="major", color="0.9", lw=0.6)
            ax.set_title(f"{c.name}: {c.title}", fontsize=9.5)
            ax.set_xlabel("step h" + (f"  (1 tick per decade to $10^{{-20}}$, compressed {_TAIL_DECADES}x beyond)" if deepest > 20 else ""), fontsize=7.5)
            ax.set_ylabel("relative error", fontsize=8.5)
        handles = [Line2D([], [], color=colors[m], lw=2.2, label=METHODS[m]) for m in methods_used]
        if len(precisions_used) > 1:
            handles += [Line2D([], [], color="0.3", label=f"{p}" + (" (CS in complex128)" if p == "float64" else " (CS in complex64)"),
                               **{k: v for k, v in styles[p].items() if k != "alpha"}) for p in precisions_used]
        notes = ["complex step: Im f(x + ihv)/h", "forward: (f(x + hv) - f(x))/h", "central: (f(x + hv) - f(x - hv))/(2h)",
                 "error: |approx - exact| / |exact|", "exact 0 drawn at 1e-18"]
        if all_steps[-1] < tiny64:
            notes.append("shaded: h below 2.2e-308 (subnormal)")
        if spare:
            for ax in list(axes.flat)[n:]:
                ax.axis("off")
            lax = list(axes.flat)[n]
            lax.legend(handles=handles, loc="upper left", frameon=False, fontsize=9.5)
            lax.text(0.02, 0.40, "\n".join(notes), transform=lax.transAxes, fontsize=8.5, va="top", color="0.25", family="monospace")
            bottom = 0.0
        else:
            fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
            bottom = 0.06
        mlp = self.setup.get("mlp")
        sub = f"cstep {self.setup.get('cstep', __version__)}, {self.setup.get('backend', '?')}"
        if mlp:
            sub += f"; MLP softmax cross-entropy, seed {mlp['seed']}"
        fig.suptitle(f"Complex step vs finite differences: relative error against step h   ({sub})", fontsize=11)
        fig.tight_layout(rect=(0, bottom, 1, 0.97))
        _ensure_parent(path)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
        return path


_TAIL_DECADES = 10  # decades per plot unit beyond 1e-20


def _axis_pos(h: float) -> float:
    """Plot abscissa of step h: -log10 h, compressed :data:`_TAIL_DECADES`-fold beyond 20 decades."""
    t = -math.log10(h)
    return t if t <= 20 else 20 + (t - 20) / _TAIL_DECADES


def _ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {path}: directory {parent} does not exist; create it or choose another path")


def _write_text(path: str, text: str) -> None:
    _ensure_parent(path)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


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


# --- command line ---------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``cstep study`` on an ``argparse`` subparsers object; returns the subparser."""
    p = subparsers.add_parser(
        "study",
        help="precision study: complex step vs forward/central differences",
        description="Relative error of the complex step, forward and central differences against step h, "
                    "on scalar test functions (50-digit references) and on the gradient and Hessian-vector "
                    "product of a small MLP (exact R-operator reference). Prints a table; writes JSON, CSV, PNG.",
    )
    p.add_argument("--target", action="append", metavar="NAME",
                   help="demo, squire-trapp (st-power, st-exp), mlp-hvp, mlp-grad or all (default); repeat or comma-separate")
    p.add_argument("--method", action="append", metavar="NAME",
                   help="cs, forward, central (default: all three); repeat or comma-separate")
    p.add_argument("--act", default="tanh,relu", metavar="ACT",
                   help="MLP hidden activation: tanh, relu, or both (default: tanh,relu)")
    p.add_argument("--sizes", default="6,10,10,4", metavar="W0,W1,...", help="MLP layer widths (default 6,10,10,4)")
    p.add_argument("--batch", type=int, default=16, help="MLP batch size (default 16)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the MLP weights, data and direction (default {DEFAULT_SEED})")
    p.add_argument("--precision", default="both", metavar="P", help="float64, float32 or both (default both)")
    p.add_argument("--steps", metavar="H,H,...", help="custom comma list of steps, e.g. 1e-1,1e-8,1e-30 (default 1e-1 ... 1e-310)")
    p.add_argument("--json", metavar="PATH", help="write the curves, minima and setup as JSON")
    p.add_argument("--csv", metavar="PATH", help="write the curves as long-format CSV")
    p.add_argument("--plot", metavar="PATH", help="write a log-log PNG, one panel per target")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no table (only the files written)")
    p.set_defaults(func=cmd_study)
    return p


def cmd_study(args) -> int:
    """Run the study from parsed arguments; user errors raise ValueError (one line, exit 2)."""
    try:
        sizes = tuple(int(s) for s in str(args.sizes).replace(" ", "").split(",") if s)
    except ValueError:
        raise ValueError(f"--sizes must be comma-separated integers such as 6,10,10,4, got {args.sizes!r}") from None
    for path in (args.json, args.csv, args.plot):
        if path:
            _ensure_parent(path)
    if args.plot and not str(args.plot).lower().endswith(".png"):
        raise ValueError(f"--plot writes a PNG; give a path ending in .png, got {args.plot!r}")
    result = run_study(
        targets=args.target or ["all"],
        methods=args.method or list(METHODS),
        precisions=args.precision,
        steps=parse_steps(args.steps) if args.steps else None,
        mlp={"sizes": sizes, "batch": args.batch, "seed": args.seed},
        acts=args.act,
        progress=not args.quiet,
    )
    if not args.quiet:
        print(result.table())
        print()
        print(result.summary())
    written = []
    if args.json:
        result.to_json(args.json)
        written.append(args.json)
    if args.csv:
        result.to_csv(args.csv)
        written.append(args.csv)
    if args.plot:
        result.plot(args.plot)
        written.append(args.plot)
    for path in written:
        print(f"wrote {path}")
    return 0
