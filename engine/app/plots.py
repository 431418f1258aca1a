"""Figures: loss curves of runs (``cstep plot`` and ``cstep compare``) and the precision study's
error-against-step plot (``cstep study``). Matplotlib renders off-screen (Agg)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy

from .options import UsageError
from .. import __version__
from .report import ensure_parent, fmt_value
from .runfile import load_run
from .study_targets import METHODS, PRECISIONS


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first use: it costs ~0.3 s)."""
    import matplotlib  # noqa: PLC0415 (third-party, heavy: only when a figure is drawn)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def _save(fig, out, tight: bool = True) -> Path:
    """Lay the figure out, write it (format from the suffix; missing folders are made) and close it."""
    plt = pyplot()
    if tight:
        fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=120)
    except ValueError as exc:  # unknown image format from the suffix
        raise UsageError(f"cannot write {out}: {exc}") from None
    finally:
        plt.close(fig)
    return out


def load_for_plot(paths):
    runs, empty = [], []
    for path in paths:
        rec = load_run(path)
        (runs if rec.history["epochs"].get("epoch") else empty).append(rec)
    if not runs:
        raise UsageError(f"{', '.join(str(r.path) for r in empty) or 'no run file'}: no completed epoch to plot; "
                         "train for at least one epoch first")
    for rec in empty:
        print(f"cstep plot: note: {rec.path} has no completed epoch yet; left out", file=sys.stderr)
    return runs


#: run options that tell runs apart in a legend when they differ
_OPTIONS = ("net", "dataset", "n_train_used", "batch_size", "dtype", "seed", "init", "order")


def _differing(values) -> bool:
    return len({json.dumps(v) for v in values}) > 1


def run_labels(records) -> list[str]:
    """Solver names, plus every run option that differs between the runs (dtype, batch size,
    seed...), plus the hyper-parameters that differ between runs of the same solver, plus the file
    name when nothing tells two runs apart."""
    labels = []
    common = [k for k in _OPTIONS if _differing(r.config.get(k) for r in records)]
    for r in records:
        same = [q for q in records if q.config["solver"] == r.config["solver"]]
        diff = [f"{k.removesuffix('_used')}={fmt_value(r.config.get(k))}" for k in common]
        if len(same) > 1:
            diff += [f"{k}={fmt_value(v)}" for k, v in r.hyperparameters.items()
                     if _differing(q.hyperparameters.get(k) for q in same)]
        labels.append(r.config["solver"] + (" (" + ", ".join(diff) + ")" if diff else ""))
    if len(set(labels)) < len(labels):
        labels = [f"{lab} [{Path(r.path).stem}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, records)]
    return labels


def _draw_run(ax_left, ax_t, r, colour: str, per_iteration: bool) -> None:
    """One run: its losses against epoch (or, per iteration, the minibatch loss of every step with
    the epoch evaluations as markers) on the left, against training CPU time on the right."""
    ep = r.history["epochs"]
    cpu = numpy.asarray(ep["cpu_time"], dtype=float)
    x_left = numpy.asarray(ep["iterations" if per_iteration else "epoch"], dtype=float)
    if per_iteration and r.history["steps"].get("loss"):
        steps = r.history["steps"]
        ax_left.plot(numpy.asarray(steps["iteration"], dtype=float), numpy.asarray(steps["loss"], dtype=float), "-",
                     color=colour, lw=0.8, alpha=0.55)
    for key, style in (("train_loss", "-"), ("test_loss", "--")):
        if key in ep:
            y = numpy.asarray(ep[key], dtype=float)
            ax_left.plot(x_left, y, "o" if per_iteration else style, color=colour, markersize=3,
                         **({} if per_iteration else {"marker": "o"}))
            ax_t.plot(cpu, y, style, color=colour, marker="o", markersize=3)


def _title(records) -> str:
    nets_ = sorted({r.config["net"] for r in records})
    sets = sorted({r.config["dataset"] for r in records})
    sub = " (substitute data)" if any(r.config.get("dataset_substitute") for r in records) else ""
    extras = [f"{name} {records[0].config[key]}" for key, name in (("batch_size", "batch"), ("dtype", ""))
              if not _differing(str(r.config[key]) for r in records)]
    return f"{', '.join(nets_)} on {', '.join(sets)}{sub}" + (": " + ", ".join(e.strip() for e in extras) if extras else "")


def plot_runs(records, out, title: str | None = None, per_iteration: bool = False) -> Path:
    """Training (solid) and test (dashed) loss, from epoch 0 (the initial point), against epoch and
    against training CPU time, log scale, one colour per run, labelled by solver plus what differs.
    ``per_iteration``: the left panel shows every step's minibatch loss against the iteration, with
    the epoch evaluations as markers."""
    plt = pyplot()
    from matplotlib.lines import Line2D  # noqa: PLC0415 (matplotlib loads only when a figure is drawn)
    from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: PLC0415
    labels = run_labels(records)
    fig, (ax_left, ax_t) = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for k, (r, label) in enumerate(zip(records, labels)):
        colour = colours[k % len(colours)]
        _draw_run(ax_left, ax_t, r, colour, per_iteration)
        handles.append(Line2D([], [], color=colour, marker="o", markersize=4, label=label))
    handles += [Line2D([], [], color="0.3", linestyle="-", label="train"),
                Line2D([], [], color="0.3", linestyle="--", label="test")]
    if per_iteration:
        handles.append(Line2D([], [], color="0.3", lw=0.8, alpha=0.55, label="minibatch (each step)"))
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, xlabel in ((ax_left, "iteration" if per_iteration else "epoch"), (ax_t, "training CPU time (s)")):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (incl. 0.5 tau ||theta||^2)")
        ax.grid(True, which="both", alpha=0.3)
    ax_left.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_left.set_title("loss against iteration" if per_iteration else "loss against epoch", fontsize=10)
    ax_t.set_title("loss against training CPU time", fontsize=10)
    fig.suptitle(title if title is not None else _title(records))
    ncol = min(len(handles), 4)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    rows = -(-len(handles) // ncol)
    fig.tight_layout(rect=(0, 0.04 + 0.045 * rows, 1, 1))
    return _save(fig, out, tight=False)


def seed_curves(runs) -> dict:
    """One solver's runs over seeds as plot_seeds draws them: the runs that did not diverge (all of them
    if every one did), cut to the shortest; per epoch the median training CPU time and, per loss, the
    median and the min-max band over those runs. {"epochs", "cpu", "drawn", "diverged", "train_loss":
    (median, min, max), "test_loss": ...}."""
    finished = [r for r in runs if r.progress.get("status") != "diverged"]
    drawn = finished or list(runs)
    n = min(len(r.history["epochs"]["epoch"]) for r in drawn)
    out = {"epochs": numpy.asarray(drawn[0].history["epochs"]["epoch"][:n], dtype=float),
           "cpu": numpy.median([numpy.asarray(r.history["epochs"]["cpu_time"][:n], dtype=float) for r in drawn], axis=0),
           "drawn": len(drawn), "diverged": len(runs) - len(finished)}
    for key in ("train_loss", "test_loss"):
        ys = numpy.asarray([r.history["epochs"][key][:n] for r in drawn if key in r.history["epochs"]], dtype=float)
        if len(ys):
            out[key] = (numpy.median(ys, axis=0), ys.min(axis=0), ys.max(axis=0))
    return out


def plot_seeds(records, out) -> Path:
    """Per solver over its seeds: the median training loss (solid) and test loss (dashed) with a
    min-max band, against epoch and against the median training CPU time (:func:`seed_curves`: the
    runs that did not diverge, cut to the shortest; the legend counts the diverged ones)."""
    plt = pyplot()
    fig, (ax_ep, ax_t) = plt.subplots(1, 2, figsize=(12, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    groups: dict = {}
    for r in records:
        groups.setdefault(r.config["solver"], []).append(r)
    for k, (solver, runs) in enumerate(groups.items()):
        colour = colours[k % len(colours)]
        c = seed_curves(runs)
        label = f"{solver} ({len(runs)} seeds" + (f", {c['diverged']} diverged)" if c["diverged"] else ")")
        for key, style in (("train_loss", "-"), ("test_loss", "--")):
            if key not in c:
                continue
            med, lo, hi = c[key]
            for ax, x in ((ax_ep, c["epochs"]), (ax_t, c["cpu"])):
                ax.plot(x, med, style, color=colour, label=label if key == "train_loss" and ax is ax_ep else None)
                ax.fill_between(x, lo, hi, color=colour, alpha=0.15 if key == "train_loss" else 0.07)
    for ax, xlabel in ((ax_ep, "epoch"), (ax_t, "training CPU time (s, median over seeds)")):
        ax.set_yscale("log")
        ax.set(xlabel=xlabel, ylabel="loss (incl. 0.5 tau ||theta||^2)")
        ax.grid(True, which="both", alpha=0.3)
    ax_ep.legend(fontsize=8)
    fig.suptitle(f"{_title(records)}: median over seeds, band = min-max (solid train, dashed test)", fontsize=10)
    return _save(fig, out)


# --- the precision study --------------------------------------------------------------------
_TAIL_DECADES = 10  # decades per plot unit beyond 1e-20
_FLOOR = 1e-18  # errors below it (an exact 0 too) are drawn on it
_TINY64 = float(numpy.finfo(numpy.float64).tiny)
_COLORS = {"cs": "#1f5fbf", "forward": "#d62728", "central": "#2a9d3a"}
_STYLES = {"float64": dict(ls="-", marker="o", ms=3.0, lw=1.7),
           "float32": dict(ls="--", marker="s", ms=2.4, lw=1.1, alpha=0.7)}


def _axis_pos(h: float) -> float:
    """Plot abscissa of step h: -log10 h, compressed :data:`_TAIL_DECADES`-fold beyond 20 decades."""
    t = -math.log10(h)
    return t if t <= 20 else 20 + (t - 20) / _TAIL_DECADES


def _study_axis(result) -> dict:
    """The h axis shared by every panel: range, decade ticks, how deep the grid goes."""
    all_steps = sorted({h for c in result.cases for cv in c.curves for h in cv.steps}, reverse=True)
    t_max = max(_axis_pos(h) for h in all_steps)
    t_min = min(_axis_pos(h) for h in all_steps)
    deepest = -math.log10(all_steps[-1])
    ticks = [k for k in (0, 4, 8, 12, 16, 20, 50, 100, 150, 200, 250, 300) if k <= deepest + 0.5]
    if not ticks or deepest > 20 and _axis_pos(10.0 ** -ticks[-1]) < t_min:
        ticks = sorted({round(-math.log10(h)) for h in all_steps})[:: max(1, len(all_steps) // 8)]
    return {"t_min": t_min, "t_max": t_max, "deepest": deepest, "ticks": ticks, "subnormal": all_steps[-1] < _TINY64}


def _study_panel(ax, case, axis: dict, precisions_used) -> None:
    """One target: its curves, the eps lines of each precision, the subnormal band shaded."""
    t_min, t_max, deepest = axis["t_min"], axis["t_max"], axis["deepest"]
    ax.axhspan(_FLOOR / 3, _FLOOR, color="0.94", lw=0)
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
    if axis["subnormal"]:
        ax.axvspan(_axis_pos(_TINY64), t_max + 2, color="#ffe9b3", lw=0)
    for cv in case.curves:
        xs = [_axis_pos(h) for h in cv.steps]
        ys = [max(e, _FLOOR) if math.isfinite(e) else math.nan for e in cv.errors]
        ax.plot(xs, ys, color=_COLORS[cv.method], **_STYLES[cv.precision])
    ax.set_yscale("log")
    ax.set_ylim(_FLOOR / 3, 3e2)
    ax.set_xlim(t_min - 0.3, t_max + (0.8 if axis["subnormal"] else 0.3))
    ax.set_xticks([_axis_pos(10.0 ** -k) for k in axis["ticks"]])
    ax.set_xticklabels([f"$10^{{-{k}}}$" if k else "1" for k in axis["ticks"]], fontsize=7.5)
    ax.set_yticks([10.0 ** k for k in range(-18, 3, 3)])
    ax.tick_params(axis="y", labelsize=7.5)
    ax.grid(True, which="major", color="0.9", lw=0.6)
    ax.set_title(f"{case.name}: {case.title}", fontsize=9.5)
    ax.set_xlabel("step h" + (f"  (1 tick per decade to $10^{{-20}}$, compressed {_TAIL_DECADES}x beyond)"
                              if deepest > 20 else ""), fontsize=7.5)
    ax.set_ylabel("relative error", fontsize=8.5)


def _study_legend(fig, axes, n: int, spare: int, methods_used, precisions_used, subnormal: bool) -> float:
    """Methods (colour), precisions (line style) and the formulas, in a spare panel or under the
    figure; returns the bottom margin the legend needs."""
    from matplotlib.lines import Line2D  # noqa: PLC0415 (matplotlib loads only when a figure is drawn)

    handles = [Line2D([], [], color=_COLORS[m], lw=2.2, label=METHODS[m]) for m in methods_used]
    if len(precisions_used) > 1:
        handles += [Line2D([], [], color="0.3", label=f"{p}" + (" (CS in complex128)" if p == "float64" else " (CS in complex64)"),
                           **{k: v for k, v in _STYLES[p].items() if k != "alpha"}) for p in precisions_used]
    notes = ["complex step: Im f(x + ihv)/h", "forward: (f(x + hv) - f(x))/h", "central: (f(x + hv) - f(x - hv))/(2h)",
             "error: |approx - exact| / |exact|", "exact 0 drawn at 1e-18"]
    if subnormal:
        notes.append("shaded: h below 2.2e-308 (subnormal)")
    if not spare:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
        return 0.06
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    lax = list(axes.flat)[n]
    lax.legend(handles=handles, loc="upper left", frameon=False, fontsize=9.5)
    lax.text(0.02, 0.40, "\n".join(notes), transform=lax.transAxes, fontsize=8.5, va="top", color="0.25", family="monospace")
    return 0.0


def plot_study(result, path: str, dpi: int = 130) -> str:
    """Log-log PNG of a precision study: one panel per target, one curve per method (colour) and
    precision (solid float64, dashed float32). Returns ``path``.

    The h axis is logarithmic: one unit per decade down to 1e-20, then one unit per
    :data:`_TAIL_DECADES` decades, so the finite-difference valleys (1e-1 ... 1e-16) stay
    readable while the complex-step plateau is followed down to the subnormal 1e-310 (shaded).
    Errors below 1e-18 (including an exact 0) are drawn on the 1e-18 floor.
    """
    plt = pyplot()
    n = len(result.cases)
    ncols = 1 if n == 1 else 2 if n <= 4 else 3 if n <= 9 else 4
    nrows = math.ceil(n / ncols)
    spare = nrows * ncols - n
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.4 * ncols, 3.7 * nrows + (0.7 if not spare else 0.3)), squeeze=False)
    axis = _study_axis(result)
    precisions_used = [p for p in PRECISIONS if any(cv.precision == p for c in result.cases for cv in c.curves)]
    methods_used = [m for m in METHODS if any(cv.method == m for c in result.cases for cv in c.curves)]
    for ax, case in zip(axes.flat, result.cases):
        _study_panel(ax, case, axis, precisions_used)
    bottom = _study_legend(fig, axes, n, spare, methods_used, precisions_used, axis["subnormal"])
    mlp = result.setup.get("mlp")
    sub = f"cstep {result.setup.get('cstep', __version__)}, {result.setup.get('backend', '?')}"
    if mlp:
        sub += f"; MLP softmax cross-entropy, seed {mlp['seed']}"
    fig.suptitle(f"Complex step vs finite differences: relative error against step h   ({sub})", fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 0.97))
    ensure_parent(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


# --- curvature analysis and probes -------------------------------------------------------------
def plot_analysis(result: dict, out) -> Path:
    """Left: the spectral densities of every curvature, overlaid (or the top eigenvalues by index);
    right: the top eigenvalue of each layer's block per curvature (or the traces)."""
    plt = pyplot()
    fig, (ax_d, ax_l) = plt.subplots(1, 2, figsize=(12, 4.8))
    curv = result["curvatures"]
    for name, c in curv.items():
        if "density" in c:
            ax_d.plot(c["density"]["grid"], numpy.maximum(c["density"]["density"], 1e-12), label=c["label"])
        elif "top_eigenvalues" in c:
            vals = c["top_eigenvalues"]["values"]
            ax_d.plot(range(1, len(vals) + 1), vals, marker="o", label=c["label"])
        if "layers" in c:
            layers = list(c["layers"])
            ax_l.plot(range(len(layers)), [c["layers"][k]["top_eigenvalue"] for k in layers], marker="o", label=c["label"])
            ax_l.set_xticks(range(len(layers)), [f"{k}" for k in layers])
        elif "trace" in c:
            ax_l.errorbar([c["label"]], [c["trace"]["hutchpp"]], yerr=[c["trace"]["hutchpp_std_error"]], fmt="o")
    if any("density" in c for c in curv.values()):
        ax_d.set_yscale("log")
        ax_d.set(xlabel="eigenvalue", ylabel="density (SLQ, Gaussian-smoothed)", title="spectral density")
    else:
        ax_d.set(xlabel="index", ylabel="eigenvalue", title="top eigenvalues (Lanczos)")
    if any("layers" in c for c in curv.values()):
        ax_l.set_yscale("symlog", linthresh=1e-6)
        ax_l.set(xlabel="layer", ylabel="top eigenvalue of the layer block", title="per layer")
    else:
        ax_l.set(ylabel="trace (Hutch++)", title="trace")
    for ax in (ax_d, ax_l):
        ax.grid(True, alpha=0.3)
    ax_d.legend(fontsize=8)
    fig.suptitle(f"curvature of {result['target']}", fontsize=10)
    return _save(fig, out)


def plot_probes(records, labels, out) -> Path:
    """The curvature probes recorded during training (``--probe-every``): top Hessian eigenvalue and
    trace against the iteration, one colour per run."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for r, label in zip(records, labels):
        probes = r.history.get("probes", {})
        for ax, key in zip(axes, ("top_eig", "trace")):
            if probes.get(key):
                ax.plot(probes["iteration"], probes[key], marker="o", markersize=3, label=label)
    for ax, title in zip(axes, ("top Hessian eigenvalue (Lanczos, complex step)", "Hessian trace (Hutchinson)")):
        ax.set(xlabel="iteration", title=title)
        ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out)
