"""What the command line prints: run summaries, ``cstep info``'s text and JSON, the compare table."""

from __future__ import annotations

import json
import os

import solvers

from .options import TUNED_HYPERPARAMETERS, hyper_flag


def fmt_value(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def print_summary(summary: dict, args) -> None:
    if args.json:
        print(json.dumps(summary, indent=2, allow_nan=True))
    elif not args.quiet:
        tr = summary["train_loss"][-1] if summary["train_loss"] else float("nan")
        te = summary["test_loss"][-1] if summary["test_loss"] else float("nan")
        acc = "".join(f", {k.replace('_', ' ')} {summary[k][-1]:.4%}" for k in ("train_accuracy", "test_accuracy")
                      if summary.get(k))
        print(f"{summary['status']}: {summary['solver']} on {summary['net']}/{summary['dataset']}, "
              f"{summary['epochs']} epochs ({summary['iterations']} iterations), train loss {tr:.6g}, test loss {te:.6g}{acc}, "
              f"{summary['training_cpu_seconds']:.1f} s training CPU, {summary['elapsed_seconds']:.1f} s elapsed")
        print(f"run file: {summary['run']}")


def info_record(rec) -> dict:
    """``cstep info --json``: everything a run file holds except the arrays."""
    ep = rec.history["epochs"]
    steps = rec.history["steps"]
    return {"run": str(rec.path), "format_version": rec.meta.get("format_version"),
            "created": rec.meta.get("created"), "updated": rec.meta.get("updated"),
            "config": rec.config, "hyperparameters": rec.hyperparameters,
            "progress": rec.progress, "final": final_row(rec), "epochs": ep,
            "steps_recorded": len(next(iter(steps.values()))) if steps else 0,
            "step_columns": list(steps), "environment": rec.environment}


def final_row(rec) -> dict:
    ep = rec.history["epochs"]
    return {k: v[-1] for k, v in ep.items()} if ep and any(ep.values()) else {}


def info_lines(rec) -> list[str]:
    """``cstep info``: one line per aspect of the run."""
    final = final_row(rec)
    c, p, e = rec.config, rec.progress, rec.environment
    sub = " (substitute: not comparable with published numbers)" if c.get("dataset_substitute") else ""
    hyper = ", ".join(f"{k}={fmt_value(v)}" for k, v in rec.hyperparameters.items())
    target = c.get("epochs")
    lines = [
        f"run file     {rec.path}  (format {rec.meta.get('format_version')}, created {rec.meta.get('created')}, updated {rec.meta.get('updated')})",
        f"network      {c['net']}: {c.get('net_description', '')}; {c.get('n_params', 0):,} parameters",
        f"data         {c['dataset']}: {c.get('n_train_used')} train / {c.get('n_test_used')} test{sub}",
        f"solver       {c['solver']}  {hyper}",
        f"options      batch size {c['batch_size']}, dtype {c['dtype']}, seed {c['seed']} ({c.get('init', 'numpy')} init, {c.get('order', 'pcg64')} order), epochs {target if target else 'unlimited (time budget)'}, "
        f"max time {str(c['max_time']) + ' s' if c.get('max_time') else 'none'}, "
        f"checkpoint every {str(c['checkpoint_every']) + ' iterations and every epoch' if c.get('checkpoint_every') else 'epoch'}",
        f"progress     {p.get('status', '?')}: epoch {p['epoch']}{'/' + str(target) if target else ''}, iteration {p['iteration']}, "
        f"{p['cpu_time']:.2f} s training CPU, {p['wall_time']:.2f} s wall, {p.get('checkpoints', '?')} checkpoints "
        f"(last {p.get('checkpoint_time', '?')})",
    ]
    if int(p.get("world_size", 1)) > 1 or int(c.get("world_size") or 1) > 1:
        kaisa = p.get("kaisa")
        split = (f"KAISA factor work, {kaisa['grad_workers_per_layer']} gradient worker(s) per layer" if kaisa
                 else "every rank does all the factor work")
        sent = [v for v in rec.history.get("steps", {}).get("comm_bytes", []) if v == v]
        lines.append(f"parallel     {p.get('world_size', c.get('world_size'))} ranks at the last checkpoint (started on "
                     f"{c.get('world_size')}), {split}" + (f"; {sent[-1] / 1e6:.3g} MB sent per iteration" if sent else ""))
    if p.get("diverged_at"):
        lost = p.get("diverged_steps", {}).get("loss", [])
        tail = ", ".join(fmt_value(v) for v in lost[-5:])
        lines.append(f"divergence   the loss became non-finite at iteration {p['diverged_at']}; the file keeps the checkpoint "
                     f"of iteration {p['iteration']}" + (f"; the last losses before that: {tail}" if tail else ""))
    if final:
        losses = ", ".join(f"{k.replace('_', ' ')} {fmt_value(final[k])}" for k in ("train_loss", "test_loss", "train_accuracy", "test_accuracy") if k in final)
        lines.append(f"final        {losses}")
    else:
        lines.append("final        no epoch completed yet")
    lines.append(f"environment  cstep {e.get('cstep_version')}, Python {e.get('python')}, NumPy {e.get('numpy')}, "
                 f"SciPy {e.get('scipy')}, h5py {e.get('h5py')}, CuPy {e.get('cupy') or 'none'}; backend {e.get('backend')} "
                 f"on {e.get('device')}; BLAS {e.get('blas', 'not recorded')}, {e.get('blas_threads', '?')} thread(s) "
                 f"(--threads {c.get('threads', 'not recorded')}); host {e.get('host')} ({e.get('platform')})")
    return lines


def compare_table(results: list[dict], plot_path) -> str:
    """``cstep compare``'s table: one row per solver."""
    header = f"{'solver':<12} {'status':<9} {'epochs':>6} {'iters':>6} {'train loss':>12} {'test loss':>12} {'CPU s':>8}  run file"
    rows = [header, "-" * len(header)]
    for r in results:
        tr = r["train_loss"][-1] if r["train_loss"] else float("nan")
        te = r["test_loss"][-1] if r["test_loss"] else float("nan")
        rows.append(f"{r['solver']:<12} {r['status']:<9} {r['epochs']:>6} {r['iterations']:>6} {tr:>12.6g} {te:>12.6g} "
                    f"{r['training_cpu_seconds']:>8.1f}  {r['run']}")
    rows.append(f"plot: {plot_path or 'none (no run completed an epoch)'}")
    return "\n".join(rows)


def ensure_parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ValueError(f"cannot write {path}: directory {parent} does not exist; create it or choose another path")


def write_text(path: str, text: str) -> None:
    ensure_parent(path)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def solver_info(name: str) -> dict:
    """A solver's description, hyper-parameters (default, requirement, meaning) and tuned defaults."""
    cls = solvers.get_solver(name)
    return {"name": name, "summary": cls.summary, "needs_warm_start": cls.needs_warm_start,
            "hyperparameters": {k: {"option": hyper_flag(k), "default": h.default, "requirement": h.requirement,
                                    "help": h.help} for k, h in cls.hyperparameters.items()},
            "tuned": {net: values for (net, solver), values in TUNED_HYPERPARAMETERS.items() if solver == name}}


def solver_lines(info: dict) -> list[str]:
    lines = [f"{info['name']}: {info['summary']}"]
    if info["needs_warm_start"]:
        lines.append("warm start: one pass over the training data before iteration 0")
    lines.append("hyper-parameters (option, default, requirement, meaning):")
    width = max((len(h["option"]) for h in info["hyperparameters"].values()), default=0)
    for h in info["hyperparameters"].values():
        req = f" ({h['requirement']})" if h["requirement"] else ""
        lines.append(f"  {h['option']:<{width}}  {fmt_value(h['default'])}{req}: {h['help']}")
    for net, values in info["tuned"].items():
        lines.append(f"tuned for {net}: " + ", ".join(f"{k} {fmt_value(v)}" for k, v in values.items()))
    return lines


def _median_range(values: list[float]) -> dict:
    import statistics  # noqa: PLC0415 (stdlib; only for seed tables)

    finite = [v for v in values if v == v and abs(v) != float("inf")]
    if not finite:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite)}


def seed_statistics(results: list[dict]) -> dict:
    """Per solver over its seeds: median and range of the final train/test loss (and accuracy), the
    diverged runs, the median training CPU time (a diverged run's up to its blow-up: its final losses are
    those of its last finite checkpoint, its clocks too, but the time it spent counts)."""
    out: dict = {}
    for r in results:
        out.setdefault(r["solver"], []).append(r)
    stats = {}
    for solver, rows in out.items():
        last = lambda key: [row[key][-1] if row.get(key) else float("nan") for row in rows]  # noqa: E731
        entry = {"seeds": [row["seed"] for row in rows], "diverged": sum(row["status"] == "diverged" for row in rows),
                 "train_loss": _median_range(last("train_loss")), "test_loss": _median_range(last("test_loss")),
                 "cpu_seconds": _median_range([row.get("cpu_seconds_spent", row["training_cpu_seconds"]) for row in rows])}
        if any(row.get("test_accuracy") for row in rows):
            entry["test_accuracy"] = _median_range(last("test_accuracy"))
        stats[solver] = entry
    return stats


def seed_table(stats: dict, plot_path) -> str:
    """``cstep compare --seeds``: one row per solver, medians with [min, max] over the seeds."""
    def cell(d, fmt="{:.5g}"):
        return f"{fmt.format(d['median'])} [{fmt.format(d['min'])}, {fmt.format(d['max'])}]"

    acc = any("test_accuracy" in e for e in stats.values())
    acc_head = f" {'test accuracy':<27}" if acc else ""
    header = (f"{'solver':<14} {'seeds':>5} {'diverged':>8}  {'train loss (median [range])':<30} "
              f"{'test loss (median [range])':<30}{acc_head} CPU s (median)")
    rows = [header, "-" * len(header)]
    for solver, e in stats.items():
        extra = f" {cell(e['test_accuracy'], '{:.4f}'):<27}" if acc else ""
        rows.append(f"{solver:<14} {len(e['seeds']):>5} {e['diverged']:>8}  {cell(e['train_loss']):<30} "
                    f"{cell(e['test_loss']):<30}{extra} {e['cpu_seconds']['median']:.1f}")
    rows.append(f"plot: {plot_path or 'none (no run completed an epoch)'}")
    return "\n".join(rows)
